"""bench/imbalanced_reviews.py: a questions file of the built-in reviews at a chosen positive share."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.imbalanced_reviews import imbalanced_reviews
from icm.data.tasks import load_questions

ROOT = Path(__file__).resolve().parents[1]


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 600), share=st.floats(0, 1), seed=st.integers(0, 3))
def test_the_share_is_met_and_reviews_are_distinct(n, share, seed):
    rows = imbalanced_reviews(n, share, seed)
    assert len(rows) == n == len({r["id"] for r in rows})
    assert sum(r["answer"] == "positive" for r in rows) == round(share * n)
    assert imbalanced_reviews(n, share, seed) == rows


def test_a_share_the_reviews_cannot_meet_is_refused():
    with pytest.raises(ValueError, match="need 540 positive"):
        imbalanced_reviews(600, 0.9)


def test_the_file_loads_as_questions_with_their_answers(tmp_path):
    out = tmp_path / "reviews.jsonl"
    subprocess.run([sys.executable, "-m", "bench.imbalanced_reviews", "--share", "0.75", "-n", "40", "--output",
                    str(out)], cwd=ROOT, check=True, capture_output=True)
    questions = load_questions(str(out), id_field="id")
    assert len(questions) == 40 and sum(q.reference == "positive" for q in questions) == 30
    assert json.loads(out.read_text().splitlines()[0])["question"].startswith("Is the sentiment")
