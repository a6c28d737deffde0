"""Label accuracy against gold, side by side: zero-shot, gold-label many-shot ICL (the ceiling),
random-label many-shot ICL, ICM, ICM without the collapse guard, and (on a subset) ICM with exact
leave-one-out next to the fold approximation; then ICM's own utility U of the gold, inverted gold and ICM
labellings.

    python -m bench.label_accuracy sentiment --model smollm2-135m -n 128
    python -m bench.label_accuracy capitals --model gemma3-270m -n 128
    python -m bench.label_accuracy capitals-groups --model gemma3-270m -n 128 --hide-group
    python -m bench.label_accuracy path/to/claims.jsonl --model M
    python -m bench.label_accuracy sentiment-groups -n 64 --no-baselines --no-unguarded --compare-exact

The many-shot baselines score each claim with the other claims as demonstrations (same folds and token
budget as ICM), so they differ from ICM only in where the labels come from. They are reported with the
raw argmax and with ICM's own decision rule (log-odds centered per fold, see ``MutualPredictor.center``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.claimsets import CLAIM_SETS
from icm.backends import InProcessBackend
from icm.config import DEMO_ORDERS, ICMConfig, PromptTemplate
from icm.data.claims import claims_from_records, gold_labels
from icm.data.io import read_records
from icm.label import accuracy
from icm.models import load_model
from icm.scoring import ClaimScorer, MutualPredictor
from icm.search import ICMSearch, label_claims


def icl_accuracy(scorer: ClaimScorer, labels: dict[int, bool], gold: list, config: ICMConfig) -> tuple[float, float]:
    """Each claim predicted from the others' ``labels`` (same folds as ICM); accuracy of the raw argmax and of
    ICM's decision rule (log-odds centered per fold)."""
    predictor = MutualPredictor(scorer, list(range(len(gold))), config.folds, config.seed, config.see_group,
                                order="fixed")  # one seeded order: the labels have no labelling order
    z = predictor.log_odds(labels)
    centered, _ = predictor.center(z, labels)
    return accuracy({i: z[i] > 0 for i in z}, gold), accuracy({i: centered[i] > 0 for i in z}, gold)


def objective(scorer: ClaimScorer, config: ICMConfig, labellings: dict[str, list[bool]]) -> dict[str, float]:
    """ICM's own utility U of whole labellings (gold, inverted gold, ICM's): tells a search that stopped short
    of the best labelling (U(ICM) < U(gold)) from an objective that does not single out gold (U(ICM) >= U(gold))."""
    search = ICMSearch(scorer, list(range(len(scorer.claims))), config)
    return {name: search.evaluate(dict(enumerate(labels)))[2] for name, labels in labellings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("claims", help=f"a labelled claims file or a built-in set: {', '.join(CLAIM_SETS)}")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("-n", type=int, default=128, help="claims (built-in sets) / first n rows (files)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--polish-iterations", type=int, default=None)
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--max-context-tokens", type=int, default=ICMConfig.max_context_tokens)
    parser.add_argument("--hide-group", action="store_true",
                        help="predict each claim from other questions only (ICMConfig.see_group=False)")
    parser.add_argument("--space", default="auto", help="label space: auto, label, prompt")
    parser.add_argument("--exact-subset", type=int, default=0, help="also compare exact LOO on this many claims")
    parser.add_argument("--no-unguarded", action="store_true", help="skip the balance=none ICM run")
    parser.add_argument("--baselines-only", action="store_true", help="only zero-shot and many-shot ICL")
    parser.add_argument("--no-baselines", action="store_true", help="skip the many-shot ICL baselines")
    parser.add_argument("--exact-every", type=int, default=ICMConfig.exact_every,
                        help="search steps per exact evaluation of U in the ICM runs (1 = the exact search)")
    parser.add_argument("--check-every", type=int, default=ICMConfig.check_every,
                        help="exact steps per exact evaluation of their proposal (ICMConfig.check_every)")
    parser.add_argument("--demo-order", default=ICMConfig.demo_order, choices=DEMO_ORDERS,
                        help="order of the demonstrations in the ICM runs (ICMConfig.demo_order)")
    parser.add_argument("--compare-exact", action="store_true",
                        help="also run the previous search (exact U at every step, demonstrations in the fixed "
                             "order: exact_every=1, demo_order=fixed) beside the ICM run's settings")
    parser.add_argument("--output", type=Path, help="write the results as JSON")
    args = parser.parse_args()

    records = CLAIM_SETS[args.claims](args.n, args.seed) if args.claims in CLAIM_SETS else \
        read_records(args.claims)[:args.n]
    claims, gold = claims_from_records(records, args.claims), gold_labels(records, args.claims)
    if gold is None:
        sys.exit(f"{args.claims}: no gold 'label' column to measure against")
    model, tokenizer = load_model(args.model)
    template = PromptTemplate(space=args.space)
    config = ICMConfig(iterations=args.iterations, polish_iterations=args.polish_iterations, folds=args.folds,
                       seed=args.seed, max_context_tokens=args.max_context_tokens, see_group=not args.hide_group,
                       exact_every=args.exact_every, check_every=args.check_every, demo_order=args.demo_order)
    scorer = ClaimScorer(model, tokenizer, claims, template, config.max_context_tokens)
    rng = np.random.default_rng(args.seed)
    n = len(claims)
    rows: dict[str, float | None] = {}
    timings: dict[str, float] = {}

    def record(name, value, seconds):
        rows[name], timings[name] = value, seconds
        print(f"  {name:<34} {value:.1%}  ({seconds:.0f} s)", file=sys.stderr)

    def timed(name, fn):
        start = time.monotonic()
        value = fn()
        record(name, value, time.monotonic() - start)

    print(f"{args.model} on {args.claims}: {n} claims, {np.mean(gold):.0%} True", file=sys.stderr)
    timed("zero-shot", lambda: accuracy({i: z > 0 for i, z in enumerate(scorer.score(list(range(n))))}, gold))
    random_labels = {i: bool(rng.random() < 0.5) for i in range(n)}
    for name, labels in () if args.no_baselines else (("gold-label", dict(enumerate(gold))),
                                                      ("random-label", random_labels)):
        start = time.monotonic()
        both = icl_accuracy(scorer, labels, gold, config)
        for rule, value in zip(("argmax", "centered"), both):
            record(f"{name} many-shot ICL, {rule}", value, time.monotonic() - start)
    summaries = {}

    def icm(name, cfg, subset=None):
        picked = subset if subset is not None else list(range(n))
        results, summaries[name] = label_claims([claims[i] for i in picked], InProcessBackend(model, tokenizer), cfg,
                                                   template=template)
        labels = [r["icm_label"] for r in results]
        summaries[name]["labels"] = labels
        summaries[name]["inverted_accuracy"] = 1 - accuracy(labels, [gold[i] for i in picked])
        return accuracy(labels, [gold[i] for i in picked])

    if not args.baselines_only:
        timed("ICM", lambda: icm("ICM", config))
    if args.compare_exact and not args.baselines_only:
        name = "ICM, previous search (exact U, fixed order)"
        timed(name, lambda: icm(name, replace(config, exact_every=1, demo_order="fixed")))
    if not args.no_unguarded and not args.baselines_only:
        timed("ICM, no collapse guard", lambda: icm("ICM, no collapse guard", replace(config, balance="none")))
    if args.exact_subset:
        subset = sorted(rng.choice(n, size=min(args.exact_subset, n), replace=False).tolist())
        timed(f"ICM folds={args.folds}, {len(subset)}-claim subset", lambda: icm("subset folds", config, subset))
        exact = replace(config, folds=0)
        timed(f"ICM exact LOO, {len(subset)}-claim subset", lambda: icm("subset exact", exact, subset))

    utilities = {}
    if "ICM" in summaries and n <= config.batch_size:
        utilities = objective(scorer, config, {"gold": list(gold), "inverted gold": [not g for g in gold],
                                               "ICM": summaries["ICM"]["labels"]})
        print("ICM objective U: " + ", ".join(f"{k} {v:.2f}" for k, v in utilities.items()), file=sys.stderr)

    print(f"\n| {args.model} / {args.claims} ({n} claims) | accuracy | seconds |\n|---|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {value:.1%} | {timings[name]:.0f} |")
    for name, s in summaries.items():
        print(f"{name}: True share {s['true_share']:.0%}, acceptance {s['acceptance_rate']:.0%}, "
              f"accuracy of the inverted labels {s['inverted_accuracy']:.0%}, "
              f"forward tokens/claim {s['forward_tokens_per_claim']:.0f}")
    if args.output:
        args.output.write_text(json.dumps({"model": args.model, "claims": args.claims, "n": n, "accuracy": rows,
                                           "gold": gold, "utility": utilities,
                                           "seconds": timings, "icm": {k: {kk: vv for kk, vv in v.items()
                                                                           if kk != "trajectories"}
                                                                       for k, v in summaries.items()}}, indent=2))


if __name__ == "__main__":
    main()
