"""Labelled claim sets for the benchmarks, built from ../shared/datasets (never copied into the repo).

- ``sentiment``: one claim per review sentence ("The sentiment of this review is positive/negative."),
  the polarity asserted at random, gold = whether it matches the review's label. Claims stand alone.
- ``capitals``: "The capital of X is Y." with Y the true capital or another country's, one claim per
  country (up to 141 countries), half true.
- ``truthfulqa``: the ICM paper's own TruthfulQA claims (with consistency groups), a seeded slice.
- ``sentiment-groups`` / ``capitals-groups``: the same questions asked the way the paper's GSM8K and
  TruthfulQA sets are, n/2 questions with two claims each sharing a ``consistency_id`` (the review is
  positive / negative; the true capital / another country's), each claim's ``answer`` as its consistency
  key, so "two different answers to one question cannot both be True" applies.
- ``sentiment-pivot``: the demo's claims (``icm transfer --task sentiment --claims pivot``): one claim
  "The answer is positive." per built-in sentiment question, in the wording ``data.claims.answer_claims``
  gives, gold = whether the review is positive. Every claim reads the same, so only the review decides.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from icm.data.claims import answer_claims
from icm.data.tasks import capitals, sentiment_questions

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"

CAPITALS = capitals("common")
# Less famous countries, so that 128 stand-alone claims need no country twice (a country asked twice, once
# with its capital and once with another's, lets a labelling copy one claim's label onto the other).
MORE_CAPITALS = capitals("more")


def _shuffled_reviews(rng: random.Random) -> list[tuple[str, str]]:
    """(review, "positive"/"negative") pairs of the UCI Amazon sentences, in a seeded order."""
    lines = (SHARED / "sentiment" / "amazon_cells_labelled.txt").read_text(encoding="utf-8").splitlines()
    rows = [line.rsplit("\t", 1) for line in lines if "\t" in line]
    rng.shuffle(rows)
    return [(sentence.strip(), "positive" if polarity.strip() == "1" else "negative") for sentence, polarity in rows]


def _sentiment_claim(review: str, asserted: str, truth: str, **extra) -> dict:
    return {"question": f"Review: {review}", "choice": f"The sentiment of this review is {asserted}.",
            "label": asserted == truth, **extra}


def _capital_claim(country: str, capital: str, true: bool, **extra) -> dict:
    return {"question": f"What is the capital of {country}?", "choice": f"The capital of {country} is {capital}.",
            "label": true, **extra}


def sentiment_claims(n: int = 128, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    claims = [_sentiment_claim(review, "positive" if k % 2 == 0 else "negative", truth)
              for k, (review, truth) in enumerate(_shuffled_reviews(rng)[:n])]
    rng.shuffle(claims)
    return claims


def capital_claims(n: int = 128, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    capitals = {**CAPITALS, **MORE_CAPITALS}
    countries = sorted(capitals)
    rng.shuffle(countries)
    claims = []
    for k in range(n):
        country = countries[k % len(countries)]
        true = (k // len(countries) + k) % 2 == 0
        capital = capitals[country] if true else capitals[rng.choice([c for c in countries if c != country])]
        claims.append(_capital_claim(country, capital, true))
    rng.shuffle(claims)
    return claims


def sentiment_group_claims(n: int = 128, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    claims = [_sentiment_claim(review, asserted, truth, consistency_id=f"review-{k}", answer=asserted)
              for k, (review, truth) in enumerate(_shuffled_reviews(rng)[:n // 2])
              for asserted in ("positive", "negative")]
    rng.shuffle(claims)
    return claims


def capital_group_claims(n: int = 128, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    countries = sorted(CAPITALS)
    claims = []
    for country in rng.sample(countries, min(n // 2, len(countries))):
        wrong = CAPITALS[rng.choice([c for c in countries if c != country])]
        for capital in (CAPITALS[country], wrong):
            claims.append(_capital_claim(country, capital, capital == CAPITALS[country],
                                         consistency_id=country, answer=capital))
    rng.shuffle(claims)
    return claims


def sentiment_pivot_claims(n: int = 128, seed: int = 0) -> list[dict]:
    rows = [{"question": q.question, "answer": q.reference, "consistency_id": q.id, "reference": q.reference}
            for q in sentiment_questions(n, seed)]
    return answer_claims(rows, "pivot", ("positive", "negative")).rows


def truthfulqa_claims(n: int = 128, seed: int = 0) -> list[dict]:
    rows = json.loads((SHARED / "icm-paper" / "train_truthfulqa.json").read_text(encoding="utf-8"))
    groups: dict = {}
    for row in rows:
        groups.setdefault(row["consistency_id"], []).append(row)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    claims: list[dict] = []
    for key in keys:
        if len(claims) + len(groups[key]) > n:
            continue
        claims.extend(groups[key])
    return claims


CLAIM_SETS = {"sentiment": sentiment_claims, "capitals": capital_claims, "truthfulqa": truthfulqa_claims,
              "sentiment-groups": sentiment_group_claims, "capitals-groups": capital_group_claims,
              "sentiment-pivot": sentiment_pivot_claims}


def write_claims(name: str, path: Path, n: int = 128, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(c) + "\n" for c in CLAIM_SETS[name](n, seed)), encoding="utf-8")
    return path


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(CLAIM_SETS))
    parser.add_argument("output", type=Path)
    parser.add_argument("-n", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_claims(args.name, args.output, args.n, args.seed))
