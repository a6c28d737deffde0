"""Iterative ICM against plain batch-by-batch labelling: label accuracy per batch index.

Both runs split the same claims into the same K batches (in order) and search each with the same ICM settings
and seeds; the only difference is the labeller: plain labelling searches every batch with the base model,
iterative ICM with the base model fine-tuned (LoRA) on the labels of the batches before. Batch 1 is searched
by the base model in both, so its accuracy must agree. Gold is read only to score the labels afterwards.

    python -m bench.iterative sentiment-pivot --model smollm2-135m -n 144 --batches 3
    python -m bench.iterative capitals-groups --model gemma3-270m -n 128 --batches 4 --hide-group

``sentiment-pivot`` is the built-in sentiment task asked the way ``icm transfer --claims pivot`` does (one claim
"The answer is positive." per review); the other names are the sets of ``bench/claimsets.py``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from bench.claimsets import CLAIM_SETS
from icm.backends import InProcessBackend
from icm.config import ICMConfig, IterativeConfig
from icm.data.claims import ANSWER_CLAIM
from icm.data.io import write_json
from icm.data.tasks import get_task
from icm.iterative import load_labeller
from icm.label import label_records, zero_shot_records
from icm.models import load_model


def sentiment_pivot_claims(n: int, seed: int) -> list[dict]:
    """One pivot claim per review of the built-in task (gold: the review is positive)."""
    return [{"question": q.question, "choice": ANSWER_CLAIM.format(answer="positive"), "consistency_id": q.id,
             "label": q.reference == "positive"} for q in get_task("sentiment").questions(n, seed)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("claims", choices=["sentiment-pivot", *CLAIM_SETS])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("-n", type=int, default=144, help="claims")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=None, help="ICM steps per batch [default: 4 x claims]")
    parser.add_argument("--polish-iterations", type=int, default=None)
    parser.add_argument("--hide-group", action="store_true")
    parser.add_argument("--steps", type=int, default=IterativeConfig.steps, help="LoRA steps per fine-tuning")
    parser.add_argument("--learning-rate", type=float, default=IterativeConfig.learning_rate)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--run-dir", type=Path, default=None, help="checkpoints (resumed when present)")
    parser.add_argument("--output", type=Path, default=None, help="JSON report")
    args = parser.parse_args()

    rows = sentiment_pivot_claims(args.n, args.seed) if args.claims == "sentiment-pivot" else \
        CLAIM_SETS[args.claims](args.n, args.seed)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    backend = InProcessBackend(model, tokenizer)
    config = ICMConfig(iterations=args.iterations, polish_iterations=args.polish_iterations, seed=args.seed,
                       see_group=not args.hide_group)
    report: dict = {"claims": args.claims, "n": len(rows), "model": args.model, "icm": asdict(config), "runs": {}}
    for name, steps in (("plain", 0), ("iterative", args.steps)):
        iterative = IterativeConfig(batches=args.batches, steps=steps, learning_rate=args.learning_rate)
        started = time.monotonic()
        run_dir = args.run_dir / name if args.run_dir else None
        _, summary = label_records(rows, backend, config, run_dir=run_dir, resume=run_dir is not None,
                                   model_name=args.model, iterative=iterative)
        batches = [{k: v for k, v in b.items() if k != "members"} for b in summary["iterative"]["batches"]]
        report["runs"][name] = {"iterative": asdict(iterative), "gold_accuracy": summary["gold_accuracy"],
                                "true_share": summary["true_share"], "seconds": time.monotonic() - started,
                                "batches": batches}
        print(f"{name}: gold accuracy {summary['gold_accuracy']:.3f} in {time.monotonic() - started:.0f} s",
              flush=True)
    # Did fine-tuning move the model's own judgement? Zero-shot accuracy (centered log-odds, no demonstrations) of
    # the base model and of the labeller that searched each batch, on that batch.
    for b, batch in enumerate(report["runs"]["iterative"]["batches"]):
        members = summary["iterative"]["batches"][b]["members"]
        batch["zero_shot_base"] = zero_shot_records([rows[i] for i in members], backend)[1]["gold_accuracy"]
        adapter = args.run_dir / "iterative" / f"labeller-{b}" if args.run_dir else None
        if adapter is not None and adapter.is_dir():
            tuned = InProcessBackend(load_labeller(model, adapter)[0], tokenizer)
            batch["zero_shot_labeller"] = zero_shot_records([rows[i] for i in members], tuned)[1]["gold_accuracy"]
    print(f"\n{args.claims}, {args.model}, {len(rows)} claims in {args.batches} batches "
          f"(gold True share {sum(r['label'] for r in rows) / len(rows):.2f})")
    print("| batch | claims | plain ICM | iterative ICM | fine-tuned on | LoRA loss first -> last | zero-shot: base / "
          "labeller |")
    print("|---|---|---|---|---|---|---|")
    for b, (plain, it) in enumerate(zip(report["runs"]["plain"]["batches"], report["runs"]["iterative"]["batches"])):
        tuned = f"{it['trained_on']} labels" if "trained_on" in it else "- (base)"
        loss = f"{it['loss_first']:.3f} -> {it['loss_last']:.3f}" if it.get("loss_first") is not None else "-"
        zero = f"{it['zero_shot_base']:.1%} / " + (f"{it['zero_shot_labeller']:.1%}" if "zero_shot_labeller" in it
                                                   else "-")
        print(f"| {b + 1} | {plain['claims']} | {plain['gold_accuracy']:.1%} | {it['gold_accuracy']:.1%} | "
              f"{tuned} | {loss} | {zero} |")
    if args.output:
        write_json(args.output, report)
        print(json.dumps({k: v["gold_accuracy"] for k, v in report["runs"].items()}))


if __name__ == "__main__":
    main()
