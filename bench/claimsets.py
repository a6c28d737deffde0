"""Labelled claim sets for the benchmarks, built from ../shared/datasets (never copied into the repo).

- ``sentiment``: one claim per review sentence ("The sentiment of this review is positive/negative."),
  the polarity asserted at random, gold = whether it matches the review's label. Claims stand alone.
- ``capitals``: "The capital of X is Y." with Y the true capital or another country's, one claim per
  country, half true.
- ``truthfulqa``: the ICM paper's own TruthfulQA claims (with consistency groups), a seeded slice.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "United Kingdom": "London", "Ireland": "Dublin", "Netherlands": "Amsterdam", "Belgium": "Brussels",
    "Austria": "Vienna", "Switzerland": "Bern", "Poland": "Warsaw", "Czech Republic": "Prague",
    "Hungary": "Budapest", "Greece": "Athens", "Sweden": "Stockholm", "Norway": "Oslo", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Russia": "Moscow", "Ukraine": "Kyiv", "Turkey": "Ankara", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Nigeria": "Abuja", "South Africa": "Pretoria", "Morocco": "Rabat",
    "Ethiopia": "Addis Ababa", "Ghana": "Accra", "Algeria": "Algiers", "Tunisia": "Tunis", "Senegal": "Dakar",
    "China": "Beijing", "Japan": "Tokyo", "South Korea": "Seoul", "India": "New Delhi", "Pakistan": "Islamabad",
    "Bangladesh": "Dhaka", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta",
    "Philippines": "Manila", "Malaysia": "Kuala Lumpur", "Iran": "Tehran", "Iraq": "Baghdad",
    "Saudi Arabia": "Riyadh", "Israel": "Jerusalem", "Afghanistan": "Kabul", "Nepal": "Kathmandu",
    "Mongolia": "Ulaanbaatar", "United States": "Washington", "Canada": "Ottawa", "Mexico": "Mexico City",
    "Cuba": "Havana", "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Chile": "Santiago", "Peru": "Lima",
    "Colombia": "Bogota", "Venezuela": "Caracas", "Australia": "Canberra", "New Zealand": "Wellington",
    "Iceland": "Reykjavik", "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade",
    "Croatia": "Zagreb", "Syria": "Damascus", "Lebanon": "Beirut", "Jordan": "Amman", "Qatar": "Doha",
    "Cambodia": "Phnom Penh", "Sri Lanka": "Colombo", "Uruguay": "Montevideo", "Bolivia": "La Paz",
    "Ecuador": "Quito", "Libya": "Tripoli", "Sudan": "Khartoum", "Uganda": "Kampala", "Zimbabwe": "Harare",
}


def sentiment_claims(n: int = 128, seed: int = 0) -> list[dict]:
    lines = (SHARED / "sentiment" / "amazon_cells_labelled.txt").read_text(encoding="utf-8").splitlines()
    rows = [line.rsplit("\t", 1) for line in lines if "\t" in line]
    rng = random.Random(seed)
    rng.shuffle(rows)
    claims = []
    for k, (sentence, polarity) in enumerate(rows[:n]):
        asserted = "positive" if k % 2 == 0 else "negative"
        truth = "positive" if polarity.strip() == "1" else "negative"
        claims.append({"question": f"Review: {sentence.strip()}",
                       "choice": f"The sentiment of this review is {asserted}.", "label": asserted == truth})
    rng.shuffle(claims)
    return claims


def capital_claims(n: int = 128, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    countries = sorted(CAPITALS)
    claims = []
    for k in range(n):
        country = countries[k % len(countries)]
        true = (k // len(countries) + k) % 2 == 0
        capital = CAPITALS[country] if true else CAPITALS[rng.choice([c for c in countries if c != country])]
        claims.append({"question": f"What is the capital of {country}?",
                       "choice": f"The capital of {country} is {capital}.", "label": true})
    rng.shuffle(claims)
    return claims


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


CLAIM_SETS = {"sentiment": sentiment_claims, "capitals": capital_claims, "truthfulqa": truthfulqa_claims}


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
