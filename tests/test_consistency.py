import numpy as np
import pytest

from icm.config import ICMConfig
from icm.consistency import ConstraintIndex, build_constraints, consistency_fix, label_logprob
from icm.data.claims import Claim
from icm.search import metropolis_accept, temperature


def claims_for_one_question():
    return [Claim("q", "a", group="g", key="5"), Claim("q", "b", group="g", key="7"),
            Claim("q", "c", group="g", key="5"), Claim("q2", "d", group="h", key="1")]


def test_rules_between_claims_of_one_group_only():
    kinds = {(c.i, c.j): c.kind for c in build_constraints(claims_for_one_question())}
    assert kinds == {(0, 1): "exclusive", (0, 2): "equal", (1, 2): "exclusive"}


def test_comparison_claims_must_disagree():
    claims = [Claim("q", "A", "B", group="g"), Claim("q", "B", "A", group="g"), Claim("q", "A", "C", group="g")]
    (c,) = build_constraints(claims)
    assert (c.i, c.j, c.kind) == (0, 1, "asymmetric")
    assert c.violated(True, True) and c.violated(False, False) and not c.violated(True, False)


def test_consistency_fix_removes_planted_contradiction():
    index = ConstraintIndex(build_constraints(claims_for_one_question()))
    planted = {0: True, 1: True, 2: True}  # "5" and "7" both correct
    assert index.count(planted) == 2
    # The model leans towards "5" being right and "7" wrong.
    fixed = consistency_fix(planted, {0: 2.0, 1: -1.0, 2: 1.5}, index, alpha=1.0, rng=np.random.default_rng(0))
    assert index.count(fixed) == 0
    assert fixed == {0: True, 1: False, 2: True}
    assert planted == {0: True, 1: True, 2: True}  # input untouched


def test_consistency_fix_keeps_labels_the_model_insists_on():
    index = ConstraintIndex(build_constraints(claims_for_one_question()[:2]))
    # With a huge alpha, predictability outweighs one inconsistency: the fix is not an improvement.
    kept = consistency_fix({0: True, 1: True}, {0: 9.0, 1: 9.0}, index, alpha=100.0, rng=np.random.default_rng(0))
    assert kept == {0: True, 1: True}


def test_label_logprob_is_a_two_way_log_softmax():
    assert label_logprob(0.0, True) == pytest.approx(np.log(0.5))
    assert np.exp(label_logprob(2.0, True)) + np.exp(label_logprob(2.0, False)) == pytest.approx(1.0)


def test_metropolis_acceptance_rule():
    assert metropolis_accept(0.5, 1.0, u=0.999)  # improvements always
    assert metropolis_accept(-1.0, 1.0, u=0.30)  # exp(-1) = 0.368 > u
    assert not metropolis_accept(-1.0, 1.0, u=0.40)
    assert not metropolis_accept(-1.0, 0.01, u=1e-9)  # cold: worsening rejected


def test_temperature_schedule():
    config = ICMConfig()
    assert temperature(1, config) == pytest.approx(10.0)
    assert temperature(100, config) == pytest.approx(10.0 / (1 + 0.99 * np.log(100)))
    assert temperature(10**300, ICMConfig(final_temperature=1.0)) == 1.0
