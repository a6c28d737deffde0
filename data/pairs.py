"""DPO preference pairs from ICM labels: within each question, chosen = a claim labelled True, rejected = one
labelled False (comparison claims give the pair directly from the accepted ordering).

Output is TRL's preference format (``prompt``/``chosen``/``rejected`` strings, or conversational message lists)
plus provenance columns, written as zstd Parquet that ``datasets.load_dataset("parquet", ...)`` and
``trl.DPOTrainer`` take unchanged. Every candidate pair that is not kept is counted under a reason in the report.

``format`` kto writes TRL's unpaired format instead (``prompt``/``completion``/``label``, for ``KTOTrainer``): one
example per labelled candidate, its ICM label as ``label``, so the questions whose candidates are all True or all
False (no pair) still count (:func:`build_unpaired`).

Files: ``PAIRS.parquet`` (all pairs, or the train split with a test size), ``PAIRS.test.parquet`` (test split) and
``PAIRS.report.json``; load both splits with
``load_dataset("parquet", data_files={"train": "PAIRS.parquet", "test": "PAIRS.test.parquet"})``.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from rich.table import Table

from icm.config import PairsConfig
from icm.data.io import (
    InputError,
    check_output,
    read_parquet_metadata,
    read_records,
    require_fields,
    text_value,
    write_json,
    write_parquet,
)

# Reasons a question yields no pairs, or a candidate pair is not kept (report keys).
NO_TRUE = "no True candidate"
NO_FALSE = "no False candidate"
IDENTICAL = "chosen equals rejected"
DUPLICATE = "duplicate"
CONTRADICTORY = "contradictory comparison labels"
BELOW_MARGIN = "below min margin"
BELOW_AGREEMENT = "below min agreement"
OVER_MAX = "over max per question"
NOT_BEST = "not best margin"


def _as_bool(path: Path, row: int, field: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise InputError(path, f"expected a boolean, got {value!r}", row=row, field=field)


def load_labels(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Read and validate a labels file (output of ``icm label``): rows with booleans and float scores normalized,
    and its ``icm`` Parquet metadata (``{}`` for other formats)."""
    path = Path(path)
    rows = read_records(path)
    require_fields(path, rows, ["consistency_id", "choice", "icm_label", "icm_score"])
    for i, row in enumerate(rows, start=1):
        row["icm_label"] = _as_bool(path, i, "icm_label", row["icm_label"])
        score = row["icm_score"]
        try:
            score = float(score) if not isinstance(score, bool) else math.nan
        except (TypeError, ValueError):
            score = math.nan
        if not math.isfinite(score):
            raise InputError(path, f"expected a finite number, got {row['icm_score']!r}", row=i, field="icm_score")
        row["icm_score"] = score
        if row.get("icm_agreement") is not None:
            agreement = row["icm_agreement"]
            if isinstance(agreement, bool) or not isinstance(agreement, (int, float)) or not 0 <= agreement <= 1:
                raise InputError(path, f"expected a fraction in [0, 1], got {agreement!r}", row=i,
                                 field="icm_agreement")
        row["choice"] = text_value(path, i, "choice", row["choice"])
        for name in ("prompt", "question", "choice_2", "answer"):
            if name in row:
                row[name] = text_value(path, i, name, row[name], required=False)
        if not _text(row.get("prompt")) and not _text(row.get("question")):
            raise InputError(path, "missing or empty (the prompt column is absent too)", row=i, field="question")
        if row.get("label") is not None and row.get("label") != "":
            row["label"] = _as_bool(path, i, "label", row["label"])
        else:
            row["label"] = None
    metadata = read_parquet_metadata(path) if path.suffix.lower() == ".parquet" else {}
    return rows, metadata


def _text(value: Any) -> str:
    return value if isinstance(value, str) and value.strip() else ""


def _is_comparison(row: dict[str, Any]) -> bool:
    return bool(_text(row.get("choice_2")))


def _agreement(row: dict[str, Any]) -> float:
    """A row's ``icm_agreement`` (1 when it has none)."""
    value = row.get("icm_agreement")
    return 1.0 if value is None else float(value)


def _plain_pairs(trues: list[dict], falses: list[dict]) -> list[dict[str, Any]]:
    out = []
    for t in trues:
        for f in falses:
            out.append({
                "chosen": t["choice"], "rejected": f["choice"],
                "chosen_score": t["icm_score"], "rejected_score": f["icm_score"],
                "chosen_answer": str(t.get("answer") or ""), "rejected_answer": str(f.get("answer") or ""),
                "chosen_is_correct": t.get("label"), "rejected_is_correct": f.get("label"),
                "agreement": min(_agreement(t), _agreement(f)),
            })
    return out


def _comparison_pairs(claims: list[dict], dropped: Counter) -> tuple[list[dict[str, Any]], int]:
    """One pair per compared couple, ordered by the accepted label; a claim and its reverse (B vs A) merge into one
    pair whose scores are those of the two claims (a missing reverse claim scores minus the claim's score)."""
    by_order: dict[tuple[str, str], dict] = {}
    for row in claims:
        key = (row["choice"], row["choice_2"])
        if key in by_order:
            dropped[DUPLICATE] += 1
        else:
            by_order[key] = row
    out, done, merged = [], set(), 0
    for (x, y), row in by_order.items():
        if (x, y) in done:
            continue
        reverse = by_order.get((y, x)) if x != y else None
        done |= {(x, y), (y, x)}
        win = (x, y) if row["icm_label"] else (y, x)
        if reverse is not None:
            if ((y, x) if reverse["icm_label"] else (x, y)) != win:
                dropped[CONTRADICTORY] += 1
                continue
            merged += 1
        scores = {(x, y): row["icm_score"]} | ({(y, x): reverse["icm_score"]} if reverse is not None else {})
        chosen, rejected = win
        gold_row = row if row.get("label") is not None else reverse
        correct = None if gold_row is None or gold_row.get("label") is None else (
            ((gold_row["choice"], gold_row["choice_2"]) if gold_row["label"] else
             (gold_row["choice_2"], gold_row["choice"])) == win)
        out.append({
            "chosen": chosen, "rejected": rejected,
            "chosen_score": scores.get((chosen, rejected), -scores.get((rejected, chosen), 0.0)),
            "rejected_score": scores.get((rejected, chosen), -scores.get((chosen, rejected), 0.0)),
            "chosen_answer": "", "rejected_answer": "",
            "chosen_is_correct": correct, "rejected_is_correct": None if correct is None else not correct,
            "agreement": min(_agreement(row), _agreement(reverse) if reverse is not None else 1.0),
        })
    return out, merged


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def pair_quality(pairs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Shares of pairs whose chosen is really correct / rejected really wrong, over pairs with gold for both."""
    gold = [p for p in pairs if p.get("chosen_is_correct") is not None and p.get("rejected_is_correct") is not None]
    if not gold:
        return None
    return {
        "pairs_with_gold": len(gold),
        "chosen_correct": _mean([float(p["chosen_is_correct"]) for p in gold]),
        "rejected_wrong": _mean([float(not p["rejected_is_correct"]) for p in gold]),
        "pair_correct": _mean([float(p["chosen_is_correct"] and not p["rejected_is_correct"]) for p in gold]),
        "pair_inverted": _mean([float(p["rejected_is_correct"] and not p["chosen_is_correct"]) for p in gold]),
    }


def _format(pair: dict[str, Any], fmt: str, gold: bool) -> dict[str, Any]:
    prompt, chosen, rejected = pair["prompt"], pair["chosen"], pair["rejected"]
    if fmt == "conversational":
        prompt = [{"role": "user", "content": prompt}]
        chosen = [{"role": "assistant", "content": chosen}]
        rejected = [{"role": "assistant", "content": rejected}]
    elif not prompt[-1:].isspace():
        prompt += "\n"
    out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    out |= {k: pair[k] for k in ("question_id", "chosen_score", "rejected_score", "margin", "chosen_answer",
                                 "rejected_answer")}
    if gold:
        out |= {"chosen_is_correct": pair["chosen_is_correct"], "rejected_is_correct": pair["rejected_is_correct"]}
    return out


def min_margin(config: PairsConfig, margins: list[float]) -> float | None:
    """The smallest margin a pair may have: ``config.min_margin``, or the ``config.margin_quantile`` quantile of
    every candidate pair's margin (a floor that does not depend on the scale of the labels' scores), the higher."""
    floors = [config.min_margin] if config.min_margin is not None else []
    if config.margin_quantile and margins:
        floors.append(float(np.quantile(margins, config.margin_quantile)))
    return max(floors) if floors else None


def unpaired_quality(examples: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Shares of the unpaired examples with gold whose label is right: desirable (True) ones really correct,
    undesirable (False) ones really wrong, all of them."""
    gold = [e for e in examples if e.get("is_correct") is not None]
    if not gold:
        return None
    return {"examples_with_gold": len(gold),
            "desirable_correct": _mean([float(e["is_correct"]) for e in gold if e["label"]]),
            "undesirable_wrong": _mean([float(not e["is_correct"]) for e in gold if not e["label"]]),
            "label_correct": _mean([float(e["label"] == e["is_correct"]) for e in gold])}


def build_unpaired(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """TRL's unpaired examples (``prompt``, ``completion``, ``label`` = the ICM label) from every labelled candidate
    (comparison claims, which label an ordering and not a completion, and exact duplicates are dropped and
    counted), and a report: label balance, questions by their labels (all True, all False, mixed) and, with gold
    ``label`` on the rows, the examples' quality."""
    dropped, seen, examples = Counter(), set(), []
    by_question: dict[str, set[bool]] = {}
    for row in rows:
        if _is_comparison(row):
            dropped["comparison claim"] += 1
            continue
        prompt = _text(row.get("prompt")) or row["question"]
        key = (prompt, row["choice"], row["icm_label"])
        if key in seen:
            dropped[DUPLICATE] += 1
            continue
        seen.add(key)
        qid = str(row["consistency_id"])
        by_question.setdefault(qid, set()).add(row["icm_label"])
        examples.append({"prompt": prompt if prompt[-1:].isspace() else prompt + "\n", "completion": row["choice"],
                         "label": row["icm_label"], "question_id": qid, "score": row["icm_score"],
                         "answer": str(row.get("answer") or ""), "is_correct": row.get("label")})
    gold = any(e["is_correct"] is not None for e in examples)
    if not gold:
        for e in examples:
            del e["is_correct"]
    gold_rows = [r for r in rows if r.get("label") is not None]
    report = {
        "format": "kto",
        "rows": len(rows),
        "questions": len({str(r["consistency_id"]) for r in rows}),
        "label_balance": {"true": sum(r["icm_label"] for r in rows), "false": sum(not r["icm_label"] for r in rows)},
        "labels_gold_accuracy": _mean([float(r["icm_label"] == r["label"]) for r in gold_rows]),
        "generators": sorted({str(r["generator"]) for r in rows if r.get("generator")}),
        "examples": len(examples),
        "desirable": sum(e["label"] for e in examples),
        "undesirable": sum(not e["label"] for e in examples),
        "questions_by_labels": {"all_true": sum(v == {True} for v in by_question.values()),
                                "all_false": sum(v == {False} for v in by_question.values()),
                                "mixed": sum(len(v) == 2 for v in by_question.values())},
        "dropped": dict(dropped),
        "quality": unpaired_quality(examples),
    }
    return examples, report


def build_pairs(rows: list[dict[str, Any]], config: PairsConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Pairs (already in ``config.format``) and a report: questions skipped and candidate pairs dropped, by reason,
    pairs per question, label balance and, when the rows carry gold ``label``, pair quality. With ``format`` kto:
    :func:`build_unpaired`."""
    if config.min_agreement is not None and not any(row.get("icm_agreement") is not None for row in rows):
        raise ValueError("min_agreement needs an icm_agreement column (labels from `icm label --restarts R`, R > 1)")
    if config.format == "kto":
        return build_unpaired(rows)
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(str(row["consistency_id"]), []).append(row)
    best = config.strategy == "best-margin"
    limit = config.max_per_question or (1 if best else None)
    skipped, dropped, seen = Counter(), Counter(), set()
    pairs, merged, per_group = [], 0, []
    for qid, group in groups.items():
        plain = [r for r in group if not _is_comparison(r)]
        candidates = []
        if plain:
            trues = [r for r in plain if r["icm_label"]]
            falses = [r for r in plain if not r["icm_label"]]
            if not trues or not falses:
                skipped[NO_TRUE if not trues else NO_FALSE] += 1
            candidates += _plain_pairs(trues, falses)
        comparison, n_merged = _comparison_pairs([r for r in group if _is_comparison(r)], dropped)
        candidates += comparison
        merged += n_merged
        prompt = _text(group[0].get("prompt")) or group[0]["question"]
        for c in candidates:
            c |= {"prompt": prompt, "question_id": qid, "margin": c["chosen_score"] - c["rejected_score"]}
        candidates.sort(key=lambda c: -c["margin"])  # stable: ties keep row order
        per_group.append(candidates)
    floor = min_margin(config, [c["margin"] for candidates in per_group for c in candidates])
    for candidates in per_group:
        kept, used = 0, set()
        for c in candidates:
            key = (c["prompt"], c["chosen"], c["rejected"])
            if c["chosen"] == c["rejected"]:
                reason = IDENTICAL
            elif key in seen:
                reason = DUPLICATE
            elif config.min_agreement is not None and c["agreement"] < config.min_agreement:
                reason = BELOW_AGREEMENT
            elif floor is not None and c["margin"] < floor:
                reason = BELOW_MARGIN
            elif best and (kept >= limit or c["chosen"] in used or c["rejected"] in used):
                reason = NOT_BEST
            elif limit is not None and kept >= limit:
                reason = OVER_MAX
            else:
                reason = None
                pairs.append(c)
                kept += 1
                used |= {c["chosen"], c["rejected"]}
            seen.add(key)
            if reason:
                dropped[reason] += 1

    per_question = Counter(p["question_id"] for p in pairs)
    gold_rows = [r for r in rows if r.get("label") is not None]
    report = {
        "rows": len(rows),
        "questions": len(groups),
        "label_balance": {"true": sum(r["icm_label"] for r in rows), "false": sum(not r["icm_label"] for r in rows)},
        "labels_gold_accuracy": _mean([float(r["icm_label"] == r["label"]) for r in gold_rows]),
        "generators": sorted({str(r["generator"]) for r in rows if r.get("generator")}),
        "questions_skipped": dict(skipped),
        "candidate_pairs": len(pairs) + sum(dropped.values()),
        "pairs": len(pairs),
        "dropped": dict(dropped),
        "merged_reverse_claims": merged,
        "questions_with_pairs": len(per_question),
        "pairs_per_question": {
            "mean": _mean(list(per_question.values())),
            "min": min(per_question.values(), default=0),
            "max": max(per_question.values(), default=0),
        },
        "quality": pair_quality(pairs),
    }
    gold = bool(gold_rows)
    return [_format(p, config.format, gold) for p in pairs], report


def split_pairs(pairs: list[dict[str, Any]], test_size: float, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Seeded train/test split by question: pairs sharing a question id or a prompt land in the same split."""
    parent: dict[tuple[str, str], tuple[str, str]] = {}

    def find(k):
        while parent.setdefault(k, k) != k:
            k = parent[k]
        return k

    def prompt_text(p):
        return p["prompt"] if isinstance(p["prompt"], str) else p["prompt"][0]["content"]

    for p in pairs:
        a, b = find(("q", p["question_id"])), find(("p", prompt_text(p)))
        parent[a] = b
    roots = sorted({find(("q", p["question_id"])) for p in pairs})
    random.Random(seed).shuffle(roots)
    n_test = math.ceil(test_size * len(roots)) if test_size < 1 else int(test_size)
    if not 0 < n_test < len(roots):
        raise ValueError(f"test size {test_size} of {len(roots)} questions leaves {len(roots) - n_test} for train "
                         f"and {n_test} for test; both need at least one")
    test = set(roots[:n_test])
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    for p in pairs:
        splits["test" if find(("q", p["question_id"])) in test else "train"].append(p)
    return splits


def pairs_schema(fmt: str, gold: bool) -> pa.Schema:
    """Arrow schema of a pairs file (strings, or TRL message lists for the conversational format; the kto format's
    unpaired examples: prompt, completion, label)."""
    if fmt == "kto":
        fields = [("prompt", pa.string()), ("completion", pa.string()), ("label", pa.bool_()),
                  ("question_id", pa.string()), ("score", pa.float64()), ("answer", pa.string())]
        return pa.schema(fields + ([("is_correct", pa.bool_())] if gold else []))
    text = pa.string() if fmt == "standard" else pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    fields = [("prompt", text), ("chosen", text), ("rejected", text), ("question_id", pa.string()),
              ("chosen_score", pa.float64()), ("rejected_score", pa.float64()), ("margin", pa.float64()),
              ("chosen_answer", pa.string()), ("rejected_answer", pa.string())]
    if gold:
        fields += [("chosen_is_correct", pa.bool_()), ("rejected_is_correct", pa.bool_())]
    return pa.schema(fields)


def split_paths(output: str | Path) -> dict[str, Path]:
    """Files of a pairs output: ``PAIRS.parquet`` (train), ``PAIRS.test.parquet``, ``PAIRS.report.json``."""
    output = Path(output)
    stem = output.name.removesuffix(".parquet")
    return {"train": output, "test": output.with_name(f"{stem}.test.parquet"),
            "report": output.with_name(f"{stem}.report.json")}


def write_pairs(output: str | Path, pairs: list[dict[str, Any]], report: dict[str, Any], config: PairsConfig, *,
                labels_metadata: dict[str, Any] | None = None, command: str | None = None,
                source: str | Path | None = None) -> dict[str, Path]:
    """Write the pairs (split by question when ``config.test_size`` is set) and the report JSON; returns
    split name -> Parquet path. Each file's ``icm`` metadata holds the labels file's metadata (``labels``), the
    pairs config, the report, the command line and the split layout."""
    from icm.data.hub import scrub_all  # no token may reach the file, even through the labels' command line

    if not pairs:
        raise ValueError("no pairs to write")
    kto = config.format == "kto"
    paths = split_paths(output)
    for path in paths.values():
        check_output(path, source)
    splits = split_pairs(pairs, config.test_size, config.seed) if config.test_size else {"train": pairs}
    report["splits"] = {name: {"examples" if kto else "pairs": len(rows),
                               "questions": len({r["question_id"] for r in rows})} for name, rows in splits.items()}
    if report.get("quality") is not None and "test" in splits:
        for name, rows in splits.items():
            report["splits"][name]["quality"] = (unpaired_quality if kto else pair_quality)(rows)
    schema = pairs_schema(config.format, ("is_correct" if kto else "chosen_is_correct") in pairs[0])
    metadata = scrub_all({"labels": labels_metadata or {}, "pairs": asdict(config), "report": report,
                          "command": command, "source": str(source) if source else None,
                          "splits": {name: paths[name].name for name in splits}})
    for name, rows in splits.items():
        write_parquet(paths[name], pa.Table.from_pylist(rows, schema=schema), metadata | {"split": name})
    write_json(paths["report"], report)
    return {name: paths[name] for name in splits}


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def report_table(report: dict[str, Any]) -> Table:
    """The pair quality report as a rich table."""
    table = Table(title="icm pairs", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("questions", str(report["questions"]))
    table.add_row("label balance (True / False)", f"{report['label_balance']['true']} / "
                                                   f"{report['label_balance']['false']}")
    if report.get("format") == "kto":
        return _unpaired_rows(table, report)
    for reason, n in report["questions_skipped"].items():
        table.add_row(f"questions skipped: {reason}", str(n))
    table.add_row("candidate pairs", str(report["candidate_pairs"]))
    for reason, n in report["dropped"].items():
        table.add_row(f"pairs dropped: {reason}", str(n))
    table.add_row("pairs kept", str(report["pairs"]))
    ppq = report["pairs_per_question"]
    table.add_row("pairs per question (mean / min / max)",
                  f"{ppq['mean'] or 0:.2f} / {ppq['min']} / {ppq['max']} over {report['questions_with_pairs']}")
    for name, split in report.get("splits", {}).items():
        table.add_row(f"{name} split", f"{split['pairs']} pairs, {split['questions']} questions")
    if report["labels_gold_accuracy"] is not None:
        table.add_row("labels gold accuracy", _share(report["labels_gold_accuracy"]))
    quality = report["quality"]
    if quality:
        table.add_row("chosen really correct", _share(quality["chosen_correct"]))
        table.add_row("rejected really wrong", _share(quality["rejected_wrong"]))
        table.add_row("pair correct (both)", _share(quality["pair_correct"]))
        table.add_row("pair inverted", _share(quality["pair_inverted"]))
    return table


def _unpaired_rows(table: Table, report: dict[str, Any]) -> Table:
    """:func:`report_table`'s rows for the kto format's unpaired examples."""
    by_labels = report["questions_by_labels"]
    table.add_row("questions all True / all False / mixed",
                  f"{by_labels['all_true']} / {by_labels['all_false']} / {by_labels['mixed']}")
    for reason, n in report["dropped"].items():
        table.add_row(f"rows dropped: {reason}", str(n))
    table.add_row("examples kept (desirable / undesirable)",
                  f"{report['examples']} ({report['desirable']} / {report['undesirable']})")
    for name, split in report.get("splits", {}).items():
        table.add_row(f"{name} split", f"{split['examples']} examples, {split['questions']} questions")
    if report["labels_gold_accuracy"] is not None:
        table.add_row("labels gold accuracy", _share(report["labels_gold_accuracy"]))
    quality = report["quality"]
    if quality:
        table.add_row("desirable really correct", _share(quality["desirable_correct"]))
        table.add_row("undesirable really wrong", _share(quality["undesirable_wrong"]))
    return table
