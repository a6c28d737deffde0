"""Dataset cards (README.md with YAML metadata) for labels and pairs Parquet files, built from the files' ``icm``
metadata and tables, so any file ``icm`` wrote can be published with a card that says how it was made."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from datasets import DatasetInfo, Features
from datasets.info import DatasetInfosDict
from datasets.splits import SplitDict, SplitInfo
from huggingface_hub import DatasetCardData
from icm.data.hub import hub_path, scrub
from icm.data.io import read_parquet_metadata

PAIR_COLUMNS = {
    "prompt": "the question as the model sees it (a user turn in the conversational format)",
    "chosen": "a response ICM labelled True (or the preferred side of an accepted comparison)",
    "rejected": "a response ICM labelled False for the same question",
    "question_id": "the claims' `consistency_id`",
    "chosen_score": "ICM score (log-odds of True) of the chosen response's claim",
    "rejected_score": "ICM score of the rejected response's claim",
    "margin": "`chosen_score - rejected_score`",
    "chosen_answer": "final answer extracted from the chosen response (\"\" if none)",
    "rejected_answer": "final answer extracted from the rejected response",
    "chosen_is_correct": "gold: the chosen response is really correct (evaluation only, never used to build pairs)",
    "rejected_is_correct": "gold: the rejected response is really correct",
}
LABEL_COLUMNS = {
    "question": "the question", "choice": "the claim (candidate solution) being labelled",
    "choice_2": "the second response of a comparison claim", "consistency_id": "claims about one question share it",
    "answer": "final answer the claim asserts", "label": "gold label (evaluation only; ICM never reads it)",
    "icm_label": "the label ICM found", "icm_score": "final log-odds of True vs False",
    "icm_searched": "False when the label is the model's prediction given the searched set",
}


def _size_category(n: int) -> str:
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < bound:
            return name
    return "1M<n<10M"


def _share(x: float | None) -> str:
    return "unknown" if x is None else f"{x:.1%}"


def _labels_summary(path: Path) -> dict[str, Any]:
    names = set(pq.read_schema(path).names)
    table = pq.read_table(path, columns=[c for c in ("icm_label", "label", "consistency_id", "generator")
                                         if c in names]).to_pydict()
    labels = table.get("icm_label", [])
    gold = [(bool(p), bool(g)) for p, g in zip(labels, table.get("label", []), strict=False) if g is not None]
    return {
        "rows": len(labels), "questions": len(set(map(str, table.get("consistency_id", [])))),
        "label_balance": {"true": sum(map(bool, labels)), "false": sum(not x for x in labels)},
        "labels_gold_accuracy": sum(p == g for p, g in gold) / len(gold) if gold else None,
        "generators": sorted({str(g) for g in table.get("generator", []) if g}),
    }


def _yaml_metadata(files: dict[str, Path], kind: str, license: str, pretty_name: str) -> str:
    splits, n_rows, features = SplitDict(), 0, None
    for split, path in files.items():
        table = pq.read_table(path)
        features = features or Features.from_arrow_schema(table.schema)
        splits.add(SplitInfo(name=split, num_bytes=table.nbytes, num_examples=table.num_rows))
        n_rows += table.num_rows
    download = sum(Path(p).stat().st_size for p in files.values())
    data = DatasetCardData(
        license=license, pretty_name=pretty_name, size_categories=[_size_category(n_rows)],
        task_categories=["text-generation"] if kind == "pairs" else ["text-classification"],
        tags=(["dpo", "preference", "trl"] if kind == "pairs" else []) + ["icm", "synthetic", "unsupervised"],
        configs=[{"config_name": "default",
                  "data_files": [{"split": s, "path": hub_path(s).replace("00000-of-00001.parquet", "*")}
                                 for s in files]}],
    )
    info = DatasetInfo(features=features, splits=splits, download_size=download,
                       dataset_size=sum(s.num_bytes for s in splits.values()))
    DatasetInfosDict({"default": info}).to_dataset_card_data(data)
    return data.to_yaml()


def _cell(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: dict[str, Any]) -> list[str]:
    return ["| | |", "|---|---|"] + [f"| {k} | {_cell(v)} |" for k, v in rows.items()]


def dataset_card(files: dict[str, Path], *, repo_id: str | None = None, license: str = "unknown") -> str:
    """README.md for a labels or pairs dataset: YAML metadata (license, task categories, tags, ``configs`` with one
    data file per split, ``dataset_info`` features and sizes) and a body saying how the data was made (source,
    generator and labeller models, ICM hyperparameters, label balance, pair counts, quality, command lines).
    ``files`` maps split name -> local Parquet file (train first)."""
    files = {split: Path(p) for split, p in files.items()}
    train = files.get("train") or next(iter(files.values()))
    meta = read_parquet_metadata(train)
    columns = pq.read_schema(train).names
    kind = "pairs" if "pairs" in meta or {"chosen", "rejected"} <= set(columns) else "labels"
    labels_meta = meta.get("labels", {}) if kind == "pairs" else meta
    summary = meta.get("report") or _labels_summary(train)
    name = repo_id or train.stem
    what = ("DPO preference pairs" if kind == "pairs" else "Claims") + " labelled without human labels by " \
        "Internal Coherence Maximization (ICM, Wen et al. 2025): a model labels claims about its own answers so " \
        "that the labels are mutually predictable and logically consistent."
    lines = [f"# {name}", "", what, "", "## Usage", "", "```python", "from datasets import load_dataset", "",
             f'dataset = load_dataset("{repo_id or "OWNER/NAME"}")', "```", ""]
    if kind == "pairs":
        lines += ["The columns `prompt`, `chosen`, `rejected` follow TRL's "
                  + ("conversational" if isinstance(meta.get("pairs"), dict) and meta["pairs"].get("format")
                     == "conversational" else "standard")
                  + " preference format, so `trl.DPOTrainer(train_dataset=dataset[\"train\"], ...)` takes it as is.",
                  ""]
    lines += ["## How it was made", ""]
    made = {
        "source questions": f"{summary.get('questions', '?')} questions, {summary.get('rows', '?')} claims"
        + next((f" from `{labels_meta[k]}`" for k in ("source", "input", "claims") if labels_meta.get(k)), ""),
        "labels file": f"`{meta['source']}`" if kind == "pairs" and meta.get("source") else None,
        "generator model(s)": ", ".join(f"`{g}`" for g in summary.get("generators") or []) or "unknown",
        "labeller model": f"`{labels_meta['model']}`" if labels_meta.get("model") else "unknown",
        "ICM seed": labels_meta.get("seed"),
        "label balance (True / False)": "{true} / {false}".format(**summary["label_balance"])
        if summary.get("label_balance") else None,
        "labels' accuracy against gold": _share(summary.get("labels_gold_accuracy", labels_meta.get("gold_accuracy")))
        if summary.get("labels_gold_accuracy", labels_meta.get("gold_accuracy")) is not None else None,
    }
    lines += _table({k: v for k, v in made.items() if v is not None}) + [""]
    if labels_meta.get("template"):
        lines += ["### Labelling template", "", "```text", str(labels_meta["template"]), "```", ""]
    if isinstance(labels_meta.get("config"), dict):
        lines += ["### ICM hyperparameters", ""] + _table(labels_meta["config"]) + [""]
    if kind == "pairs":
        config = meta.get("pairs") or {}
        lines += ["### Pairs", "", "Within each question, chosen = a response labelled True and rejected = one "
                  "labelled False; margin = chosen score minus rejected score.", ""]
        counts = {f"config: {k}": v for k, v in config.items()}
        counts |= {"candidate pairs": summary.get("candidate_pairs"), "pairs kept": summary.get("pairs")}
        counts |= {f"questions skipped: {k}": v for k, v in (summary.get("questions_skipped") or {}).items()}
        counts |= {f"pairs dropped: {k}": v for k, v in (summary.get("dropped") or {}).items()}
        ppq = summary.get("pairs_per_question") or {}
        if ppq.get("mean") is not None:
            counts["pairs per question (mean / min / max)"] = f"{ppq['mean']:.2f} / {ppq['min']} / {ppq['max']}"
        counts |= {f"{s} split": f"{v['pairs']} pairs, {v['questions']} questions"
                   for s, v in (summary.get("splits") or {}).items()}
        lines += _table(counts) + [""]
        quality = summary.get("quality")
        lines += ["### Quality", ""]
        if quality:
            lines += ["Measured against gold labels, which were never used to build the pairs:", ""] + _table({
                "pairs with gold": quality["pairs_with_gold"],
                "chosen really correct": _share(quality["chosen_correct"]),
                "rejected really wrong": _share(quality["rejected_wrong"]),
                "pair correct (chosen correct and rejected wrong)": _share(quality["pair_correct"]),
                "pair inverted (chosen wrong and rejected correct)": _share(quality["pair_inverted"]),
            }) + [""]
        else:
            lines += ["Unknown: the source had no gold labels.", ""]
    commands = [c for c in (labels_meta.get("command"), meta.get("command") if kind == "pairs" else None) if c]
    if commands:
        lines += ["### Commands", "", "```bash"] + [scrub(str(c)) for c in commands] + ["```", ""]
    described = PAIR_COLUMNS if kind == "pairs" else LABEL_COLUMNS
    lines += ["## Columns", ""] + [f"- `{c}`: {described[c]}" for c in columns if c in described]
    lines += ["", "Made with the `icm` tool (ICM labelling, pairs for TRL's DPO)."]
    body = "\n".join(lines) + "\n"
    return scrub(f"---\n{_yaml_metadata(files, kind, license, name)}\n---\n\n{body}")
