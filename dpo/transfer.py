"""``icm transfer``: weak-from-strong (or self-) improvement, end to end and resumable.

generate (candidates by the policy) -> label (ICM, by the labeller) -> pairs -> DPO (the policy) -> accuracy
of the policy before and after on held-out questions, with a paired bootstrap CI of the change. Every
stage writes its output into the run directory and is skipped on a rerun when that output exists:

    split.json  candidates.parquet  labels.parquet  pairs.parquet  policy/  eval_before.json
    eval_after.json  transfer.json  transfer.png
"""

from __future__ import annotations

import gc
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from data.answers import closed_answers
from data.candidates import GenerationConfig, generate_file
from data.io import InputError, atomic_path, read_parquet_metadata, write_json
from data.pairs import PairsConfig, build_pairs, load_labels, write_pairs
from data.tasks import Question
from dpo.evaluation import EvalConfig, evaluate_question_list, paired_bootstrap
from dpo.training import SUMMARY_FILE, DPOTrainingConfig, train_dpo
from icm.label import label_file
from icm.search import ICMConfig

STAGES = ("eval_before", "generate", "label", "pairs", "dpo", "eval_after")  # in the order they run
console = Console(stderr=True)


@dataclass
class TransferConfig:
    """Settings of ``icm transfer``; each stage's own config is nested.

    Args:
        eval_size: held-out questions for the before/after evaluation: a fraction (0 < f < 1) or a count.
        generator: who samples the candidates: ``policy`` (on-policy pairs, the default) or ``labeller``.
        claims: what ICM labels: ``candidates``, ``answers`` or ``pivot`` (``icm.label.label_file``).
        bootstrap_samples: resamples of the held-out questions for the CI of the accuracy change.
        confidence: level of that CI.
        seed: seed of the train/held-out split (the stages have their own seeds).
        dtype: dtype for generation, labelling and evaluation (``auto``: bf16 where supported).
        generation: candidate sampling (``icm generate``).
        icm: the ICM search (``icm label``).
        pairs: pair construction (``icm pairs``).
        dpo: DPO training (``icm dpo``).
        eval: evaluation (``icm eval``).
    """

    eval_size: float = 0.25
    generator: str = "policy"
    claims: str = "candidates"
    bootstrap_samples: int = 2000
    confidence: float = 0.95
    seed: int = 0
    dtype: str = "auto"
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    icm: ICMConfig = field(default_factory=ICMConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    dpo: DPOTrainingConfig = field(default_factory=DPOTrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.generator not in ("policy", "labeller"):
            raise ValueError(f"generator must be 'policy' or 'labeller', got '{self.generator}'")
        if not (0 < self.eval_size < 1 or (self.eval_size >= 1 and float(self.eval_size).is_integer())):
            raise ValueError(f"eval_size must be a fraction in (0, 1) or a whole count, got {self.eval_size}")


def split_questions(questions: list[Question], eval_size: float, seed: int) -> tuple[list[Question], list[Question]]:
    """Seeded (train, held-out) split of the questions."""
    n_eval = int(eval_size) if eval_size >= 1 else round(len(questions) * eval_size)
    n_eval = max(1, n_eval)
    if n_eval >= len(questions):
        raise ValueError(f"{len(questions)} questions cannot leave {n_eval} held out and some to train on")
    order = list(range(len(questions)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return ([q for i, q in enumerate(questions) if i not in held], [q for i, q in enumerate(questions) if i in held])


def _free() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


class Stages:
    """Runs a stage unless its output exists; keeps the stages' timings in ``stages.json`` across reruns."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "stages.json"
        self.timings: dict[str, float] = {}
        if self.path.exists():
            self.timings = json.loads(self.path.read_text()).get("seconds", {})
        self.skipped: list[str] = []

    def run(self, name: str, output: Path, fn: Callable[[], Any]) -> bool:
        if output.exists():
            self.skipped.append(name)
            console.print(f"[dim]{name}: {output.name} exists, skipped[/]", highlight=False)
            return False
        console.print(f"[bold]{name}[/] -> {output}", highlight=False)
        start = time.perf_counter()
        fn()
        self.timings[name] = round(time.perf_counter() - start, 3)
        write_json(self.path, {"seconds": self.timings})
        _free()
        return True


def _pairs_stage(labels: Path, pairs: Path, config: TransferConfig, command: str | None) -> None:
    rows, metadata = load_labels(labels)
    kept, report = build_pairs(rows, config.pairs)
    if not kept:
        reasons = report["questions_skipped"] | report["dropped"]
        raise InputError(labels, "no preference pairs (" + ", ".join(f"{k}: {v}" for k, v in reasons.items())
                         + "); more candidates or questions are needed")
    write_pairs(pairs, kept, report, config.pairs, labels_metadata=metadata, command=command, source=labels)


def run_transfer(
    questions: list[Question],
    labeller: str,
    policy: str,
    output_dir: str | Path,
    config: TransferConfig | None = None,
    *,
    source: str = "<questions>",
    command: str | None = None,
    stop_after: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) the whole pipeline in ``output_dir`` and return the report written to ``transfer.json``.

    ``stop_after`` (a stage name) ends the run after that stage, e.g. ``pairs`` to train the policy into
    ``output_dir/policy`` with ``accelerate launch ... dpo`` on several GPUs, then rerun to evaluate.
    """
    config = config or TransferConfig()
    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"stop_after must be one of {', '.join(STAGES)}, got '{stop_after}'")
    run_dir = Path(output_dir)
    for row, q in enumerate(questions, start=1):
        if q.reference is None:
            raise InputError(source, "no reference answer (needed for the evaluation)", row=row, field="answer")
    try:
        train, heldout = split_questions(questions, config.eval_size, config.seed)
    except ValueError as error:
        raise InputError(source, str(error)) from None
    split = {"train": [q.id for q in train], "heldout": [q.id for q in heldout],
             "questions": {q.id: q.question for q in questions}}
    split_path = run_dir / "split.json"
    if split_path.exists():
        if {k: v for k, v in json.loads(split_path.read_text()).items() if k != "source"} != split:
            raise InputError(split_path, "this run directory was made for other questions or another split; "
                             "use a new --output-dir")
    else:
        write_json(split_path, {"source": source} | split)

    paths = {name: run_dir / f"{name}.parquet" for name in ("candidates", "labels", "pairs")}
    policy_dir = run_dir / "policy"
    evals = {name: run_dir / f"{name}.json" for name in ("eval_before", "eval_after")}
    generator = policy if config.generator == "policy" else labeller
    stages = Stages(run_dir)
    plan: list[tuple[str, Path, Callable[[], Any]]] = [
        ("eval_before", evals["eval_before"], lambda: evaluate_question_list(
            heldout, policy, config.eval, source=f"{source} (held out)", output=evals["eval_before"],
            dtype=config.dtype, progress=progress)),
        ("generate", paths["candidates"], lambda: generate_file(
            train, paths["candidates"], generator, config.generation, dtype=config.dtype, resume=True,
            command=command or "", progress=progress)),
        ("label", paths["labels"], lambda: label_file(
            paths["candidates"], paths["labels"], labeller, config.icm, run_dir=run_dir / "icm", resume=True,
            dtype=config.dtype, claims=config.claims, answers=closed_answers(config.generation.extractor),
            command=command or "")),
        ("pairs", paths["pairs"], lambda: _pairs_stage(paths["labels"], paths["pairs"], config, command)),
        ("dpo", policy_dir / SUMMARY_FILE, lambda: train_dpo(
            paths["pairs"], policy, policy_dir, config.dpo, resume=True, progress=progress, command=command)),
        ("eval_after", evals["eval_after"], lambda: evaluate_question_list(
            heldout, str(policy_dir), config.eval, source=f"{source} (held out)", output=evals["eval_after"],
            dtype=config.dtype, progress=progress)),
    ]
    for name, output, fn in plan:
        stages.run(name, output, fn)
        if name == stop_after:
            return {"stopped_after": name, "output_dir": str(run_dir), "timings": stages.timings}

    report = build_report(run_dir, labeller, policy, generator, config, stages, len(train), source)
    write_json(run_dir / "transfer.json", report)
    plot_transfer(report, run_dir / "transfer.png")
    return report


def build_report(run_dir: Path, labeller: str, policy: str, generator: str, config: TransferConfig,
                 stages: Stages, n_train: int, source: str) -> dict[str, Any]:
    before = json.loads((run_dir / "eval_before.json").read_text())
    after = json.loads((run_dir / "eval_after.json").read_text())
    if [r["id"] for r in before["results"]] != [r["id"] for r in after["results"]]:
        raise InputError(run_dir / "eval_after.json", "before/after evaluations cover different questions")
    ci = paired_bootstrap([r["correct"] for r in before["results"]], [r["correct"] for r in after["results"]],
                          samples=config.bootstrap_samples, level=config.confidence, seed=config.seed)
    candidates = read_parquet_metadata(run_dir / "candidates.parquet").get("report", {})
    labels = read_parquet_metadata(run_dir / "labels.parquet")
    pairs = json.loads((run_dir / "pairs.report.json").read_text())
    dpo = json.loads((run_dir / "policy" / SUMMARY_FILE).read_text())
    return {
        "mode": "self-improvement" if labeller == policy else "weak-from-strong",
        "labeller": labeller,
        "policy": policy,
        "generator": generator,
        "questions": {"source": source, "train": n_train, "heldout": before["n"]},
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "delta": ci["delta"],
        "delta_ci": {"low": ci["ci_low"], "high": ci["ci_high"], "level": ci["level"], "samples": ci["samples"],
                     "method": "paired bootstrap over held-out questions"},
        "candidates": {k: candidates.get(k) for k in ("claims", "candidate_accuracy", "questions_mixed",
                                                      "mixed_share", "distinct_answers_mean")},
        "labels": {"gold_accuracy": labels.get("gold_accuracy"), "true_share": labels.get("true_share")},
        "pairs": {"pairs": pairs["pairs"], "questions_with_pairs": pairs["questions_with_pairs"],
                  "labels_gold_accuracy": pairs.get("labels_gold_accuracy"), "quality": pairs.get("quality")},
        "dpo": {"global_step": dpo["global_step"], "metrics": dpo["metrics"],
                "seconds_per_step": dpo["seconds_per_step"], "adapter": dpo["adapter"]},
        "timings": {name: stages.timings.get(name) for name in STAGES},
        "skipped_this_run": stages.skipped,
        "files": {name: str(run_dir / name) for name in ("candidates.parquet", "labels.parquet", "pairs.parquet",
                                                          "policy", "eval_before.json", "eval_after.json")},
        "config": asdict(config),
    }


def plot_transfer(report: dict[str, Any], path: str | Path) -> None:
    """Accuracy before/after with the CI of the change, and the time spent per stage (PNG, atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before, after, ci = report["accuracy_before"], report["accuracy_after"], report["delta_ci"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [1, 1.4]})
    bars = ax.bar(["before", "after"], [before, after], color=["#9aa5b1", "#3b82f6"])
    ax.bar_label(bars, fmt="%.3f")
    # The error bar on "after" is the paired CI of the change, drawn around before + delta.
    ax.errorbar([1], [before + report["delta"]], yerr=[[report["delta"] - ci["low"]], [ci["high"] - report["delta"]]],
                fmt="none", ecolor="black", capsize=6)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"accuracy on {report['questions']['heldout']} held-out questions")
    ax.set_title(f"delta {report['delta']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}] ({ci['level']:.0%} CI)",
                 fontsize=10)
    timings = {k: v for k, v in report["timings"].items() if v is not None}
    bx.barh(list(timings), list(timings.values()), color="#f59e0b")
    bx.invert_yaxis()
    bx.set_xlabel("seconds")
    bx.set_title("time per stage", fontsize=10)
    fig.suptitle(f"{report['mode']}: policy {report['policy']}, labeller {report['labeller']}", fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
