"""Where unsupervised elicitation breaks, on the demo's sentiment pivot claims ("The answer is positive." per
review, gold = the review is positive): label shares of 10-90% True, a spurious cue, unanswerable items.

For each claim set: ICM with ``balance="center"`` and ``"estimate"`` (``--restarts`` independent searches each,
voted, with the label-quality estimate of :mod:`icm.quality`), gold-label many-shot ICL (argmax and centered),
zero-shot (argmax, centered, estimate) and the majority-class labelling, all on the same claims; then the Spearman
rank correlation of the quality estimate (``quality.score`` and its parts) with the real accuracy over the ICM runs.

- ``share-P``: P% of the claims True (reviews subsampled from the 1,000 built-in ones to that share).
- ``cue``: half True; the phrase " I am sure this is right." is appended to the claim of 80% of the False claims
  (and of 10% of the True ones), a salient feature that goes with the wrong label.
- ``unanswerable``: half True; half of the reviews are cut to their first two words, so nothing in them says
  the sentiment (their gold is the full review's); accuracy is reported on all claims and on the answerable ones.

    nice -n 10 python -m bench.failure_modes --model smollm2-135m -n 64 --output docs/results/failure-modes.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench.claimsets import sentiment_pivot_claims
from bench.label_accuracy import icl_accuracy
from icm.backends import InProcessBackend
from icm.config import ICMConfig, PromptTemplate
from icm.data.claims import claims_from_records, gold_labels
from icm.label import accuracy, search_labels
from icm.models import load_model
from icm.scoring import ClaimScorer, estimate_share, threshold

CUE = " I am sure this is right."
SHARES = (0.1, 0.25, 0.5, 0.75, 0.9)


def share_set(pool: list[dict], n: int, share: float, seed: int) -> list[dict]:
    """``n`` claims of ``pool`` of which round(share * n) are True, in a seeded order."""
    rng = random.Random(seed)
    trues, falses = [r for r in pool if r["label"]], [r for r in pool if not r["label"]]
    k = round(share * n)
    rows = rng.sample(trues, k) + rng.sample(falses, n - k)
    rng.shuffle(rows)
    return [dict(r) for r in rows]


def cue_set(pool: list[dict], n: int, seed: int) -> list[dict]:
    rng = random.Random(seed + 1)
    rows = share_set(pool, n, 0.5, seed)
    for r in rows:
        if rng.random() < (0.1 if r["label"] else 0.8):
            r["choice"] += CUE
            r["cue"] = True
    return rows


def unanswerable_set(pool: list[dict], n: int, seed: int) -> list[dict]:
    rng = random.Random(seed + 2)
    rows = share_set(pool, n, 0.5, seed)
    for r in rng.sample(rows, n // 2):
        head, review = r["question"].split('Review: "', 1)
        r["question"] = head + 'Review: "' + " ".join(review.rstrip('"').split()[:2]) + '"'
        r["unanswerable"] = True
    return rows


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rho (average ranks for ties); None with fewer than 3 points or a constant side."""
    if len(x) < 3:
        return None

    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):  # ties: mean rank
            r[v == value] = r[v == value].mean()
        return r

    a, b = ranks(x), ranks(y)
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def correlate(out: dict) -> None:
    """Add the Spearman rho of the quality estimate (and of each part) with the accuracy over the ICM runs."""
    runs = [r[key] for r in out["sets"].values() for key in ("icm_center", "icm_estimate")]
    acc = [x["accuracy"] for x in runs]
    parts = {"score": [x["quality"]["score"] for x in runs],
             "agreement_mean": [(x["quality"]["agreement"] or {}).get("mean", 1.0) for x in runs],
             "high_margin_share": [1 - x["quality"]["low_margin"]["share"] for x in runs],
             "minus_surface_lift": [-x["quality"]["surface"]["lift"] for x in runs]}
    out["spearman_vs_accuracy"] = {k: spearman(v, acc) for k, v in parts.items()}
    out["runs"] = len(runs)


def merge(paths: list[Path]) -> dict:
    """Results JSONs of runs over different sets (same settings) as one, the correlations over all of them."""
    outs = [json.loads(p.read_text()) for p in paths]
    merged = dict(outs[0], sets={name: r for out in outs for name, r in out["sets"].items()})
    correlate(merged)
    return merged


def table(out: dict) -> str:
    """The results as a markdown table (one row per claim set) and the rank correlations."""

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    lines = ["| set (True share) | majority class | zero-shot argmax / centered / estimate | gold ICL argmax / "
             "centered | ICM center: acc (True share) | ICM estimate: acc (True share, estimated share) | quality "
             "score center / estimate |", "|---|---|---|---|---|---|---|"]
    for name, r in out["sets"].items():
        z, g, c, e = r["zero_shot"], r["gold_icl"], r["icm_center"], r["icm_estimate"]
        lines.append(f"| {name} ({pct(r['true_share'])}) | {pct(r['majority_class'])} | {pct(z['argmax'])} / "
                     f"{pct(z['centered'])} / {pct(z['estimate'])} | {pct(g['argmax'])} / {pct(g['centered'])} | "
                     f"{pct(c['accuracy'])} ({pct(c['true_share'])}) | {pct(e['accuracy'])} ({pct(e['true_share'])}, "
                     f"{pct(e['estimated_true_share'])}) | {c['quality']['score']:.2f} / {e['quality']['score']:.2f} |")
    rho = out.get("spearman_vs_accuracy", {})
    lines.append("")
    lines.append("Spearman rho with ICM accuracy over the " + str(out.get("runs")) + " ICM runs: " + ", ".join(
        f"{k} {'-' if v is None else f'{v:+.2f}'}" for k, v in rho.items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("-n", type=int, default=64, help="claims per set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=None, help="ICM steps per batch [default: 2 x n]")
    parser.add_argument("--sets", default="", help="comma-separated subset of the set names")
    parser.add_argument("--max-context-tokens", type=int, default=ICMConfig.max_context_tokens)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--table", type=Path, help="print the markdown table of a results JSON and exit")
    parser.add_argument("--merge", type=Path, nargs="+", help="merge results JSONs (other sets) into --output")
    args = parser.parse_args()
    if args.merge:
        args.output.write_text(json.dumps(merge(args.merge), indent=2, default=float) + "\n")
        args.table = args.output
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return

    pool = sentiment_pivot_claims(1000, args.seed)
    sets = {f"share-{round(s * 100)}": share_set(pool, args.n, s, args.seed) for s in SHARES}
    sets["cue"] = cue_set(pool, args.n, args.seed)
    sets["unanswerable"] = unanswerable_set(pool, args.n, args.seed)
    if args.sets:
        sets = {k: v for k, v in sets.items() if k in args.sets.split(",")}
    torch.set_num_threads(args.threads)  # on a shared machine one thread is several times faster (no spin-waits)
    model, tokenizer = load_model(args.model)
    backend = InProcessBackend(model, tokenizer)
    template = PromptTemplate()
    config = ICMConfig(iterations=args.iterations or 2 * args.n, seed=args.seed, restarts=args.restarts,
                       max_context_tokens=args.max_context_tokens)
    started = time.monotonic()
    out: dict = {"model": args.model, "n": args.n, "restarts": args.restarts, "iterations": config.iterations,
                 "max_context_tokens": config.max_context_tokens,
                 "seed": args.seed, "sets": {}}
    for name, rows in sets.items():
        claims, gold = claims_from_records(rows, name), gold_labels(rows, name)
        answerable = [i for i, r in enumerate(rows) if not r.get("unanswerable")]
        result: dict = {"true_share": float(np.mean(gold)), "majority_class": max(np.mean(gold), 1 - np.mean(gold))}
        scorer = ClaimScorer(model, tokenizer, claims, template, config.max_context_tokens)
        zero = scorer.score(list(range(len(claims))))
        prior = estimate_share(zero)
        cut = threshold(zero, prior)
        result["zero_shot"] = {"argmax": accuracy([bool(z > 0) for z in zero], gold),
                               "centered": accuracy([bool(z > zero.mean()) for z in zero], gold),
                               "estimate": accuracy([bool(z > cut) for z in zero], gold),
                               "estimated_true_share": prior[0], "separation": prior[1]}
        print(f"  {name}: zero-shot done, {time.monotonic() - started:.0f} s", file=sys.stderr)
        argmax, centered = icl_accuracy(scorer, dict(enumerate(gold)), gold, config)
        print(f"  {name}: gold ICL done, {time.monotonic() - started:.0f} s", file=sys.stderr)
        result["gold_icl"] = {"argmax": argmax, "centered": centered}
        for balance in ("center", "estimate"):
            t0 = time.monotonic()
            labels, summary = search_labels(claims, backend, replace(config, balance=balance), gold=gold,
                                            template=template, show_progress=False)
            y = [r["icm_label"] for r in labels]
            result[f"icm_{balance}"] = {
                "accuracy": accuracy(y, gold), "true_share": float(np.mean(y)),
                "answerable_accuracy": accuracy({i: y[i] for i in answerable}, gold),
                "restart_accuracy": [r["gold_accuracy"] for r in summary.get("restarts", [])],
                "estimated_true_share": summary.get("estimated_true_share"), "quality": summary["quality"],
                "seconds": time.monotonic() - t0}
            print(f"  {name}: ICM {balance} done, {time.monotonic() - t0:.0f} s", file=sys.stderr)
            if cued := [i for i, r in enumerate(rows) if r.get("cue")]:  # did the cue pull the labels to True?
                result[f"icm_{balance}"]["cued_true_share"] = float(np.mean([y[i] for i in cued]))
                result[f"icm_{balance}"]["cued_accuracy"] = accuracy({i: y[i] for i in cued}, gold)
        out["sets"][name] = result
        if args.output:  # after every set, so a stopped run keeps what it measured
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(out, indent=2, default=float) + "\n")
        icm = {k: result[k]["accuracy"] for k in ("icm_center", "icm_estimate")}
        print(f"{name}: gold {result['true_share']:.0%} True | majority {result['majority_class']:.1%} | zero-shot "
              f"{result['zero_shot']['argmax']:.1%}/{result['zero_shot']['centered']:.1%}/"
              f"{result['zero_shot']['estimate']:.1%} | gold ICL {argmax:.1%}/{centered:.1%} | ICM center "
              f"{icm['icm_center']:.1%} ({result['icm_center']['true_share']:.0%} True) estimate "
              f"{icm['icm_estimate']:.1%} ({result['icm_estimate']['true_share']:.0%} True) | "
              f"{time.monotonic() - started:.0f} s", file=sys.stderr)
    correlate(out)
    out["seconds"] = time.monotonic() - started
    print(table(out))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(out, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
