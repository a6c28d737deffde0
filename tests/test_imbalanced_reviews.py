"""bench/imbalanced_reviews.py (a questions file of the built-in reviews at a chosen positive share) and the
helpers of bench/share_estimate.py."""

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
@given(n=st.integers(1, 500), share=st.floats(0, 1), seed=st.integers(0, 3))  # 500 of each class
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


def test_share_estimate_helpers_keep_the_wording_and_rank_at_a_share():
    from bench.share_estimate import CONTENT_FREE, accuracy_at, content_free_rows

    asked = "Is the sentiment positive or negative?\nReview: "
    row = {"question": f'{asked}"Great phone."', "choice": "The answer is positive.", "consistency_id": "r1",
           "label": True}
    free = content_free_rows(row)
    assert [r["question"] for r in free] == [f'{asked}"{t}"' for t in CONTENT_FREE]
    assert all(r["choice"] == row["choice"] for r in free) and len({r["consistency_id"] for r in free}) == 3
    gold = [True, False, True, False]
    assert accuracy_at([0, 2, 1, 3], gold, 0.5) == 1.0
    assert accuracy_at([0, 2, 1, 3], gold, 0.0) == 0.5
    assert accuracy_at([1, 3, 0, 2], gold, 0.5) == 0.0
