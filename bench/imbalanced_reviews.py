"""Write a questions file of the built-in review sentences with a chosen share of positive reviews, for
``scripts/demo.sh OUT_DIR FILE`` on imbalanced data (the demo's held-out split is drawn from the same file, so it
has the same share):

    python -m bench.imbalanced_reviews --share 0.75 -n 600 --output reviews-75.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from data.tasks import sentiment_questions


def imbalanced_reviews(n: int, share: float, seed: int = 0) -> list[dict[str, str]]:
    """``n`` review questions of which round(share * n) are positive, in a seeded order."""
    every = sentiment_questions(1000, seed)
    positive = [q for q in every if q.reference == "positive"]
    negative = [q for q in every if q.reference == "negative"]
    k = round(share * n)
    if k > len(positive) or n - k > len(negative):
        raise ValueError(f"{n} reviews at {share:.0%} positive need {k} positive and {n - k} negative; "
                         f"there are {len(positive)} and {len(negative)}")
    rows = positive[:k] + negative[:n - k]
    random.Random(seed).shuffle(rows)
    return [{"id": q.id, "question": q.question, "answer": q.reference} for q in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--share", type=float, required=True, help="share of positive reviews, in [0, 1]")
    parser.add_argument("-n", type=int, default=600, help="reviews in the file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    rows = imbalanced_reviews(args.n, args.share, args.seed)
    tmp = args.output.with_name(args.output.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(args.output)
    print(f"{args.output}: {len(rows)} reviews, {sum(r['answer'] == 'positive' for r in rows)} positive")


if __name__ == "__main__":
    main()
