"""Issue 13: hostile input (a fuzz table over every command), damaged state, a full disk, secrets, safe loading.

The fuzz cases run the CLI in-process with a model that does not exist: each error must be found before any
model loads, or the message would be about the model instead."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from icm.cli import app
from icm.data.io import check_output, read_records, scrub, write_json

runner = CliRunner()
NO_MODEL = "no-such-model-anywhere"
CLAIM = {"question": "What is 2 + 3?", "choice": "The answer is 5.", "consistency_id": 0, "answer": "5"}
LABELLED = CLAIM | {"icm_label": True, "icm_score": 1.5}
PAIR = {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"}


def jsonl(*rows: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def unreadable(path: Path) -> None:
    """A file that cannot be read: mode 000 for a normal user; root reads anything, so for root a link to
    /proc/self/mem, whose first page reading fails with EIO (a real unreadable file, seen through the same
    OSError)."""
    if os.getuid() == 0:
        path.symlink_to("/proc/self/mem")
    else:
        path.write_text(jsonl(CLAIM))
        path.chmod(0)


def many_rows(path: Path) -> None:
    """50,000 good claims, then one with an empty choice: the error must name row 50,001, quickly."""
    path.write_text(jsonl(*[CLAIM] * 50_000, CLAIM | {"choice": ""}))


# (id, files to create: name -> content (str, bytes, or a function of the path), command line with {d} the
#  directory, the pieces the one-line error must contain)
Files = dict[str, "str | bytes | Callable[[Path], None]"]
FUZZ: list[tuple[str, Files, str, list[str]]] = [
    # ---- icm label
    ("label-bad-json-line", {"c.jsonl": jsonl(CLAIM) + "{broken\n"}, "label {d}/c.jsonl -o {d}/out.parquet",
     ["c.jsonl, row 2: malformed JSON line"]),
    ("label-not-utf8", {"c.jsonl": jsonl(CLAIM).encode() + b'{"question": "q", "choice": "caf\xe9"}\n'},
     "label {d}/c.jsonl -o {d}/out.parquet", ["c.jsonl, row 2: not UTF-8 text"]),
    ("label-empty-file", {"c.jsonl": ""}, "label {d}/c.jsonl -o {d}/out.parquet", ["c.jsonl: file has no rows"]),
    ("label-csv-header-only", {"c.csv": "question,choice\r\n"}, "label {d}/c.csv -o {d}/out.parquet",
     ["c.csv: file has no rows"]),
    ("label-missing-column", {"c.jsonl": jsonl(CLAIM, {"question": "q"})}, "label {d}/c.jsonl -o {d}/out.parquet",
     ["c.jsonl, row 2, field 'choice': missing or empty"]),
    ("label-renamed-column", {"c.jsonl": jsonl({"prompt": "q", "choice": "a"})}, "label {d}/c.jsonl -o {d}/out.parquet",
     ["c.jsonl, row 1, field 'question': missing or empty"]),
    ("label-duplicate-key", {"c.jsonl": '{"question": "q", "choice": "a", "choice": "b"}\n'},
     "label {d}/c.jsonl -o {d}/out.parquet", ["c.jsonl, row 1, field 'choice': duplicate key"]),
    ("label-duplicate-csv-column", {"c.csv": "question,choice,choice\nq,a,b\n"}, "label {d}/c.csv -o {d}/out.parquet",
     ["c.csv, field 'choice': duplicate column"]),
    ("label-ragged-csv-row", {"c.csv": "question,choice\nq,a\nq,b,extra\n"}, "label {d}/c.csv -o {d}/out.parquet",
     ["c.csv, row 2: 3 cells where the header has 2 columns"]),
    ("label-object-where-text", {"c.jsonl": jsonl(CLAIM | {"choice": {"text": "5"}})},
     "label {d}/c.jsonl -o {d}/out.parquet", ["c.jsonl, row 1, field 'choice': expected text, got a JSON object"]),
    ("label-null-question", {"c.jsonl": jsonl(CLAIM, CLAIM | {"question": None})},
     "label {d}/c.jsonl -o {d}/out.parquet", ["c.jsonl, row 2, field 'question': missing or empty"]),
    ("label-wrong-type-gold", {"c.jsonl": jsonl(CLAIM | {"label": "maybe"})}, "label {d}/c.jsonl -o {d}/out.parquet",
     ["c.jsonl, row 1, field 'label': not a boolean"]),
    ("label-10mb-line", {"c.jsonl": jsonl(CLAIM | {"choice": "x" * 10_485_760})},
     "label {d}/c.jsonl -o {d}/out.parquet",
     ["c.jsonl, row 1, field 'choice': 10,485,760 characters, over the limit"]),
    ("label-50k-rows", {"c.jsonl": many_rows}, "label {d}/c.jsonl -o {d}/out.parquet",
     ["c.jsonl, row 50001, field 'choice': missing or empty"]),
    ("label-parquet-nested", {"c.parquet": parquet(pa.table({"question": ["q"], "choice": [{"text": "a", "n": 1}]}))},
     "label {d}/c.parquet -o {d}/out.parquet", ["c.parquet, row 1, field 'choice': expected text, got a JSON object"]),
    ("label-corrupt-parquet", {"c.parquet": parquet(pa.table({"question": ["q"], "choice": ["a"]}))[:-20]},
     "label {d}/c.parquet -o {d}/out.parquet", ["c.parquet: not a readable Parquet file"]),
    ("label-directory-input", {"c.jsonl": lambda p: p.mkdir()}, "label {d}/c.jsonl -o {d}/out.parquet",
     ["c.jsonl: is a directory, not a file"]),
    ("label-unreadable-input", {"c.jsonl": unreadable}, "label {d}/c.jsonl -o {d}/out.parquet",
     ["c.jsonl: cannot read the file"]),
    ("label-output-is-input", {"c.parquet": parquet(pa.table({"question": ["q"], "choice": ["a"]}))},
     "label {d}/c.parquet -o {d}/c.parquet", ["c.parquet: the output is the input file"]),
    ("label-output-dir-missing", {"c.jsonl": jsonl(CLAIM), "blocker": "a file"},
     "label {d}/c.jsonl -o {d}/blocker/sub/out.parquet",
     ["out.parquet: cannot create the directory", "blocker is a file"]),
    # ---- icm generate
    ("generate-duplicate-ids", {"q.jsonl": jsonl({"id": 1, "question": "a"}, {"id": 1, "question": "b"})},
     "generate {d}/q.jsonl -o {d}/out.parquet --id-field id", ["q.jsonl, row 2, field 'id': duplicate id '1'"]),
    ("generate-list-where-text", {"q.jsonl": jsonl({"question": "a"}, {"question": ["a", "b"]})},
     "generate {d}/q.jsonl -o {d}/out.parquet", ["q.jsonl, row 2, field 'question': expected text, got a list"]),
    ("generate-output-is-directory", {"q.jsonl": jsonl({"question": "a"}), "outdir": lambda p: p.mkdir()},
     "generate {d}/q.jsonl -o {d}/outdir", ["outdir: is a directory; give a file path"]),
    # ---- icm pairs
    ("pairs-nan-score", {"l.jsonl": jsonl(LABELLED).replace("1.5", "NaN")}, "pairs {d}/l.jsonl -o {d}/out.parquet",
     ["l.jsonl, row 1, field 'icm_score': expected a finite number"]),
    ("pairs-wrong-type-label", {"l.jsonl": jsonl(LABELLED, LABELLED | {"icm_label": "maybe"})},
     "pairs {d}/l.jsonl -o {d}/out.parquet", ["l.jsonl, row 2, field 'icm_label': expected a boolean"]),
    ("pairs-object-where-text", {"l.jsonl": jsonl(LABELLED, LABELLED | {"choice": {"a": 1}, "icm_label": False})},
     "pairs {d}/l.jsonl -o {d}/out.parquet", ["l.jsonl, row 2, field 'choice': expected text, got a JSON object"]),
    ("pairs-output-is-input", {"l.jsonl": jsonl(LABELLED, LABELLED | {"choice": "6", "icm_label": False})},
     "pairs {d}/l.jsonl -o {d}/l.jsonl", ["l.jsonl: the output is the input file"]),
    # ---- icm dpo
    ("dpo-wrong-type", {"p.jsonl": jsonl(PAIR, PAIR | {"chosen": 5})}, "dpo {d}/p.jsonl -o {d}/policy",
     ["p.jsonl, row 2, field 'chosen': expected a string or a list of {role, content} messages"]),
    ("dpo-missing-column", {"p.csv": "prompt,chosen\nq,a\n"}, "dpo {d}/p.csv -o {d}/policy",
     ["p.csv, row 1, field 'rejected': missing or empty"]),
    ("dpo-output-dir-is-file", {"p.jsonl": jsonl(PAIR), "policy": "not a directory"}, "dpo {d}/p.jsonl -o {d}/policy",
     ["policy: exists and is not a directory"]),
    # ---- icm eval
    ("eval-no-reference", {"q.jsonl": jsonl({"question": "a", "answer": "1"}, {"question": "b"})},
     "eval {d}/q.jsonl -o {d}/out.json", ["q.jsonl, row 2, field 'answer': no reference answer"]),
    ("eval-claims-bad-gold", {"c.jsonl": jsonl(CLAIM | {"label": True}, CLAIM | {"label": [1]})},
     "eval {d}/c.jsonl -o {d}/out.json", ["c.jsonl, row 2, field 'label': not a boolean"]),
    ("eval-output-is-input", {"q.json": json.dumps([{"question": "a", "answer": "1"}])},
     "eval {d}/q.json -o {d}/q.json", ["q.json: the output is the input file"]),
]


def snapshot(d: Path) -> dict[str, bytes | None]:
    """Every file under ``d`` with its bytes (None: not readable as a file): what a failed run must not touch."""
    out: dict[str, bytes | None] = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(d))] = p.read_bytes()
        else:
            out[str(p.relative_to(d))] = None
    return out


def invoke(argv: list[str]):
    result = runner.invoke(app, argv)
    return result, " ".join(result.output.split())


def assert_one_line_error(result, text: str, pieces: list[str], code: int = 2) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    assert len(result.output.strip().splitlines()) == 1, result.output
    for piece in pieces:
        assert piece in text, (piece, text)


def make_files(d: Path, files: Files) -> None:
    """Create ``files`` under ``d``, in order: text, bytes, or a function of the path (a link, a FIFO, ...)."""
    for name, content in files.items():
        path = d / name
        if callable(content):
            content(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")


@pytest.mark.parametrize("files, command, pieces", [c[1:] for c in FUZZ], ids=[c[0] for c in FUZZ])
def test_fuzz_one_line_exit_2_nothing_changed(tmp_path, files, command, pieces):
    make_files(tmp_path, files)
    for out in ("out.parquet", "out.json"):  # an earlier result that a failed run must leave alone
        if not (tmp_path / out).exists():
            (tmp_path / out).write_bytes(b"previous result")
    before = snapshot(tmp_path)
    argv = command.format(d=tmp_path).split()
    result, text = invoke(argv + (["--model", NO_MODEL] if argv[0] != "pairs" else []))
    assert_one_line_error(result, text, pieces)
    assert snapshot(tmp_path) == before


def test_fuzz_table_covers_every_command_with_25_cases():
    commands = {c[2].split()[0] for c in FUZZ}
    assert len(FUZZ) >= 25 and commands == {"label", "generate", "pairs", "dpo", "eval"}


@pytest.fixture
def mounted(tmp_path):
    """Mount a small tmpfs (``ro`` or a size) under tmp_path; skips where mounting is not allowed."""
    mounts = []

    def mount(name: str, options: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", str(path)], check=False)


def test_output_in_read_only_directory(tmp_path, mounted):
    """chmod does not stop root, so the read-only directory is a read-only mount when the tests run as root."""
    if os.getuid() == 0:
        ro = mounted("ro", "ro,size=64k")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
    (tmp_path / "c.jsonl").write_text(jsonl(CLAIM))
    result, text = invoke(["label", str(tmp_path / "c.jsonl"), "-o", str(ro / "out.parquet"), "--model", NO_MODEL])
    assert_one_line_error(result, text, ["out.parquet: cannot write in", "Read-only file system"
                                         if os.getuid() == 0 else "Permission denied"])


def test_well_formed_variants_are_read(tmp_path):
    """A UTF-8 byte order mark, CRLF line ends and a trailing newline are not errors."""
    rows = [{"question": "q1", "choice": "a"}, {"question": "q2", "choice": "b"}]
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + jsonl(*rows).replace("\n", "\r\n").encode() + b"\r\n")
    (tmp_path / "a.csv").write_bytes(b"\xef\xbb\xbfquestion,choice\r\nq1,a\r\nq2,b\r\n")
    (tmp_path / "a.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode() + b"\r\n")
    for name in ("a.jsonl", "a.csv", "a.json"):
        assert read_records(tmp_path / name) == rows, name


# ---- damaged state ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, message", [
    ('{"format": 4, "fingerprint": "x", "do', "damaged checkpoint (JSONDecodeError)"),
    ('{"fingerprint": "x", "done": {}, "current": {}}', "checkpoint of another icm version (format None"),
    ('{"format": 3, "fingerprint": "FP", "done": {}, "current": null}',
     "checkpoint of another icm version (format 3, this one reads 4)"),
    ('{"format": 4, "fingerprint": "FP", "done": {"0": {"labels": {}}}, "current": {}}', "damaged checkpoint"),
    ('{"format": 4, "fingerprint": "FP", "done": {}, "current": {"1": {"labels": {}}}}', "damaged checkpoint"),
    ('{"format": 4, "fingerprint": "other", "done": {}, "current": {}}', "checkpoint was made with other claims"),
])
def test_damaged_label_checkpoint_is_a_one_line_error(tiny_model_dir, tmp_path, content, message):
    from icm.config import ICMConfig
    from icm.data.claims import claims_from_records
    from icm.search import fingerprint

    claims = tmp_path / "c.jsonl"
    claims.write_text(jsonl(*[CLAIM | {"choice": f"The answer is {k}.", "answer": str(k)} for k in range(4)]))
    config = ICMConfig(iterations=4)
    expected = fingerprint(claims_from_records(read_records(claims)), config, tiny_model_dir)
    run_dir = tmp_path / "out.run"
    run_dir.mkdir()
    (run_dir / "checkpoint.json").write_text(content.replace("FP", expected))
    (tmp_path / "out.parquet").write_bytes(b"previous result")
    before = snapshot(tmp_path)
    result, text = invoke(["label", str(claims), "-o", str(tmp_path / "out.parquet"), "--model", tiny_model_dir,
                           "--iterations", "4", "--resume"])
    assert_one_line_error(result, text, [f"{run_dir / 'checkpoint.json'}: {message}", "delete", "--run-dir"])
    assert snapshot(tmp_path) == before


def test_generate_checkpoint_of_another_version_or_settings_is_refused(tmp_path):
    from icm.config import GenerationConfig
    from icm.data.tasks import arithmetic_questions
    from icm.generate import checkpoint_path, generate_file

    out = tmp_path / "c.parquet"
    line = {"format": 1, "fingerprint": "x", "question_id": "arithmetic-0-0", "batch": 0, "sample_index": 0,
            "text": "t", "num_tokens": 1}
    for record, message in [(line, "another icm version"), (line | {"format": 2}, "other questions, model")]:
        checkpoint_path(out).write_text(json.dumps(record) + "\n")
        with pytest.raises(Exception, match=message):
            generate_file(arithmetic_questions(2), out, NO_MODEL, GenerationConfig(), resume=True, progress=False)


def test_incomplete_dpo_checkpoint_is_removed_and_the_previous_one_used(tmp_path, caplog):
    from icm.dpo.training import _last_checkpoint

    for step in (1, 2, 3):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-1" / "trainer_state.json").write_text('{"global_step": 1}')
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text('{"global_st')  # killed while writing
    assert _last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert not (tmp_path / "checkpoint-3").exists() and "incomplete" in caplog.text


# ---- a full disk --------------------------------------------------------------------------------------------------


def test_full_disk_keeps_the_previous_file_and_says_so(tmp_path, mounted, monkeypatch):
    """On a 64 KiB tmpfs (or, where nothing can be mounted, a write that raises ENOSPC), `icm pairs` fails on one
    line with exit 1 and the previous pairs file is byte-identical."""
    rows = [LABELLED | {"consistency_id": q, "choice": os.urandom(1500).hex(), "icm_label": c == 0, "icm_score": -c}
            for q in range(40) for c in range(3)]  # incompressible: the pairs file is far over 64 KiB
    (tmp_path / "l.jsonl").write_text(jsonl(*rows))
    try:
        disk = mounted("disk", "size=64k")
    except pytest.skip.Exception:
        import errno

        disk = tmp_path / "disk"
        disk.mkdir()

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(pq, "write_table", full)
    previous = disk / "pairs.parquet"
    previous.write_bytes(b"previous pairs")
    before = snapshot(disk)
    result, text = invoke(["pairs", str(tmp_path / "l.jsonl"), "-o", str(previous)])
    assert_one_line_error(result, text, ["pairs.parquet: cannot write (", "No space left on device",
                                         "; the previous file is unchanged"], code=1)
    assert snapshot(disk) == before  # no temporary file left either


def test_failed_write_of_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.json"
    write_json(path, {"step": 1})
    monkeypatch.setattr(json, "dumps", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(Exception, match="previous file is unchanged"):
        write_json(path, {"step": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"step": 1} and [p.name for p in tmp_path.iterdir()] == ["checkpoint.json"]


# ---- secrets ------------------------------------------------------------------------------------------------------

TOKEN = "hf_PlantedTestToken0123456789abcdef"
API_KEY = "sk-planted-api-key-0123456789abcdefghij"


def test_scrub_hides_secret_options_values_and_environment(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_PASSWORD", "correct horse battery")
    text = f"icm label c.jsonl --api-key {API_KEY} --base-url http://x --token=abc 'correct horse battery'"
    out = scrub(text)
    assert API_KEY not in out and "abc" not in out and "correct horse" not in out
    assert "--api-key ***" in out and "--base-url http://x" in out
    assert scrub("--max-new-tokens 8 --key-field k") == "--max-new-tokens 8 --key-field k"


OPTION_TOKEN = "hf_GivenAsAnOptionValue0123456789"
CUSTOM_KEY = "custom-secret-in-a-variable-42"


def test_planted_tokens_reach_no_file_a_run_writes(tiny_model_dir, tmp_path, monkeypatch):
    """Every command, tokens in HF_TOKEN and OPENAI_API_KEY, in the variable --api-key-env names, and in option
    values (recorded in recipes, metadata, reports, the prompt column): none reaches a file a command writes."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("LLM_AUTH", CUSTOM_KEY)
    d, m = tmp_path, ["--model", tiny_model_dir]
    steps = [
        ["generate", "--task", "arithmetic", "--limit", "3", "--num-candidates", "2", "--max-new-tokens", "6",
         "--temperature", "1.0", "--dtype", "fp32", "-o", f"{d}/c.parquet", "--api-key-env", "LLM_AUTH",
         "--instruction", f"Solve it ({OPTION_TOKEN}).", *m],
        ["label", f"{d}/c.parquet", "-o", f"{d}/l.parquet", "--iterations", "4", "--dtype", "fp32", "--revision",
         OPTION_TOKEN, "--license", f"x-{OPTION_TOKEN}", *m],
        ["pairs", f"{d}/l.parquet", "-o", f"{d}/p.parquet", "--revision", OPTION_TOKEN, "--license", OPTION_TOKEN],
        ["dpo", f"{d}/p.parquet", "-o", f"{d}/policy", "--max-steps", "1", "--save-steps", "1", "--batch-size", "1",
         "--precision", "fp32", "--split", OPTION_TOKEN, *m],
        ["eval", "--task", "arithmetic", "--limit", "2", "--max-new-tokens", "4", "--dtype", "fp32", "-o",
         f"{d}/e.json", "--items", f"{d}/items.jsonl", "--model", f"{d}/policy", "--instruction", OPTION_TOKEN],
        ["transfer", "--task", "arithmetic", "--limit", "6", "--eval-size", "2", "--labeller", tiny_model_dir,
         "--policy", tiny_model_dir, "-o", f"{d}/run", "--num-candidates", "2", "--max-new-tokens", "4",
         "--icm-iterations", "4", "--max-steps", "1", "--batch-size", "1", "--arms", "icm,random", "--dtype", "fp32",
         "--bootstrap-samples", "100", "--split", OPTION_TOKEN, "--instruction", OPTION_TOKEN],
        ["report", f"{d}/l.run"], ["report", f"{d}/p.parquet"], ["report", f"{d}/run"],
    ]
    labels = [{"question": f"q{q}", "choice": f"c{c}", "consistency_id": q, "icm_label": c == 0, "icm_score": 1.0 - c}
              for q in range(3) for c in range(2)]
    for argv in steps:
        result = runner.invoke(app, argv)
        if argv[0] == "pairs" and result.exit_code != 0:  # random labels with no pair: use fixed ones
            (d / "l2.jsonl").write_text(jsonl(*labels))
            result = runner.invoke(app, ["pairs", f"{d}/l2.jsonl", "-o", f"{d}/p.parquet", *argv[4:]])
        assert result.exit_code == 0, (argv[0], result.output)
    written = [p for p in d.rglob("*") if p.is_file()]
    assert len(written) > 40 and {"trainer_state.json", "p.recipe.yaml", "report.html"} <= {p.name for p in written}
    for path in written:
        data = path.read_bytes()
        for secret in (TOKEN, API_KEY, OPTION_TOKEN, CUSTOM_KEY):
            assert secret.encode() not in data, (path, secret)


# ---- safe loading -------------------------------------------------------------------------------------------------


def test_pickle_weights_need_allow_pickle_and_remote_code_is_never_trusted(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    (tmp_path / "q.jsonl").write_text(jsonl({"question": "2 + 3?", "answer": "5"}))
    argv = ["eval", str(tmp_path / "q.jsonl"), "--max-new-tokens", "2", "--dtype", "fp32", "--model", str(pickled)]
    result, text = invoke(argv)
    assert_one_line_error(result, text, ["weights only as pickle (pytorch_model.bin)", "--allow-pickle"])

    seen: list[dict] = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    monkeypatch.delenv("ICM_ALLOW_PICKLE", raising=False)
    result = runner.invoke(app, ["--allow-pickle", *argv])
    assert result.exit_code == 0, result.output
    assert seen and all(k.get("trust_remote_code") is False for k in seen)
    assert all(k.get("use_safetensors") is None for k in seen)  # opted in: pickles allowed
    monkeypatch.setenv("ICM_ALLOW_PICKLE", "0")
    runner.invoke(app, ["eval", str(tmp_path / "q.jsonl"), "--max-new-tokens", "2", "--model", tiny_model_dir])
    assert seen[-1].get("use_safetensors") is True and seen[-1].get("trust_remote_code") is False


def test_check_output_accepts_a_new_file_in_a_new_directory(tmp_path):
    assert check_output(tmp_path / "a" / "b" / "out.parquet", tmp_path / "in.jsonl") == tmp_path / "a/b/out.parquet"
    assert not (tmp_path / "a").exists()
