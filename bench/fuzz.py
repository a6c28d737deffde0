"""Property-based fuzzing (hypothesis) of every reader and of every command's option validation.

Generated tables (JSONL, JSON, CSV, Parquet; arbitrary column types, nulls, unicode, huge and non-finite numbers,
odd file names, raw bytes), generated run state for ``icm report``, and generated option values (NaN, infinities,
5,000-digit numbers, negatives, zero, empty strings, random text), on the command line and in ``--config`` recipes,
go through the commands, in-process, and one invariant is asserted everywhere: the command exits 0 with valid
output, or exits 2 with at most one line, no traceback, and every file that was there byte-identical. No model
runs: the commands that load one get a model that does not exist, so a valid input ends at "model not found"
(exit 2, one line) instead.

``tests/test_fuzz.py`` runs a short profile; the long one:

    python -m bench.fuzz --examples 2000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

NO_MODEL = "no-such-model-anywhere"
HUGE = "1" * 5000
COLUMNS = ["question", "choice", "choice_2", "consistency_id", "answer", "label", "icm_label", "icm_score", "prompt",
           "chosen", "rejected", "id", "reference"]
COMMANDS = ("label", "generate", "pairs", "dpo", "eval", "transfer")
SKIPPED_OPTIONS = {"output", "output_dir", "items", "run_dir", "recipe", "base_url", "vllm", "push_to_hub", "dataset",
                   "dataset_config", "task", "resume", "overwrite", "help", "quiet", "verbose", "iterative", "private",
                   "revision", "license", "tokenizer", "api_key_env"}
"""Options not fuzzed: paths of outputs (set by the harness), the network (servers, the Hub), run control."""


@dataclass(frozen=True)
class Raw:
    """A JSON number written as it is (a 5,000-digit integer cannot go through ``json.dumps``)."""

    text: str


def to_json(value: Any) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, list):
        return "[" + ", ".join(map(to_json, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {to_json(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


# ---- generated inputs --------------------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=2**63, max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["", " ", "True", "false", "1", "NaN", "The answer is 5.", "[bold]x[/]", "a\nb", "\ud800"]),
    st.builds(Raw, st.sampled_from([HUGE, "-" + HUGE, "1e999", "-1e999", "1" * 400 + ".5"])))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                      max_leaves=6)
column_names = st.one_of(st.sampled_from(COLUMNS), st.text(min_size=0, max_size=8))
rows = st.lists(st.dictionaries(column_names, values, max_size=8), min_size=0, max_size=6)
file_names = st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1,
                     max_size=20).filter(lambda n: n not in (".", "..") and len(n.encode()) < 200)


def _plain(value: Any) -> Any:
    """``value`` as Python for Arrow (a huge JSON number becomes its text)."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


@st.composite
def parquet_table(draw) -> bytes:
    """A Parquet file of typed columns: text, integers, floats, booleans, timestamps (out of range too), binary,
    lists, structs, all-null, with nulls anywhere."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = draw(st.integers(0, 5))
    kinds = {
        "string": (pa.string(), st.text(max_size=20)), "int64": (pa.int64(), st.integers(-2**63, 2**63 - 1)),
        "float64": (pa.float64(), st.floats(allow_nan=True, allow_infinity=True)), "bool": (pa.bool_(), st.booleans()),
        "timestamp": (pa.timestamp("us"), st.integers(-2**63 + 1, 2**63 - 1)), "binary": (pa.binary(), st.binary(
            max_size=8)), "list": (pa.list_(pa.int64()), st.lists(st.integers(-5, 5), max_size=3)),
        "struct": (pa.struct([("text", pa.string())]), st.fixed_dictionaries({"text": st.text(max_size=5)})),
        "null": (pa.null(), st.none())}
    columns = {}
    for name in draw(st.lists(column_names, min_size=1, max_size=6, unique=True)):
        kind, strategy = kinds[draw(st.sampled_from(sorted(kinds)))]
        cells = draw(st.lists(st.one_of(st.none(), strategy), min_size=n, max_size=n))
        columns[name] = pa.array(cells, kind) if kind != pa.timestamp("us") else \
            pa.array(cells, pa.int64()).cast(kind)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink)
    return sink.getvalue().to_pybytes()


def _csv(records: list[dict[str, Any]]) -> str:
    import csv
    import io

    header = list(dict.fromkeys(k for r in records for k in r))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    for r in records:
        writer.writerow([to_json(r[k]) if isinstance(r.get(k), (list, dict, Raw)) else r.get(k, "") for k in header])
    return out.getvalue()


@st.composite
def table_file(draw) -> tuple[str, bytes]:
    """(file name, bytes) of a generated table in one of the formats, or garbage with a table's suffix."""
    fmt = draw(st.sampled_from([".jsonl", ".json", ".csv", ".parquet", ".parquet-rows", ".bytes"]))
    stem = draw(file_names)
    if fmt == ".parquet":
        return stem + ".parquet", draw(parquet_table())
    if fmt == ".bytes":
        return stem + draw(st.sampled_from([".jsonl", ".json", ".csv", ".parquet", ".txt", ""])), draw(st.binary())
    records = draw(rows)
    if fmt == ".parquet-rows":  # rows as Arrow infers them (skipped when it cannot)
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        try:
            pq.write_table(pa.Table.from_pylist([_plain(r) for r in records]), sink)
        except (pa.ArrowException, ValueError, TypeError, OverflowError):  # rows Parquet cannot hold: JSONL
            return stem + ".jsonl", "".join(to_json(r) + "\n" for r in records).encode("utf-8", "surrogatepass")
        return stem + ".parquet", sink.getvalue().to_pybytes()
    text = {".jsonl": lambda: "".join(to_json(r) + "\n" for r in records), ".json": lambda: to_json(records),
            ".csv": lambda: _csv(records)}[fmt]()
    return stem + fmt, text.encode("utf-8", "surrogatepass")


@st.composite
def report_state(draw) -> dict[str, str]:
    """Files of a run for ``icm report``: a label run directory, a pairs report or a transfer directory, holding
    generated JSON objects whose keys are the real ones and whose values are anything."""
    keys = {"r/run.json": ["model", "claims", "searched", "true_share", "trajectories", "outcomes", "config", "output",
                           "iterative", "gold_accuracy"],
            "p.report.json": ["rows", "questions", "label_balance", "candidate_pairs", "pairs", "questions_with_pairs",
                              "pairs_per_question", "questions_skipped", "dropped", "quality", "splits"],
            "t/transfer.json": ["mode", "labeller", "policy", "held_out", "accuracy_before", "config", "arms",
                                "questions", "timings"]}
    name = draw(st.sampled_from(sorted(keys)))
    chosen = draw(st.lists(st.sampled_from(keys[name]), unique=True))
    obj = {k: draw(values) for k in chosen}
    return {name: to_json(obj) if draw(st.booleans()) else to_json(obj)[:draw(st.integers(0, 40))]}


option_values = st.one_of(
    st.sampled_from(["nan", "-nan", "inf", "-inf", HUGE, "-" + HUGE, "-1", "0", "-0", "", " ", "1e999", "0.5", "1",
                     "2", "4294967296", "-4294967296", "a|b", ",", "[bold]x[/]", "\\", "\\x", "all-linear"]),
    st.integers().map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=12))


# ---- the invariant -----------------------------------------------------------------------------------------------


def snapshot(d: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for p in sorted(d.rglob("*")):
        out[str(p.relative_to(d))] = p.read_bytes() if p.is_file() and not p.is_symlink() else None
    return out


@dataclass
class Tally:
    """What the long run saw: outcomes per command and every violation of the invariant."""

    runs: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)

    def add(self, command: str, outcome: str) -> None:
        self.runs += 1
        key = f"{command}: {outcome}"
        self.outcomes[key] = self.outcomes.get(key, 0) + 1


TALLY = Tally()
STOP_AT_FIRST = True
"""Raise on the first violation (the tests: hypothesis shrinks it); the long run counts them all and goes on."""


def _valid(command: str, d: Path) -> bool:
    """The output of a command that exited 0 is there and readable."""
    from icm.data.io import read_records

    if command == "pairs":
        return bool(read_records(d / "out" / "p.parquet")) and "pairs" in json.loads(
            (d / "out" / "p.report.json").read_text())
    if command == "report":
        return (d / "out" / "page.html").read_text().startswith("<!doctype html>")
    return True


def check(command: str, argv: list[str], d: Path) -> None:
    """Run ``icm argv`` in ``d`` and assert the invariant (module doc); counted in :data:`TALLY`."""
    from typer.testing import CliRunner

    from icm.cli import app

    before = snapshot(d)
    with _cwd(d):
        result = CliRunner().invoke(app, argv)
    lines = result.output.strip().splitlines()
    problem = None
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        problem = f"raised {type(result.exception).__name__}: {result.exception}"
    elif "Traceback" in result.output:
        problem = "printed a traceback"
    elif result.exit_code == 2 and len(lines) > 1:
        problem = f"{len(lines)} lines"
    elif result.exit_code not in (0, 2):
        problem = f"exit {result.exit_code}: {lines[-1] if lines else ''}"
    elif result.exit_code == 0 and not _valid(command, d):
        problem = "exit 0 without valid output"
    elif {k: v for k, v in snapshot(d).items() if k in before} != before:
        problem = "changed a file that was there"
    TALLY.add(command, "violation" if problem else "exit 0" if result.exit_code == 0 else "exit 2")
    if problem:
        message = f"icm {' '.join(map(repr, argv))}: {problem}\n{result.output[-2000:]}"
        TALLY.violations.append(message)
        if STOP_AT_FIRST:
            raise AssertionError(message)


@contextlib.contextmanager
def _cwd(d: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(d)
    try:
        yield
    finally:
        os.chdir(old)


def command_line(command: str, input_name: str) -> list[str]:
    """``icm COMMAND`` on ``input_name`` with its outputs under ``out/`` and the model that does not exist."""
    model = ["--model", NO_MODEL]
    return {"label": ["label", input_name, "-o", "out/labels.parquet", *model],
            "generate": ["generate", input_name, "-o", "out/c.parquet", *model],
            "pairs": ["pairs", input_name, "-o", "out/p.parquet"],
            "dpo": ["dpo", input_name, "-o", "out/policy", *model],
            "eval": ["eval", input_name, "-o", "out/e.json", "--items", "out/items.jsonl", *model],
            "transfer": ["transfer", input_name, "-o", "out/run", "--labeller", NO_MODEL, "--policy", NO_MODEL,
                         "--eval-size", "1"]}[command]


GOOD_INPUT = {  # an input each command accepts, so that a bad option value is what fails
    "label": '{"question": "What is 2 + 3?", "choice": "The answer is 5.", "consistency_id": 0, "answer": "5"}\n',
    "generate": '{"question": "What is 2 + 3?", "answer": "5"}\n',
    "pairs": "".join(json.dumps({"question": "q", "choice": c, "consistency_id": 0, "icm_label": c == "a",
                                 "icm_score": 1.0 if c == "a" else -1.0}) + "\n" for c in "ab"),
    "dpo": '{"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"}\n',
    "eval": '{"question": "What is 2 + 3?", "answer": "5"}\n',
    "transfer": "".join(json.dumps({"question": f"What is {k} + 3?", "answer": str(k + 3)}) + "\n" for k in range(4)),
}


def fuzzable_options(command: str) -> list[tuple[str, bool]]:
    """(long option name, is a flag) of the options of ``icm COMMAND`` that the option fuzz sets."""
    import typer.main

    from icm.cli import app

    click_command = typer.main.get_command(app).commands[command]
    out = []
    for param in click_command.params:
        if param.param_type_name != "option" or param.name in SKIPPED_OPTIONS:
            continue
        out.append((next(o for o in param.opts if o.startswith("--")), bool(param.is_flag)))
    return out


def fuzz_tables(command: str, name: str, content: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / name).write_bytes(content)
        check(command, command_line(command, name), d)


def fuzz_report(files: dict[str, str], as_dir: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for name, text in files.items():
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_text(text, encoding="utf-8", errors="surrogatepass")
        name = next(iter(files))
        target = str(Path(name).parent) if as_dir and "/" in name else name
        check("report", ["report", target, "-o", "out/page.html"], d)


def fuzz_options(command: str, settings_: list[tuple[str, str | None]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "in.jsonl").write_text(GOOD_INPUT[command])
        argv = command_line(command, "in.jsonl")
        for option, value in settings_:
            argv += [option] if value is None else [option, value]
        check(command, argv, d)


def fuzz_recipe(command: str, recipe: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "in.jsonl").write_text(GOOD_INPUT[command])
        (d / "r.yaml").write_text(recipe, encoding="utf-8", errors="surrogatepass")
        check(command, command_line(command, "in.jsonl") + ["--config", "r.yaml"], d)


@st.composite
def recipe_text(draw, options: list[tuple[str, bool]]) -> str:
    """A ``--config`` recipe of a command's own keys (dashes or underscores) with YAML values of any type."""
    import yaml

    keys = [name.lstrip("-") for name, _ in options]
    yaml_values = st.one_of(values.map(_plain), option_values, st.sampled_from([float("nan"), float("inf"), 10**40]))
    separator = draw(st.sampled_from("-_"))
    mapping = draw(st.dictionaries(st.sampled_from(keys).map(lambda k: k.replace("-", separator)), yaml_values,
                                   min_size=1, max_size=3))
    text = yaml.safe_dump(mapping, allow_unicode=True)
    return draw(st.sampled_from([text, text[:len(text) // 2], f"{text}\nlimit: {HUGE}\n", "- a list\n", "{"]))


@st.composite
def option_settings(draw, options: list[tuple[str, bool]]) -> list[tuple[str, str | None]]:
    chosen = draw(st.lists(st.sampled_from(options), min_size=1, max_size=3, unique=True))
    return [(name, None if flag else draw(option_values)) for name, flag in chosen]


# ---- the properties (the test's short profile and the long run share them) ---------------------------------------

PROFILE = settings(deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=False)


@given(command=st.sampled_from(COMMANDS), table=table_file())
def property_tables(command: str, table: tuple[str, bytes]) -> None:
    fuzz_tables(command, *table)


@given(files=report_state(), as_dir=st.booleans())
def property_report(files: dict[str, str], as_dir: bool) -> None:
    fuzz_report(files, as_dir)


@given(data=st.data(), command=st.sampled_from(COMMANDS))
def property_options(data, command: str) -> None:
    fuzz_options(command, data.draw(option_settings(fuzzable_options(command))))


@given(data=st.data(), command=st.sampled_from(COMMANDS))
def property_recipes(data, command: str) -> None:
    fuzz_recipe(command, data.draw(recipe_text(fuzzable_options(command))))


PROPERTIES = {"tables": property_tables, "report": property_report, "options": property_options,
              "recipes": property_recipes}


def run(examples: int, seed: int | None = None) -> Tally:
    """Every property with ``examples`` examples each, every violation counted in :data:`TALLY` (none stops it)."""
    global STOP_AT_FIRST
    STOP_AT_FIRST = False
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name, prop in PROPERTIES.items():
        test = settings(PROFILE, max_examples=examples)(prop)
        if seed is not None:
            from hypothesis import seed as hypothesis_seed

            test = hypothesis_seed(seed)(test)
        started = time.perf_counter()
        before = len(TALLY.violations)
        try:
            test()
            verdict = "held" if len(TALLY.violations) == before else f"{len(TALLY.violations) - before} violations"
        except Exception as error:  # the harness itself (a generator that cannot write its table)
            verdict = f"HARNESS ERROR: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        print(f"{name}: {verdict} ({time.perf_counter() - started:.0f} s)", flush=True)
    return TALLY


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=2000, help="Examples per property.")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None, help="Write the tally as JSON here.")
    args = parser.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    tally = run(args.examples, args.seed)
    print(f"\n{tally.runs} commands run; outcomes:")
    for key, n in sorted(tally.outcomes.items()):
        print(f"  {key}: {n}")
    print(f"violations: {len(tally.violations)}")
    for v in dict.fromkeys(v.splitlines()[0] for v in tally.violations):
        print("  " + v)
    if args.output:
        args.output.write_text(json.dumps({"examples_per_property": args.examples, "runs": tally.runs,
                                           "outcomes": tally.outcomes, "violations": tally.violations}, indent=2))
    return 0 if not tally.violations else 1


if __name__ == "__main__":
    import sys

    sys.exit(main())
