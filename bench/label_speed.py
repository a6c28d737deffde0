"""Scoring speed of `icm label`: forward tokens per labelled claim, claims per second, and scoring
throughput as a ratio of the model's raw forward throughput, measured in the same run.

    python bench/label_speed.py --model smollm2-135m --claims sentiment -n 64

"Uncached" is what the same scores would cost if every target were run with its whole context
(what a plain implementation does); the ratio of the two is the saving from prefix-cache reuse.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.claimsets import CLAIM_SETS  # noqa: E402
from data.claims import claims_from_records  # noqa: E402
from data.io import read_records  # noqa: E402
from icm.models import load_model  # noqa: E402
from icm.search import ICMConfig, label_claims  # noqa: E402


@torch.inference_mode()
def raw_throughput(model, seq_len: int = 512, batch: int = 4, repeats: int = 3) -> float:
    """Tokens per second of plain forward passes (last-position logits only)."""
    ids = torch.randint(100, 1000, (batch, seq_len), device=next(model.parameters()).device)
    model(ids[:, :32], logits_to_keep=1)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        model(ids, logits_to_keep=1)
    return repeats * batch * seq_len / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--claims", default="sentiment", help=f"a claims file or one of {', '.join(CLAIM_SETS)}")
    parser.add_argument("-n", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    records = CLAIM_SETS[args.claims](args.n, 0) if args.claims in CLAIM_SETS else read_records(args.claims)[:args.n]
    claims = claims_from_records(records, args.claims)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    raw_before = raw_throughput(model)
    start = time.perf_counter()
    _, summary = label_claims(claims, model, tokenizer, ICMConfig(iterations=args.iterations, folds=args.folds))
    seconds = time.perf_counter() - start
    raw_after = raw_throughput(model)
    raw = (raw_before + raw_after) / 2
    tokens = summary["forward_tokens"]
    uncached = summary["uncached_tokens"]
    n = len(claims)
    print(f"| {args.model}, {args.claims}, {n} claims, folds={args.folds}, dtype={model.dtype} | value |")
    print("|---|---|")
    print(f"| forward tokens per labelled claim | {tokens / n:,.0f} |")
    print(f"| uncached tokens per labelled claim (no prefix reuse) | {uncached / n:,.0f} |")
    print(f"| prefix reuse saving (uncached / forward tokens) | {uncached / max(tokens, 1):.1f}x |")
    print(f"| claims per second | {n / seconds:.3f} |")
    print(f"| scoring throughput (forward tokens/s) | {tokens / seconds:,.0f} |")
    print(f"| raw forward throughput (tokens/s, same run) | {raw:,.0f} |")
    print(f"| scoring / raw throughput | {tokens / seconds / raw:.2f} |")
    print(f"| effective throughput (uncached-equivalent tokens/s) / raw | {uncached / seconds / raw:.1f} |")


if __name__ == "__main__":
    main()
