"""Crash harness: kill -9 a stage at random moments, resume it each time, and compare with an uninterrupted run.

For each stage (label, generate, dpo, transfer) the harness runs the ``icm`` command once to completion (the
reference), then runs it again in a fresh directory and SIGKILLs it after a seeded random delay drawn uniformly
from [0.9 x the time the reference took to show progress on disk, reference time] (before that the process is
importing libraries and loading the model, and a kill there tests nothing), restarts the same command (which
resumes), kills it again, and so on, until it finishes on its own or ``--kills`` kills have landed mid-work (with
state on disk; for dpo: between two checkpoints, the final model not yet saved); then it lets the command finish
and compares the outputs with the reference. A kill *survived* when the run it interrupted ended with exactly the
reference outputs (every kill of a chain shares the verdict of the chain's end). When a chain ends before enough
kills have landed, a new chain starts in a new directory.

What is compared, per stage (everything else a run writes is bookkeeping: timings, token counts):

- label: the labels Parquet file, data and metadata, bit for bit (labels, scores, every input column);
- generate: the candidates table bit for bit, and its metadata except the report's timings and resume counter;
- dpo: the trained adapter weights (``adapter_model.safetensors``) bit for bit, and ``icm_dpo.json`` except
  timings and ``resumed_from``;
- transfer: ``transfer.json`` except ``timings``, ``skipped_this_run`` and DPO's seconds.

Both runs use the same relative paths (each runs in its own directory), so recorded commands compare equal.
The model is the tests' tiny random Llama (built offline), so this measures the resume logic, not a model.

    python -m bench.chaos --stages label,generate,transfer --kills 10
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

Json = dict[str, Any]


def _without(obj: Json, *keys: str) -> Json:
    return {k: v for k, v in obj.items() if k not in keys}


def _parquet(path: Path) -> tuple[list[dict[str, Any]], Json]:
    import pyarrow.parquet as pq

    from icm.data.io import read_parquet_metadata

    return pq.read_table(path).to_pylist(), read_parquet_metadata(path)


def _label_result(d: Path) -> Any:
    return _parquet(d / "labels.parquet")


def _generate_result(d: Path) -> Any:
    rows, meta = _parquet(d / "candidates.parquet")
    report = _without(meta["report"], "seconds", "tokens_per_second", "resumed_questions", "tokens_generated",
                      "candidates_sampled", "duplicates_removed")
    return rows, _without(meta, "report") | {"report": report}


def _dpo_result(d: Path) -> Any:
    summary = json.loads((d / "policy" / "icm_dpo.json").read_text())
    metrics = _without(summary["metrics"], "train_runtime")
    return ((d / "policy" / "adapter_model.safetensors").read_bytes(),
            _without(summary, "seconds", "seconds_per_step", "resumed_from", "metrics") | {"metrics": metrics})


def _transfer_result(d: Path) -> Any:
    report = json.loads((d / "run" / "transfer.json").read_text())
    if report.get("dpo"):
        report["dpo"] = _without(report["dpo"], "seconds_per_step") | {
            "metrics": _without(report["dpo"]["metrics"], "train_runtime")}
    return _without(report, "timings", "skipped_this_run")


def _label_progress(d: Path) -> str:
    try:
        state = json.loads((d / "labels.run" / "checkpoint.json").read_text())
    except (OSError, ValueError):
        return "no checkpoint yet"
    current = state.get("current") or {}
    where = ", ".join(f"batch {b} step {s['iteration']}" for b, s in current.items()) or "between batches"
    return f"{len(state['done'])} batches done, {where}"


def _generate_progress(d: Path) -> str:
    path = d / "candidates.partial.jsonl"
    return f"{len(path.read_text().splitlines())} samples in the checkpoint" if path.exists() else "no checkpoint yet"


def _dpo_progress(d: Path) -> str:
    steps = sorted(int(p.name.split("-")[1]) for p in (d / "policy").glob("checkpoint-*"))
    final = ", final model saved" if (d / "policy" / "adapter_model.safetensors").exists() else ""
    return (f"checkpoints {steps}" if steps else "no checkpoint yet") + final


def _dpo_mid(state: str) -> bool:
    """Between two checkpoints of the training: one is on disk and the final model is not."""
    return state.startswith("checkpoints") and "final" not in state


def _transfer_progress(d: Path) -> str:
    try:
        done = list(json.loads((d / "run" / "stages.json").read_text())["seconds"])
    except (OSError, ValueError, KeyError):
        done = []
    return "stages done: " + (", ".join(done) or "none")


@dataclass
class Stage:
    name: str
    args: list[str]
    """The ``icm`` command line, run in the stage's directory (``{model}`` and ``{inputs}`` are filled in)."""
    result: Callable[[Path], Any]
    progress: Callable[[Path], str]
    notes: str = ""
    mid: Callable[[str], bool] | None = None
    """Whether a kill that left this progress on disk landed in the middle of the work [default: any progress]."""


DPO_BENCH_STEPS, DPO_BENCH_SAVE_STEPS = "240", "10"
"""Enough steps that the training outlasts the restart (imports, model loading), so kills land between checkpoints."""


def stages(model: str, inputs: Path, size: str = "bench") -> dict[str, Stage]:
    """The commands; ``size="test"`` makes them small enough for the test suite."""
    small = size == "test"
    n = "8" if small else "16"
    return {
        "label": Stage("label", ["label", str(inputs / "claims.jsonl"), "-o", "labels.parquet", "--model", model,
                                 "--dtype", "fp32", "--batch-size", "9", "--iterations", "24" if small else "80",
                                 "--seed", "3", "--resume"], _label_result, _label_progress,
                       "labels.parquet bit-identical (labels, scores, every column, metadata)"),
        "generate": Stage("generate", ["generate", "--task", "arithmetic", "--limit", n, "--model", model,
                                       "--dtype", "fp32", "--num-candidates", "4", "--batch-size", "4",
                                       "--max-new-tokens", "12" if small else "24", "--temperature", "1.0",
                                       "-o", "candidates.parquet", "--resume"], _generate_result, _generate_progress,
                          "candidates table bit-identical; metadata identical but for timings and counters"),
        "dpo": Stage("dpo", ["dpo", str(inputs / "pairs.jsonl"), "--model", model, "-o", "policy", "--max-steps",
                             "6" if small else DPO_BENCH_STEPS, "--batch-size", "2", "--save-steps",
                             "1" if small else DPO_BENCH_SAVE_STEPS, "--precision", "fp32", "--resume"],
                     _dpo_result, _dpo_progress,
                     "adapter weights bit-identical; icm_dpo.json identical but for timings and resumed_from",
                     mid=_dpo_mid),
        "transfer": Stage("transfer", ["transfer", "--task", "arithmetic", "--limit", n, "--eval-size", "4",
                                       "--labeller", model, "--policy", model, "-o", "run", "--num-candidates", "2",
                                       "--max-new-tokens", "8", "--icm-iterations", "16", "--max-steps", "3",
                                       "--batch-size", "2", "--arms", "icm,random", "--dtype", "fp32",
                                       "--bootstrap-samples", "200"], _transfer_result, _transfer_progress,
                          "transfer.json identical but for timings (and the list of stages skipped by the last run)"),
    }


def write_inputs(inputs: Path) -> None:
    """The claims (label) and pairs (dpo) files the stages read."""
    inputs.mkdir(parents=True, exist_ok=True)
    claims, pairs = [], []
    for q in range(9):
        a, b = 2 + q, 3 + 2 * q
        for d in (0, 1, 3):
            claims.append({"question": f"What is {a} + {b}?", "choice": f"The answer is {a + b + d}.",
                           "consistency_id": q, "answer": str(a + b + d), "label": d == 0})
        pairs.append({"prompt": f"What is {a} + {b}?", "chosen": f"The answer is {a + b}.",
                      "rejected": f"The answer is {a + b + 1}."})
    (inputs / "claims.jsonl").write_text("".join(json.dumps(r) + "\n" for r in claims))
    (inputs / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs * 3))


def environment(work: Path) -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "ICM_CHECKPOINT_SECONDS": "0", "HF_HUB_OFFLINE": "1",
                         "TOKENIZERS_PARALLELISM": "false", "ICM_CACHE": str(work / "cache"),
                         "PYTHONPATH": str(ROOT)}


def _start(stage: Stage, d: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start the command in ``d``, in a session of its own (a kill reaches all of it); stderr goes to ``d``.log."""
    d.mkdir(parents=True, exist_ok=True)
    with open(d.with_suffix(".log"), "ab") as err:
        return subprocess.Popen([sys.executable, "-m", "icm", *stage.args], cwd=d, env=env,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)


def _check(proc: subprocess.Popen, stage: Stage, d: Path) -> None:
    if proc.returncode != 0:
        tail = d.with_suffix(".log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{stage.name} in {d} exited {proc.returncode}: {tail}")


def _finish(stage: Stage, d: Path, env: dict[str, str], timeout: float) -> None:
    proc = _start(stage, d, env)
    proc.wait(timeout=timeout)
    _check(proc, stage, d)


def _reference(stage: Stage, d: Path, env: dict[str, str], timeout: float) -> tuple[float, float]:
    """Run the command to completion in ``d``; returns its duration and when its progress first showed on disk
    (imports and model loading come before: kills are drawn after 90% of that, where there is state to lose)."""
    started = time.perf_counter()
    proc = _start(stage, d, env)
    initial, first = stage.progress(d), None
    while proc.poll() is None:
        if first is None and stage.progress(d) != initial:
            first = time.perf_counter() - started
        if time.perf_counter() - started > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.05)
    _check(proc, stage, d)
    total = time.perf_counter() - started
    return total, first if first is not None else 0.0


@dataclass
class Outcome:
    stage: str
    tried: int = 0
    survived: int = 0
    mid_tried: int = 0
    """Kills that landed in the middle of the work (``Stage.mid``: state on disk, the work not finished)."""
    mid_survived: int = 0
    reference_seconds: float = 0.0
    first_progress_seconds: float = 0.0
    kills: list[Json] = field(default_factory=list)
    compared: str = ""

    def line(self) -> str:
        share = self.survived / self.tried if self.tried else float("nan")
        return (f"{self.stage}: {self.survived}/{self.tried} kills survived ({share:.0%}); landed mid-work: "
                f"{self.mid_survived}/{self.mid_tried} survived")


def chaos(stage: Stage, work: Path, kills: int, seed: int, timeout: float = 1800.0, log=print) -> Outcome:
    """Run ``stage`` once uninterrupted in ``work/ref``, then in chains of kill -9 and resume (see the module doc)
    until ``kills`` kills have landed mid-work (``Stage.mid``), or ``5 * kills`` in all."""
    env = environment(work)
    ref = work / f"{stage.name}-ref"
    shutil.rmtree(ref, ignore_errors=True)
    ref.with_suffix(".log").unlink(missing_ok=True)
    outcome = Outcome(stage.name, compared=stage.notes)
    outcome.reference_seconds, outcome.first_progress_seconds = _reference(stage, ref, env, timeout)
    expected = stage.result(ref)
    log(f"{stage.name}: reference run {outcome.reference_seconds:.1f} s, first progress on disk after "
        f"{outcome.first_progress_seconds:.1f} s")
    rng = random.Random(seed)
    earliest = 0.9 * outcome.first_progress_seconds
    chain = 0
    mid = stage.mid or (lambda state, initial=stage.progress(work / "no-such-dir"): state != initial)
    while outcome.mid_tried < kills and outcome.tried < 5 * kills:
        d = work / f"{stage.name}-chaos-{chain}"
        shutil.rmtree(d, ignore_errors=True)
        d.with_suffix(".log").unlink(missing_ok=True)
        chain_kills: list[Json] = []
        while (outcome.mid_tried + sum(mid(k["state"]) for k in chain_kills) < kills
               and outcome.tried + len(chain_kills) < 5 * kills):
            delay = rng.uniform(earliest, outcome.reference_seconds)
            proc = _start(stage, d, env)
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                chain_kills.append({"chain": chain, "after_seconds": round(delay, 2), "state": stage.progress(d)})
                continue
            _check(proc, stage, d)
            break  # finished before the kill: this chain is over
        _finish(stage, d, env, timeout)  # a no-op rerun when the last start finished: that must hold too
        same = stage.result(d) == expected
        for k in chain_kills:
            k["survived"], k["mid_work"] = same, mid(k["state"])
            log(f"  kill {outcome.tried + 1} (chain {chain}) after {k['after_seconds']:.1f} s, {k['state']}"
                + ("" if k["mid_work"] else " (not mid-work)") + ": " + ("survived" if same else "OUTPUT DIFFERS"))
            outcome.tried += 1
            outcome.survived += same
            outcome.mid_tried += k["mid_work"]
            outcome.mid_survived += same and k["mid_work"]
        outcome.kills += chain_kills
        chain += 1
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", default="label,generate,dpo,transfer")
    parser.add_argument("--kills", type=int, default=10, help="Kills that must land mid-work per stage.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="Work directory [default: a temporary one].")
    parser.add_argument("--size", default="bench", choices=("bench", "test"))
    parser.add_argument("--output", type=Path, default=None, help="Write the outcomes as JSON here.")
    args = parser.parse_args(argv)

    import tempfile

    from tests.conftest import build_tiny_model

    work = args.work or Path(tempfile.mkdtemp(prefix="icm-chaos-"))
    model = str(build_tiny_model(work / "tiny-model")) if not (work / "tiny-model").exists() else str(
        work / "tiny-model")
    write_inputs(work / "inputs")
    table = stages(model, work / "inputs", args.size)
    outcomes = []
    for i, name in enumerate(s.strip() for s in args.stages.split(",")):
        outcome = chaos(table[name], work, args.kills, args.seed + i)
        outcomes.append(outcome)
        print(outcome.line(), flush=True)
    print("\n".join(["", "kills survived / tried:"] + [f"  {o.line()}; compared: {o.compared}" for o in outcomes]))
    if args.output:
        args.output.write_text(json.dumps([o.__dict__ for o in outcomes], indent=2))
    return 0 if all(o.survived == o.tried for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
