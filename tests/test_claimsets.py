"""The benchmark claim sets built from ../shared/datasets (skipped where that folder is absent)."""

import pytest

from bench.claimsets import CLAIM_SETS, SHARED
from icm.consistency import build_constraints
from icm.data.claims import claims_from_records, gold_labels

pytestmark = pytest.mark.skipif(not SHARED.exists(), reason="../shared/datasets is not beside the checkout")


@pytest.mark.parametrize("name", ["sentiment", "capitals"])
def test_stand_alone_sets_ask_each_question_once_and_are_balanced(name):
    records = CLAIM_SETS[name](128, 0)
    claims = claims_from_records(records, name)
    assert len({c.question for c in claims}) == 128
    assert build_constraints(claims) == []
    assert 0.35 < sum(gold_labels(records, name)) / 128 < 0.65


@pytest.mark.parametrize("name", ["sentiment-groups", "capitals-groups"])
def test_group_sets_pair_one_true_and_one_false_answer_per_question(name):
    records = CLAIM_SETS[name](128, 0)
    claims, gold = claims_from_records(records, name), gold_labels(records, name)
    constraints = build_constraints(claims)
    assert len(constraints) == 64 and {c.kind for c in constraints} == {"exclusive"}
    assert all(gold[c.i] != gold[c.j] for c in constraints)
    assert CLAIM_SETS[name](128, 0) == records  # seeded


def test_pivot_set_is_the_demos_formulation_one_claim_per_review():
    records = CLAIM_SETS["sentiment-pivot"](64, 0)
    claims, gold = claims_from_records(records, "pivot"), gold_labels(records, "pivot")
    assert {c.choice for c in claims} == {"The answer is positive."}  # no word in the claim predicts its label
    assert len({c.question for c in claims}) == 64 and build_constraints(claims) == []
    assert 0.35 < sum(gold) / 64 < 0.65 and CLAIM_SETS["sentiment-pivot"](64, 0) == records
