"""Dataset cards (README.md with YAML metadata) for labels and pairs Parquet files, built from the files' ``icm``
metadata and tables, so any file ``icm`` wrote can be published with a card that says how it was made."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from datasets import DatasetInfo, Features
from datasets.info import DatasetInfosDict
from datasets.splits import SplitDict, SplitInfo
from huggingface_hub import DatasetCardData

from icm.data.hub import hub_path, scrub
from icm.data.io import read_parquet_metadata, without_local_paths

CITATION = """@article{wen2025unsupervised,
  title   = {Unsupervised Elicitation of Language Models},
  author  = {Wen, Jiaxin and Ankner, Zachary and Somani, Arushi and Hase, Peter and Marks, Samuel and
             Goldman-Wetzler, Jacob and Petrini, Linda and Sleight, Henry and Burns, Collin and He, He and
             Feng, Shi and Perez, Ethan and Leike, Jan},
  journal = {arXiv preprint arXiv:2506.10139},
  year    = {2025},
  url     = {https://arxiv.org/abs/2506.10139}
}"""
CARD_MARK = "Made with the `icm` tool (ICM labelling, pairs for TRL's DPO)."
"""The last line of every card written here: a README.md holding it may be replaced by a newer card."""
LIMITATIONS = [
    "- The labels come from a model's own judgement made mutually consistent, not from people: where the "
    "labelling model is wrong in a consistent way, ICM can agree with it. The accuracy against gold above (when "
    "shown) is the measured quality of this particular run.",
    "- The responses were sampled from small language models and may be wrong, repetitive or off-topic; the "
    "chosen response of a pair is the one labelled better, not a reference answer.",
    "- Gold columns (`label`, `*_is_correct`), when present, are for evaluation only; training on them is not "
    "label-free.",
    "- The questions are those of the source data, with its biases and coverage; the data set is small and "
    "suited to experiments, not to training production models.",
]

PAIR_COLUMNS = {
    "prompt": "the user message: instruction and question (one user turn in the conversational format)",
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


def _yaml_metadata(files: dict[str, Path], kind: str, license: str, pretty_name: str,
                   data_files: dict[str, str] | None = None) -> str:
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
                  "data_files": [{"split": s, "path": (data_files or {}).get(s)
                                  or hub_path(s).replace("00000-of-00001.parquet", "*")} for s in files]}],
    )
    info = DatasetInfo(features=features, splits=splits, download_size=download,
                       dataset_size=sum(s.num_bytes for s in splits.values()))
    DatasetInfosDict({"default": info}).to_dataset_card_data(data)
    return data.to_yaml()


def _cell(value: Any) -> str:
    if isinstance(value, str):
        text = value.encode("unicode_escape").decode("ascii") if value.isspace() or "\n" in value else value
    elif isinstance(value, dict):
        text = ", ".join(f"{k}: {_cell(v)}" for k, v in value.items()) or "-"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(map(_cell, value)) or "-"
    else:
        text = "-" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: dict[str, Any]) -> list[str]:
    return ["| | |", "|---|---|"] + [f"| {k} | {_cell(v)} |" for k, v in rows.items()]


def _settings(config: type, values: dict[str, Any]) -> list[str]:
    """A setting / value / meaning table of a config dataclass's recorded values (help text from icm/config.py)."""
    from icm.config import field_help

    known = {f.name for f in fields(config)}
    rows = ["| setting | value | meaning |", "|---|---|---|"]
    for key, value in values.items():
        meaning = field_help(config, key) if key in known else ""
        shown = f"`{_cell(value)}`" if isinstance(value, str) else _cell(value)
        rows.append(f"| {key} | {shown} | {meaning.replace('|', '/')} |")
    return rows


def _model(spec: Any) -> str:
    """A model named for readers elsewhere: its Hub id (an alias's too, with the alias), a local model by name."""
    from icm.models import hub_id

    spec = str(spec)
    if spec == "enumerated":  # data/candidates.py: a sample with its answer word swapped, not a model
        return "`enumerated` (a sampled response with its answer swapped, `--enumerate-answers`)"
    model_id = hub_id(spec)
    if model_id and model_id != spec:
        return f"[{model_id}](https://huggingface.co/{model_id}) (`{spec}`, the packaged GGUF, dequantized)"
    if model_id:
        return f"[{model_id}](https://huggingface.co/{model_id})"
    return f"`{spec}` (a local model)"


def _questions(path: Path) -> list[str]:
    names = set(pq.read_schema(path).names)
    column = next((c for c in ("question", "prompt") if c in names), None)
    if column is None:
        return []
    values = pq.read_table(path, columns=[column]).column(0).to_pylist()
    return [v if isinstance(v, str) else (v[0] or {}).get("content", "") if isinstance(v, list) and v else ""
            for v in values]


def card_license(files: dict[str, Path], license: str = "unknown") -> tuple[str, str | None, str | None]:
    """The card's licence and the source task: ``license`` when given, else the licence of the built-in task the
    questions come from (``unknown`` when none); returns (licence, task name, attribution)."""
    from icm.data.tasks import TASKS, task_of

    task = task_of([q for path in files.values() for q in _questions(Path(path))])
    spec = TASKS[task] if task else None
    chosen = license if license != "unknown" else (spec.license if spec and spec.license else "unknown")
    return chosen, task, spec.attribution if spec else None


def dataset_card(files: dict[str, Path], *, repo_id: str | None = None, license: str = "unknown",
                 data_files: dict[str, str] | None = None) -> str:
    """README.md for a labels or pairs dataset, in the Hub's dataset card layout: YAML metadata (license,
    task categories, tags, ``configs`` with the data files of each split, ``dataset_info`` features and sizes),
    then a summary, usage, the prompt format, how the data was made (source and its licence, models by Hub id,
    ICM settings, label balance, pair counts, quality, command lines), columns, limitations and citation.

    ``files`` maps split name -> local Parquet file (train first); ``data_files`` maps split -> the path the
    ``configs`` entry gives (default: the Hub layout of :func:`icm.data.hub.hub_path`). ``license`` "unknown"
    takes the source task's licence. No absolute path of this machine appears in the card."""
    from icm.config import ICMConfig, PairsConfig, PromptTemplate

    files = {split: Path(p) for split, p in files.items()}
    train = files.get("train") or next(iter(files.values()))
    meta = read_parquet_metadata(train)
    columns = pq.read_schema(train).names
    kind = "pairs" if "pairs" in meta or {"chosen", "rejected"} <= set(columns) else "labels"
    labels_meta = meta.get("labels", {}) if kind == "pairs" else meta
    summary = meta.get("report") or _labels_summary(train)
    license, task, attribution = card_license(files, license)
    name = repo_id or train.stem
    what = ("DPO preference pairs" if kind == "pairs" else "Claims") + " labelled without human labels by " \
        "Internal Coherence Maximization (ICM, Wen et al. 2025): a model labels claims about its own answers so " \
        "that the labels are mutually predictable and logically consistent."
    lines = [f"# {name}", "", "## Dataset summary", "", what, ""]
    if task:
        lines += [f"The questions come from the built-in `{task}` task of `icm`"
                  + (" (source data and its licence: see Licence)." if attribution else "."), ""]
    conversational = isinstance(meta.get("pairs"), dict) and meta["pairs"].get("format") == "conversational"
    lines += ["## Usage", "", "```python", "from datasets import load_dataset", "",
              f'dataset = load_dataset("{repo_id or "OWNER/NAME"}")']
    raw = labels_meta.get("use_chat_template") is False  # the candidates were sampled from the raw prompt
    if kind == "pairs" and not conversational and not raw:
        lines += ["# the prompts as icm dpo trains on them: one user turn, the chat template applied by TRL",
                  "def conversational(row):",
                  '    return {"prompt": [{"role": "user", "content": row["prompt"].rstrip()}],',
                  '            "chosen": [{"role": "assistant", "content": row["chosen"]}],',
                  '            "rejected": [{"role": "assistant", "content": row["rejected"]}]}',
                  "",
                  "dataset = dataset.map(conversational)"]
    lines += ["```", ""]
    if kind == "pairs":
        lines += ["### Prompt format", ""]
        if conversational:
            lines += ["TRL's conversational preference format: `prompt` is one user turn (the instruction and the "
                      "question), `chosen` and `rejected` one assistant turn each. `trl.DPOTrainer` applies the "
                      "model's chat template, as `icm generate` did when it sampled the responses and as `icm dpo` "
                      "and `icm eval` do, so `DPOTrainer(train_dataset=dataset[\"train\"], ...)` takes it as is.", ""]
        elif raw:
            lines += ["TRL's standard preference format (strings): `prompt` is the user message (the instruction "
                      "and the question, ending in a newline). The responses were sampled without a chat template "
                      "(the message, `Answer:` and the response), and `icm dpo` trains on that raw prompt too "
                      "(recorded in the files' metadata as `use_chat_template: false`).", ""]
        else:
            lines += ["TRL's standard preference format (strings): `prompt` is the user message (the instruction "
                      "and the question, ending in a newline), not a chat-templated prompt. The responses were "
                      "sampled with the generator's chat template applied to that message as one user turn, and "
                      "`icm dpo` and `icm eval` apply it the same way (for a tokenizer without a template: the "
                      "message, `\\nAnswer:` and a space before the response). To train on the prompts the "
                      "responses answered, convert the rows to the conversational format as above; used as plain "
                      "strings, DPO would train on prompts without the template.", ""]
    lines += ["## How it was made", ""]
    source = next((labels_meta[k] for k in ("source", "input", "claims") if labels_meta.get(k)), None)
    made = {
        "source questions": f"{summary.get('questions', '?')} questions, {summary.get('rows', '?')} claims"
        + (f" from the built-in `{task}` task" if task else f" from `{source}`" if source else ""),
        "source licence": license if task else None,
        "labels file": f"`{meta['source']}`" if kind == "pairs" and meta.get("source") else None,
        "generator model(s)": ", ".join(_model(g) for g in summary.get("generators") or []) or "unknown",
        "labeller model": _model(labels_meta["model"]) if labels_meta.get("model") else "unknown",
        "labelling method": labels_meta.get("method") or "ICM",
        "ICM seed": labels_meta.get("seed"),
        "label balance (True / False)": "{true} / {false}".format(**summary["label_balance"])
        if summary.get("label_balance") else None,
        "labels' accuracy against gold": _share(summary.get("labels_gold_accuracy", labels_meta.get("gold_accuracy")))
        if summary.get("labels_gold_accuracy", labels_meta.get("gold_accuracy")) is not None else None,
    }
    lines += _table({k: v for k, v in made.items() if v is not None}) + [""]
    template = labels_meta.get("template")
    if isinstance(template, str):
        lines += ["### Labelling template", "", "```text", template, "```", ""]
    elif isinstance(template, dict):
        lines += ["### Labelling template", "", "How each claim was written for the labeller (`{question}`, "
                  "`{choice}`, `{choice_2}` filled in):", ""]
        for key in ("claim", "comparison"):
            if isinstance(template.get(key), str):
                lines += [f"{key}:", "", "```text", template[key], "```", ""]
        lines += _settings(PromptTemplate, {k: v for k, v in template.items() if k not in ("claim", "comparison")})
        lines += [""]
    if isinstance(labels_meta.get("config"), dict):
        lines += ["### ICM settings", ""] + _settings(ICMConfig, labels_meta["config"]) + [""]
    if kind == "pairs":
        config = meta.get("pairs") or {}
        lines += ["### Pairs", "", "Within each question, chosen = a response labelled True and rejected = one "
                  "labelled False; margin = chosen score minus rejected score.", ""]
        if config:
            lines += _settings(PairsConfig, config) + [""]
        counts = {"candidate pairs": summary.get("candidate_pairs"), "pairs kept": summary.get("pairs")}
        counts |= {f"questions skipped: {k}": v for k, v in (summary.get("questions_skipped") or {}).items()}
        counts |= {f"pairs dropped: {k}": v for k, v in (summary.get("dropped") or {}).items()}
        ppq = summary.get("pairs_per_question") or {}
        if ppq.get("mean") is not None:
            counts["pairs per question (mean / min / max)"] = f"{ppq['mean']:.2f} / {ppq['min']} / {ppq['max']}"
        counts |= {f"{s} split": (f"{v['pairs']} pairs" if "pairs" in v else f"{v.get('examples')} examples")
                   + f", {v.get('questions')} questions" for s, v in (summary.get("splits") or {}).items()}
        lines += _table(counts) + [""]
        quality = summary.get("quality")
        lines += ["### Quality", ""]
        if quality and "examples_with_gold" in quality:  # unpaired (kto) examples
            lines += ["Measured against gold labels, which were never used to build the examples:", ""] + _table({
                "examples with gold": quality["examples_with_gold"],
                "desirable really correct": _share(quality["desirable_correct"]),
                "undesirable really wrong": _share(quality["undesirable_wrong"]),
                "label correct": _share(quality["label_correct"]),
            }) + [""]
        elif quality:
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
    lines += ["## Columns", ""] + [f"- `{c}`: {described[c]}" for c in columns if c in described] + [""]
    lines += ["## Limitations", ""] + LIMITATIONS + [""]
    lines += ["## Licence", "", f"`{license}`." + (f" {attribution}" if attribution else ""), ""]
    lines += ["## Citation", "", "ICM, the method that labelled this data:", "", "```bibtex", CITATION, "```", "",
              CARD_MARK]
    body = "\n".join(lines) + "\n"
    card = f"---\n{_yaml_metadata(files, kind, license, name, data_files)}\n---\n\n{body}"
    return without_local_paths(scrub(card))


def write_folder_card(files: dict[str, Path], license: str = "unknown") -> Path | None:
    """Write the card as README.md beside the split files, its ``configs`` naming them, so that
    ``datasets.load_dataset(FOLDER)`` gives every split (file names alone would lose ``train``: ``pairs.parquet``
    matches no split keyword while ``pairs.test.parquet`` matches ``test``) and only the pairs, whatever else lies
    in the folder. A README.md that is not a card written here is left alone (None is returned)."""
    from icm.data.io import atomic_path

    files = {split: Path(p) for split, p in files.items()}
    folder = next(iter(files.values())).parent
    if any(p.parent != folder for p in files.values()):
        return None
    readme = folder / "README.md"
    if readme.exists() and (not readme.is_file() or CARD_MARK not in readme.read_text(encoding="utf-8",
                                                                                     errors="replace")):
        return None
    card = dataset_card(files, license=license, data_files={split: p.name for split, p in files.items()})
    with atomic_path(readme) as tmp:
        Path(tmp).write_text(card, encoding="utf-8")
    return readme
