"""Can the share of True claims be estimated without gold? Content-free calibration (Zhao et al. 2021) measured
on the demo's pivot sentiment claims at 25/50/75% True, with no search: each claim's log-odds given the labelled
claims of the other fold, minus the mean log-odds of three content-free claims (the review replaced by "N/A", ""
and "[MASK]") after the same demonstrations; the share of claims above zero is the estimate. Demonstrations are
labelled two ways: gold, and ICM-like labels (each claim's centered gold-ICL prediction, ~50% True and as accurate
as ICM). For each, the accuracy of labelling the top-ranked claims (by centered log-odds) True at the estimated
share, at the real share (an oracle) and at the mean (``balance="center"``)::

    python -m bench.share_estimate -n 120 --seeds 0 1 --output docs/results/share-estimate.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from bench.claimsets import sentiment_pivot_claims
from bench.failure_modes import share_set
from icm.config import ICMConfig, PromptTemplate
from icm.data.claims import claims_from_records, gold_labels
from icm.models import load_model
from icm.scoring import ClaimScorer, MutualPredictor

CONTENT_FREE = ("N/A", "", "[MASK]")


def content_free_rows(row: dict) -> list[dict]:
    """``row`` with its review replaced by each content-free text (the task's wording kept)."""
    prefix = row["question"].split("Review:")[0]
    return [{**row, "question": f'{prefix}Review: "{text}"', "consistency_id": f"content-free-{k}"}
            for k, text in enumerate(CONTENT_FREE)]


def accuracy_at(ranked: list[int], gold: list[bool], share: float) -> float:
    """Accuracy of labelling the first ``share`` of ``ranked`` claims True and the rest False."""
    top = set(ranked[:round(share * len(ranked))])
    return float(np.mean([(i in top) == y for i, y in enumerate(gold)]))


def measure(model, tokenizer, rows: list[dict], config: ICMConfig) -> dict:
    n = len(rows)
    claims = claims_from_records(rows + content_free_rows(rows[0]), "share")
    gold = gold_labels(rows, "share")
    scorer = ClaimScorer(model, tokenizer, claims, PromptTemplate(), config.max_context_tokens)
    members = list(range(n))
    predictor = MutualPredictor(scorer, members, config.folds, 0, config.see_group, order="fixed")
    gold_context = dict(enumerate(gold))
    centered, _ = predictor.center(predictor.log_odds(gold_context), gold_context)
    icm_like = {i: bool(centered[i] > 0) for i in members}
    result: dict = {"true_share": float(np.mean(gold)), "majority_class": float(max(np.mean(gold), 1 - np.mean(gold)))}
    for name, labels in (("gold", gold_context), ("icm_like", icm_like)):
        raw = predictor.log_odds(labels)
        centered, _ = predictor.center(raw, labels)
        calibrated = {}
        for f in range(predictor.n_folds):
            offset = float(np.mean(scorer.score([n, n + 1, n + 2], predictor.demos(f, labels))))
            calibrated.update({i: raw[i] - offset for i in predictor.fold_members[f]})
        ranked = sorted(members, key=lambda i: -centered[i])

        estimate = float(np.mean([calibrated[i] > 0 for i in members]))
        result[name] = {"labels_accuracy": float(np.mean([labels[i] == gold[i] for i in members])),
                        "estimated_share": estimate, "accuracy_at_estimate": accuracy_at(ranked, gold, estimate),
                        "accuracy_at_true_share": accuracy_at(ranked, gold, float(np.mean(gold))),
                        "accuracy_centered": float(np.mean([(centered[i] > 0) == gold[i] for i in members])),
                        "centered_share": float(np.mean([centered[i] > 0 for i in members]))}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("-n", type=int, default=120, help="claims per set")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    pool = sentiment_pivot_claims(1000, 0)
    out: dict = {"model": args.model, "n": args.n, "sets": {}}
    for seed in args.seeds:
        for share in args.shares:
            key = f"share-{round(share * 100)}-seed{seed}"
            out["sets"][key] = r = measure(model, tokenizer, share_set(pool, args.n, share, seed), ICMConfig())
            print(key, {k: {m: round(v, 3) for m, v in r[k].items()} for k in ("gold", "icm_like")}, flush=True)
            if args.output:
                args.output.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
