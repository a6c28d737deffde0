"""``icm transfer``: weak-from-strong (or self-) improvement, end to end and resumable.

generate (candidates by the policy) -> label (ICM, by the labeller) -> pairs -> DPO (the policy) -> accuracy
of the policy before and after on held-out questions, with a paired bootstrap CI of the change.

The paper's comparison in one run: each *arm* trains the same policy on the same candidates with the same
DPO settings and changes only the labels: ``icm`` (ICM labels), ``gold`` (the candidates' gold ``label``,
the ceiling), ``random`` (one answer per question drawn at random, the control) and ``zero_shot`` (the
labeller's zero-shot labels, the baseline). Every stage writes its output into the run directory and is
skipped on a rerun when that output exists. The ICM arm keeps the top level (the layout from before arms),
arm A lives in ``arms/A/``:

    split.json  eval_before.json  candidates.parquet                       shared
    labels.parquet  pairs.parquet  pairs.report.json  policy/  eval_after.json  icm arm (icm/: ICM run)
    arms/A/labels.parquet  arms/A/pairs.parquet  ...  arms/A/eval_after.json      arm A
    round-R/start/  round-R/candidates.parquet  round-R/labels.parquet  ...      round R >= 2 of the icm arm
    transfer.json  transfer.png  stages.json

With ``rounds`` R > 1 the ICM arm is repeated on-policy (round 1 is the ICM arm above): round r+1 merges round
r's LoRA adapters into its base model (``round-R/start/``, a full model directory), samples fresh candidates on
the training questions from it, labels them with the same labeller (the merged policy itself when the labeller is
the policy: self-improvement; the fixed labeller otherwise: weak-from-strong), trains (new adapters on the merged
policy, or on the base policy with ``rounds_from`` base) and evaluates on the same held-out questions.
"""

from __future__ import annotations

import gc
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
from rich.markup import escape
from rich.table import Table

from icm.config import STAGES, TransferConfig
from icm.data.answers import closed_answers
from icm.data.console import console
from icm.data.io import (
    InputError,
    atomic_path,
    check_output,
    check_outputs,
    read_json,
    read_parquet_metadata,
    read_records,
    write_json,
    write_parquet,
)
from icm.data.pairs import build_pairs, load_labels, split_paths, write_pairs
from icm.data.tasks import Question
from icm.dpo.evaluation import evaluate_question_list, paired_bootstrap
from icm.dpo.training import SUMMARY_FILE, load_trained_model, train_dpo
from icm.generate import generate_file
from icm.label import label_file
from icm.models import load_tokenizer, save_model_dir


def split_questions(questions: list[Question], eval_size: float, seed: int,
                    train_size: int | None = None) -> tuple[list[Question], list[Question]]:
    """Seeded (train, held-out) split of the questions; ``train_size`` keeps the first ones of the training part."""
    n_eval = int(eval_size) if eval_size >= 1 else round(len(questions) * eval_size)
    n_eval = max(1, n_eval)
    if n_eval >= len(questions):
        raise ValueError(f"{len(questions)} questions cannot leave {n_eval} held out and some to train on")
    order = list(range(len(questions)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    train = [q for i, q in enumerate(questions) if i not in held]
    return train[:train_size], [q for i, q in enumerate(questions) if i in held]


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
            return self.skip(name, f"{output.name} exists")
        console.print(f"[bold]{name}[/] -> {escape(str(output))}", highlight=False)
        start = time.perf_counter()
        fn()
        self.timings[name] = round(time.perf_counter() - start, 3)
        write_json(self.path, {"seconds": self.timings})
        _free()
        return True

    def skip(self, name: str, why: str) -> bool:
        self.skipped.append(name)
        console.print(f"[dim]{name}: {escape(why)}, skipped[/]", highlight=False)
        return False


def _labels_paths(base: Path) -> dict[str, Path]:
    pairs = base / "pairs.parquet"
    return {"dir": base, "labels": base / "labels.parquet", "label_run": base / "icm", "pairs": pairs,
            "pairs_report": split_paths(pairs)["report"], "policy": base / "policy",
            "eval_after": base / "eval_after.json"}


def arm_paths(run_dir: Path, arm: str) -> dict[str, Path]:
    """Files of one arm: the ICM arm's are at the run directory's top level, arm A's in ``arms/A/``."""
    return _labels_paths(run_dir if arm == "icm" else run_dir / "arms" / arm)


def round_paths(run_dir: Path, r: int) -> dict[str, Path]:
    """Files of round ``r`` of the ICM arm: round 1 is the ICM arm itself (its candidates are the shared ones),
    round r >= 2 lives in ``round-r/`` with its own candidates and ``start/`` (round r-1's policy, merged)."""
    if r == 1:
        return arm_paths(run_dir, "icm") | {"candidates": run_dir / "candidates.parquet"}
    base = run_dir / f"round-{r}"
    return _labels_paths(base) | {"candidates": base / "candidates.parquet", "start": base / "start"}


def round_policy(run_dir: Path, r: int, policy: str) -> str:
    """The policy after round ``r`` (0: the base ``policy``): that round's trained policy, or the one before it
    when the round had no pairs to train on."""
    for k in range(r, 0, -1):
        files = round_paths(run_dir, k)
        if _pair_count(files):
            return str(files["policy"])
    return policy


def round_evaluation(run_dir: Path, r: int) -> Path:
    """The held-out evaluation of :func:`round_policy` ``r`` (``eval_before.json`` for the base policy)."""
    for k in range(r, 0, -1):
        files = round_paths(run_dir, k)
        if _pair_count(files):
            return files["eval_after"]
    return run_dir / "eval_before.json"


def is_adapter(model: str) -> bool:
    return (Path(model) / "adapter_config.json").is_file()


def round_start(run_dir: Path, r: int, policy: str) -> str:
    """The model round ``r`` samples from (and, in self-improvement, labels with): round r-1's policy, as the
    full model merged into ``round-r/start`` when it is a LoRA adapter directory."""
    previous = round_policy(run_dir, r - 1, policy)
    return str(round_paths(run_dir, r)["start"]) if r > 1 and is_adapter(previous) else previous


def merge_policy(model: str, output: Path) -> None:
    """Save ``model`` (a LoRA adapter directory written by ``icm dpo``: merged into its base model, in float32)
    with its tokenizer as a full model directory ``output``, atomically (a temporary sibling, then renamed)."""
    save_model_dir(*load_trained_model(model, dtype="fp32", device="cpu"), output)


REDO = "delete it to run its stage again"
EVAL_KEYS = ("accuracy", "n", "results")
PAIRS_KEYS = ("pairs", "label_balance", "labels_gold_accuracy", "quality", "questions_with_pairs", "questions_skipped",
              "dropped")


def check_run_dir(run_dir: Path, arms: tuple[str, ...], inputs: list[Path], rounds: int = 1) -> None:
    """Before any model loads: no input is a file the run writes (or lies in an arm's or a round's label run, policy
    or start directory), and every state file a rerun reads back is whole (a damaged one is an :class:`InputError`
    saying to delete it)."""
    shared = ["split.json", "stages.json", "eval_before.json", "eval_before.items.jsonl", "candidates.parquet",
              "candidates.report.json", "candidates.partial.jsonl", "transfer.json", "transfer.png", "recipe.yaml"]
    files = {f"the run's {name}": run_dir / name for name in shared}
    written = {arm: arm_paths(run_dir, arm) for arm in arms}
    written |= {f"round {r}": round_paths(run_dir, r) for r in range(2, rounds + 1)}
    for who, paths in written.items():
        who = who if who.startswith("round") else f"the {who} arm"
        files |= {f"{who}'s {key}": path for key, path in paths.items() if key not in ("dir", "label_run", "policy",
                                                                                          "start")}
        files[f"{who}'s test pairs"] = split_paths(paths["pairs"])["test"]
        if "candidates" in paths:
            files |= {f"{who}'s candidates {kind}": paths["candidates"].with_suffix(f".{kind}.{ext}")
                      for kind, ext in (("report", "json"), ("partial", "jsonl"))}
        for key in ("label_run", "policy", "start"):
            inside = [p for p in inputs if key in paths and Path(p).resolve().is_relative_to(paths[key].resolve())]
            if inside:
                raise InputError(inside[0], f"lies in {paths[key]}, which this run writes; move it out")
    check_outputs(files, list(inputs))
    json_files = {run_dir / "split.json": ("train", "heldout", "questions"), run_dir / "stages.json": ("seconds",),
                  run_dir / "eval_before.json": EVAL_KEYS}
    parquet_files = [run_dir / "candidates.parquet"]
    for paths in written.values():
        json_files |= {paths["pairs_report"]: PAIRS_KEYS, paths["eval_after"]: EVAL_KEYS,
                       paths["policy"] / SUMMARY_FILE: ("global_step", "metrics", "seconds_per_step", "adapter")}
        parquet_files += [paths["labels"], paths["pairs"], *([paths["candidates"]] if "start" in paths else [])]
    for path, keys in json_files.items():
        if path.exists() or path.is_symlink():
            read_json(path, REDO, keys)
    for path in parquet_files:
        if path.exists() or path.is_symlink():
            try:
                read_parquet_metadata(path)
            except InputError as error:
                raise InputError(path, f"{str(error).removeprefix(f'{path}: ')}; {REDO}") from None


def random_labels(rows: list[dict[str, Any]], seed: int) -> list[bool]:
    """The control: per question (``consistency_id``), one distinct ``answer`` drawn uniformly at random (seeded);
    its rows are True, all others False. A row without an answer is an answer of its own."""
    rng = random.Random(seed)
    answers = [str(r.get("answer") or "") or f"\0{i}" for i, r in enumerate(rows)]
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(str(row["consistency_id"]), []).append(i)
    labels = [False] * len(rows)
    for members in groups.values():
        pick = rng.choice(list(dict.fromkeys(answers[i] for i in members)))
        for i in members:
            labels[i] = answers[i] == pick
    return labels


def write_fixed_labels(candidates: Path, output: Path, arm: str, seed: int) -> None:
    """Labels that need no model, written like ``icm label``'s (``icm_score`` +1/-1, ``icm_searched`` False):
    the candidates' gold ``label`` column (``gold``; no gold counts as False) or :func:`random_labels`."""
    rows = read_records(candidates)
    labels = [bool(r.get("label")) for r in rows] if arm == "gold" else random_labels(rows, seed)
    gold = [y == r["label"] for r, y in zip(rows, labels) if r.get("label") is not None]
    metadata = {"method": arm, "seed": seed, "true_share": sum(labels) / max(len(labels), 1),
                "gold_accuracy": sum(gold) / len(gold) if gold else None}
    out = [r | {"icm_label": y, "icm_score": 1.0 if y else -1.0, "icm_searched": False} for r, y in zip(rows, labels)]
    write_parquet(output, pa.Table.from_pylist(out), metadata)


def _pairs_stage(labels: Path, pairs: Path, config: TransferConfig, command: str | None) -> None:
    """Pairs and their report; labels that give no pair leave the report alone (``pairs: 0``), with a warning."""
    rows, metadata = load_labels(labels)
    kept, report = build_pairs(rows, config.pairs)
    if kept:
        write_pairs(pairs, kept, report, config.pairs, labels_metadata=metadata, command=command, source=labels)
        return
    console.print(f"[yellow]warning:[/] {escape(str(labels))} gives no preference pairs "
                  f"({_no_pairs_reasons(report)}); this arm's policy is not trained", highlight=False)
    write_json(split_paths(pairs)["report"], report)


def _no_pairs_reasons(report: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in (report["questions_skipped"] | report["dropped"]).items()) or "no rows"


def _pair_count(arm: dict[str, Path]) -> int:
    return json.loads(arm["pairs_report"].read_text())["pairs"]


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

    Stages run in order, each for every arm before the next; ``stop_after`` (a stage name) ends the run after
    that stage, e.g. ``pairs`` to train each arm's policy (``policy/``, ``arms/A/policy``) with
    ``accelerate launch ... dpo`` on several GPUs, then rerun to evaluate (with ``rounds`` > 1: it ends round 1;
    the rerun runs rounds 2 and later in full).
    """
    config = config or TransferConfig()
    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"stop_after must be one of {', '.join(STAGES)}, got '{stop_after}'")
    run_dir = check_output(output_dir, directory=True)
    check_run_dir(run_dir, config.arms, [Path(source)] if Path(source).is_file() else [], config.rounds)
    for model in dict.fromkeys((labeller, policy)):  # a model that cannot be found fails before any stage runs
        load_tokenizer(model)
    for row, q in enumerate(questions, start=1):
        if q.reference is None:
            raise InputError(source, "no reference answer (needed for the evaluation)", row=row, field="answer")
    try:
        train, heldout = split_questions(questions, config.eval_size, config.seed, config.train_size)
    except ValueError as error:
        raise InputError(source, str(error)) from None
    split = {"train": [q.id for q in train], "heldout": [q.id for q in heldout],
             "questions": {q.id: q.question for q in questions}}
    split_path = run_dir / "split.json"
    if split_path.exists():
        if {k: v for k, v in read_json(split_path, REDO).items() if k != "source"} != split:
            raise InputError(split_path, "this run directory was made for other questions or another split; "
                             "use a new --output-dir")
    else:
        write_json(split_path, {"source": source} | split)

    candidates, eval_before = run_dir / "candidates.parquet", run_dir / "eval_before.json"
    generator = policy if config.generator == "policy" else labeller

    def evaluate(model: str, output: Path) -> Callable[[], Any]:
        return lambda: evaluate_question_list(heldout, model, config.eval, source=f"{source} (held out)",
                                              output=output, items_output=output.with_suffix(".items.jsonl"),
                                              dtype=config.dtype, progress=progress)

    def arm_stages(arm: str) -> dict[str, tuple[str, Path, Callable[[], Any]]]:
        """Stage -> (name, output, function) of one arm; the ICM arm's names are the bare stage names."""
        files = arm_paths(run_dir, arm)

        def label() -> None:
            if arm in ("gold", "random"):
                write_fixed_labels(candidates, files["labels"], arm, config.seed)
            else:
                label_file(candidates, files["labels"], policy if arm == "confidence" else labeller, config.icm,
                           run_dir=files["label_run"], resume=True, dtype=config.dtype, claim_mode=config.claims,
                           answers=closed_answers(config.generation.extractor), command=command or "",
                           sources=replace(config.sources, method=arm))

        plan = {
            "label": (files["labels"], label),
            "pairs": (files["pairs_report"], lambda: _pairs_stage(files["labels"], files["pairs"], config, command)),
            "dpo": (files["policy"] / SUMMARY_FILE, lambda: train_dpo(
                files["pairs"], policy, files["policy"], config.dpo, resume=True, progress=progress,
                command=command)),
            "eval_after": (files["eval_after"], evaluate(str(files["policy"]), files["eval_after"])),
        }
        prefix = "" if arm == "icm" else f"{arm}/"
        return {stage: (prefix + stage, output, fn) for stage, (output, fn) in plan.items()}

    arms = {arm: arm_stages(arm) for arm in config.arms}
    shared = {"eval_before": ("eval_before", eval_before, evaluate(policy, eval_before)),
              "generate": ("generate", candidates, lambda: generate_file(
                  train, candidates, generator, config.generation, dtype=config.dtype, resume=True,
                  command=command or "", progress=progress))}
    stages = Stages(run_dir)
    names: list[str] = []
    for stage in STAGES:
        runs = [(None, shared[stage])] if stage in shared else [(arm, plan[stage]) for arm, plan in arms.items()]
        for arm, (name, output, fn) in runs:
            names.append(name)
            if arm is not None and stage in ("dpo", "eval_after") and not _pair_count(arm_paths(run_dir, arm)):
                stages.skip(name, "no preference pairs")
            else:
                stages.run(name, output, fn)
        if stage == stop_after:
            return {"stopped_after": stage, "output_dir": str(run_dir), "timings": stages.timings}
    for r in range(2, config.rounds + 1):
        names += run_round(r, run_dir, train, labeller, policy, config, stages, evaluate, command, progress)

    report = build_report(run_dir, labeller, policy, generator, config, stages, names, len(train), source)
    write_json(run_dir / "transfer.json", report)
    plot_transfer(report, run_dir / "transfer.png")
    return report


def run_round(r: int, run_dir: Path, train: list[Question], labeller: str, policy: str, config: TransferConfig,
              stages: Stages, evaluate: Callable[[str, Path], Callable[[], Any]], command: str | None,
              progress: bool) -> list[str]:
    """Round ``r`` >= 2 of the ICM arm in ``round-r/`` (see the module's docstring), each stage skipped when its
    output exists; returns the stages' names (``round-r/STAGE``)."""
    files = round_paths(run_dir, r)
    previous = round_policy(run_dir, r - 1, policy)
    start = round_start(run_dir, r, policy)
    round_labeller = start if labeller == policy else labeller
    generation = replace(config.generation, seed=config.generation.seed + r - 1)  # fresh samples each round
    plan = {
        "merge": (files["start"] / "config.json", lambda: merge_policy(previous, files["start"])),
        "generate": (files["candidates"], lambda: generate_file(
            train, files["candidates"], start, generation, dtype=config.dtype, resume=True, command=command or "",
            progress=progress)),
        "label": (files["labels"], lambda: label_file(
            files["candidates"], files["labels"], round_labeller, config.icm, run_dir=files["label_run"], resume=True,
            dtype=config.dtype, claim_mode=config.claims, answers=closed_answers(config.generation.extractor),
            command=command or "", sources=replace(config.sources, method="icm"))),
        "pairs": (files["pairs_report"], lambda: _pairs_stage(files["labels"], files["pairs"], config, command)),
        "dpo": (files["policy"] / SUMMARY_FILE, lambda: train_dpo(
            files["pairs"], start if config.rounds_from == "previous" else policy, files["policy"], config.dpo,
            resume=True, progress=progress, command=command)),
        "eval_after": (files["eval_after"], evaluate(str(files["policy"]), files["eval_after"])),
    }
    names = []
    for stage, (output, fn) in plan.items():
        name = f"round-{r}/{stage}"
        names.append(name)
        if stage == "merge" and start != str(files["start"]):
            stages.skip(name, "the previous policy is not an adapter directory")
        elif stage in ("dpo", "eval_after") and not _pair_count(files):
            stages.skip(name, "no preference pairs")
        else:
            stages.run(name, output, fn)
    return names


def answer_breakdown(evaluation: Path) -> dict[str, Any] | None:
    """From an evaluation's per-question file (``NAME.items.jsonl``): the share of answers with no extractable
    answer (``unanswered``) and the accuracy per reference answer (``by_reference``, for at most 10 distinct ones:
    a closed answer set), e.g. a policy that answers everything ``positive``; None without the file."""
    path = evaluation.with_suffix(".items.jsonl")
    if not path.exists():
        return None
    items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    by_reference: dict[str, list[bool]] = {}
    for item in items:
        by_reference.setdefault(str(item["reference"]), []).append(bool(item["correct"]))
    out: dict[str, Any] = {"unanswered": sum(not item["answer"] for item in items) / max(len(items), 1)}
    if len(by_reference) <= 10:
        out["by_reference"] = {ref: sum(hits) / len(hits) for ref, hits in sorted(by_reference.items())}
    return out


def evaluation_after(run_dir: Path, arm: str, before: dict[str, Any]) -> dict[str, Any]:
    """The held-out evaluation of ``arm``'s policy (the base policy's when the arm had no pairs to train on)."""
    return _evaluation(arm_paths(run_dir, arm), before, before)


def _evaluation(files: dict[str, Path], before: dict[str, Any], unchanged: dict[str, Any]) -> dict[str, Any]:
    """The evaluation in ``files``, or ``unchanged`` (the untrained policy's) when they hold no pairs; checked to
    cover the questions of ``before``."""
    after = json.loads(files["eval_after"].read_text()) if _pair_count(files) else unchanged
    if [r["id"] for r in before["results"]] != [r["id"] for r in after["results"]]:
        raise InputError(files["eval_after"], "before/after evaluations cover different questions")
    return after


def icm_advantage(run_dir: Path, arm: str, before: dict[str, Any], config: TransferConfig) -> dict[str, float]:
    """The ICM arm's held-out accuracy after training minus ``arm``'s, with its paired bootstrap CI over the
    held-out questions (both policies answer the same questions): is ICM worth its compute over this arm."""
    correct = {a: [r["correct"] for r in evaluation_after(run_dir, a, before)["results"]] for a in (arm, "icm")}
    ci = paired_bootstrap(correct[arm], correct["icm"], samples=config.bootstrap_samples, level=config.confidence,
                          seed=config.seed)
    return {"delta": ci["delta"], "low": ci["ci_low"], "high": ci["ci_high"]}


def arm_report(run_dir: Path, arm: str, before: dict[str, Any], config: TransferConfig) -> dict[str, Any]:
    """One arm's entry in ``transfer.json``: held-out accuracy after DPO and its paired bootstrap CI of the change,
    the labels' and the pairs' accuracy against gold, the pair count, the share of True labels and, where the
    evaluation kept its answers, :func:`answer_breakdown`. An arm without pairs keeps the policy as it was (accuracy
    after = before) and says so in ``note``."""
    return labels_report(arm_paths(run_dir, arm), before, run_dir / "eval_before.json", config)


def labels_report(files: dict[str, Path], before: dict[str, Any], unchanged: Path,
                  config: TransferConfig) -> dict[str, Any]:
    """:func:`arm_report` of the labels, pairs and policy in ``files``; ``unchanged`` is the evaluation of the
    policy they would have trained (kept as it was when they gave no pairs)."""
    pairs = json.loads(files["pairs_report"].read_text())
    after = _evaluation(files, before, json.loads(unchanged.read_text()))
    ci = paired_bootstrap([r["correct"] for r in before["results"]], [r["correct"] for r in after["results"]],
                          samples=config.bootstrap_samples, level=config.confidence, seed=config.seed)
    balance = pairs["label_balance"]
    entry = {
        "accuracy_after": after["accuracy"],
        "delta": ci["delta"],
        "delta_ci": {"low": ci["ci_low"], "high": ci["ci_high"]},
        "label_accuracy": pairs["labels_gold_accuracy"],
        "pair_accuracy": (pairs["quality"] or {}).get("pair_correct"),
        "pairs": pairs["pairs"],
        "true_share": balance["true"] / max(balance["true"] + balance["false"], 1),
        "dir": str(files["dir"]),
    }
    breakdown = answer_breakdown(files["eval_after"] if pairs["pairs"] else unchanged)
    if breakdown is not None:
        entry |= breakdown
    if not pairs["pairs"]:
        entry["note"] = (f"no preference pairs ({_no_pairs_reasons(pairs)}): the policy was not trained, "
                         f"accuracy_after is that of {unchanged.name}")
    return entry


def rounds_report(run_dir: Path, labeller: str, policy: str, before: dict[str, Any], icm: dict[str, Any],
                  config: TransferConfig) -> list[dict[str, Any]]:
    """``transfer.json``'s ``rounds``: one object per round of the ICM arm (round 1 is ``icm``, the ICM arm's
    :func:`arm_report`), each with its held-out accuracy after training, ``delta`` and ``delta_ci`` against the
    base policy, the labels' accuracy against gold, the pair count, the candidates' accuracy, which models sampled,
    labelled and were trained, and from round 2 on ``vs_previous``: the change against the previous round's policy
    with its paired bootstrap CI (the same held-out questions)."""
    candidates = read_parquet_metadata(run_dir / "candidates.parquet").get("report", {})
    generator = policy if config.generator == "policy" else labeller
    out = [{"round": 1, **icm, "candidate_accuracy": candidates.get("candidate_accuracy"), "generator": generator,
            "labeller": labeller, "trained_from": policy}]
    for r in range(2, config.rounds + 1):
        files = round_paths(run_dir, r)
        entry = labels_report(files, before, round_evaluation(run_dir, r - 1), config)
        start = round_start(run_dir, r, policy)
        prior = json.loads(round_evaluation(run_dir, r - 1).read_text())
        ci = paired_bootstrap([x["correct"] for x in prior["results"]],
                              [x["correct"] for x in _evaluation(files, before, prior)["results"]],
                              samples=config.bootstrap_samples, level=config.confidence, seed=config.seed)
        report = read_parquet_metadata(files["candidates"]).get("report", {})
        out.append({"round": r, **entry, "candidate_accuracy": report.get("candidate_accuracy"), "generator": start,
                    "labeller": start if labeller == policy else labeller,
                    "trained_from": start if config.rounds_from == "previous" else policy,
                    "vs_previous": {"delta": ci["delta"], "low": ci["ci_low"], "high": ci["ci_high"]}})
    return out


def build_report(run_dir: Path, labeller: str, policy: str, generator: str, config: TransferConfig,
                 stages: Stages, names: list[str], n_train: int, source: str) -> dict[str, Any]:
    """``transfer.json``: the run, every arm (``arms``) and, at the top level, the ICM arm's
    accuracy change, labels, pairs and DPO summary (None where the ICM arm was not run or had no pairs)."""
    before = json.loads((run_dir / "eval_before.json").read_text())
    arms = {arm: arm_report(run_dir, arm, before, config) for arm in config.arms}
    if "icm" in arms:
        for arm in arms.keys() - {"icm"}:
            arms[arm]["icm_advantage"] = icm_advantage(run_dir, arm, before, config)
    candidates = read_parquet_metadata(run_dir / "candidates.parquet").get("report", {})
    report: dict[str, Any] = {
        "mode": "self-improvement" if labeller == policy else "weak-from-strong",
        "labeller": labeller,
        "policy": policy,
        "generator": generator,
        "questions": {"source": source, "train": n_train, "heldout": before["n"]},
        "held_out": before["n"],
        "accuracy_before": before["accuracy"],
        "before": answer_breakdown(run_dir / "eval_before.json"),
        "accuracy_after": None, "delta": None, "delta_ci": None, "labels": None, "pairs": None, "dpo": None,
        "candidates": {k: candidates.get(k) for k in ("claims", "candidate_accuracy", "questions_mixed",
                                                      "mixed_share", "distinct_answers_mean")},
        "arms": arms,
        "rounds": rounds_report(run_dir, labeller, policy, before, arms["icm"], config) if "icm" in arms else None,
        "timings": {name: stages.timings.get(name) for name in names},
        "skipped_this_run": stages.skipped,
        "files": {name: str(run_dir / name) for name in ("candidates.parquet", "labels.parquet", "pairs.parquet",
                                                          "policy", "eval_before.json", "eval_after.json")},
        "config": asdict(config),
    }
    if "icm" in arms:
        icm = arms["icm"]
        labels = read_parquet_metadata(run_dir / "labels.parquet")
        pairs = json.loads((run_dir / "pairs.report.json").read_text())
        report |= {
            "accuracy_after": icm["accuracy_after"],
            "delta": icm["delta"],
            "delta_ci": icm["delta_ci"] | {"level": config.confidence, "samples": config.bootstrap_samples,
                                           "method": "paired bootstrap over held-out questions"},
            "labels": {"gold_accuracy": labels.get("gold_accuracy"), "true_share": labels.get("true_share")},
            "pairs": {"pairs": pairs["pairs"], "questions_with_pairs": pairs["questions_with_pairs"],
                      "labels_gold_accuracy": pairs.get("labels_gold_accuracy"), "quality": pairs.get("quality")},
        }
        if pairs["pairs"]:
            dpo = json.loads((run_dir / "policy" / SUMMARY_FILE).read_text())
            report["dpo"] = {"global_step": dpo["global_step"], "metrics": dpo["metrics"],
                             "seconds_per_step": dpo["seconds_per_step"], "adapter": dpo["adapter"]}
    return report


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def arms_table(report: dict[str, Any]) -> Table:
    """The comparison as a rich table: one row per arm, then one per round >= 2 of the ICM arm."""
    level = report["config"]["confidence"]
    table = Table(title=f"{report['mode']}: policy {escape(report['policy'])}, held-out accuracy "
                        f"{report['accuracy_before']:.3f} before, {report['held_out']} questions",
                  title_justify="left")
    for name in ("arm", "label acc", "pairs", "pair acc", "accuracy after", f"delta [{level:.0%} CI]",
                 f"ICM - arm [{level:.0%} CI]"):
        table.add_column(name, justify="left" if name == "arm" else "right")
    rows = list(report["arms"].items()) + [(f"icm round {r['round']}", r) for r in (report.get("rounds") or [])[1:]]
    for arm, r in rows:
        ci, gap = r["delta_ci"], r.get("icm_advantage")
        table.add_row(arm, _fmt(r["label_accuracy"]), str(r["pairs"]), _fmt(r["pair_accuracy"]),
                      _fmt(r["accuracy_after"]), f"{r['delta']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}]",
                      f"{gap['delta']:+.3f} [{gap['low']:+.3f}, {gap['high']:+.3f}]" if gap else "")
    return table


def plot_transfer(report: dict[str, Any], path: str | Path) -> None:
    """Held-out accuracy of the base policy and of each arm, with the arms' CI of the change as error bars, the
    ICM arm's accuracy over its rounds (with more than one) and the time spent per stage (PNG, atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms, before, rounds = report["arms"], report["accuracy_before"], report.get("rounds") or []
    if len(rounds) > 1:
        fig, (ax, rx, bx) = plt.subplots(1, 3, figsize=(15, 4.5), gridspec_kw={"width_ratios": [1.2, 0.8, 1]})
        accuracy = [before, *(r["accuracy_after"] for r in rounds)]
        rx.errorbar(range(len(accuracy)), accuracy, fmt="o-", color="#3b82f6", ecolor="black", capsize=5,
                    yerr=[[0, *(r["delta"] - r["delta_ci"]["low"] for r in rounds)],
                          [0, *(r["delta_ci"]["high"] - r["delta"] for r in rounds)]])
        rx.set_xticks(range(len(accuracy)), ["base", *(str(r["round"]) for r in rounds)])
        rx.set_ylim(0, 1)
        rx.set_xlabel("round")
        rx.set_title("icm arm over rounds (CI of the change from base)", fontsize=10)
    else:
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [1.2, 1]})
    names, values = ["base", *arms], [before, *(r["accuracy_after"] for r in arms.values())]
    palette = ["#3b82f6", "#2f855a", "#dd6b20", "#805ad5", "#c53030", "#319795", "#d69e2e", "#b83280"]
    bars = ax.bar(names, values, color=["#9aa5b1"] + [palette[i % len(palette)] for i in range(len(arms))])
    # Inside the bars: the error bars' caps sit at the bars' tops and would strike through labels there.
    ax.bar_label(bars, fmt="%.3f", label_type="center", color="white", fontweight="bold")
    # An arm's error bar is the paired CI of its change, drawn around before + delta (= its accuracy after).
    ax.errorbar(range(1, len(names)), values[1:], fmt="none", ecolor="black", capsize=6,
                yerr=[[r["delta"] - r["delta_ci"]["low"] for r in arms.values()],
                      [r["delta_ci"]["high"] - r["delta"] for r in arms.values()]])
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"accuracy on {report['held_out']} held-out questions")
    ax.set_title(f"policy after DPO on each arm's labels ({report['config']['confidence']:.0%} CI of the change)",
                 fontsize=10)
    timings = {k: v for k, v in report["timings"].items() if v is not None}
    bx.barh(list(timings), list(timings.values()), color="#f59e0b")
    bx.invert_yaxis()
    bx.tick_params(axis="y", labelsize=8)
    bx.set_xlabel("seconds")
    bx.set_title("time per stage", fontsize=10)
    fig.suptitle(f"{report['mode']}: policy {report['policy']}, labeller {report['labeller']}", fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
