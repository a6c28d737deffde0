"""Label-quality estimate without gold: restarts and their vote, low margins, the surface-feature audit."""

import json

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from icm.backends import InProcessBackend
from icm.cli import app
from icm.config import ICMConfig
from icm.data.claims import Claim, claims_from_records
from icm.label import search_labels
from icm.models import load_model
from icm.quality import LOW_MARGIN, category_accuracy, label_quality, stump_accuracy, surface_audit, vote
from icm.search import label_claims
from tests.test_label import arithmetic_claims, write_jsonl

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir, dtype="fp32")


def test_vote_takes_the_majority_and_breaks_ties_by_the_mean_score():
    labels, scores, agreement = vote([[True, True, False, True], [True, False, False, False]],
                                     [[1.0, 0.5, -1.0, 0.2], [2.0, -2.0, -1.0, -0.1]])
    assert labels == [True, False, False, True]  # claim 1: tie, mean -0.75; claim 3: tie, mean +0.05
    assert scores == [1.5, -0.75, -1.0, pytest.approx(0.05)]
    assert agreement == [1.0, 0.5, 1.0, 0.5]
    labels, _, agreement = vote([[True], [False], [False]], [[3.0], [-0.1], [-0.1]])
    assert labels == [False] and agreement == [pytest.approx(2 / 3)]


def test_stump_and_category_accuracy():
    assert stump_accuracy([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert stump_accuracy([1, 2, 3, 4], [True, True, False, False]) == 1.0  # the inverse rule counts too
    assert stump_accuracy([5, 5, 5, 5], [True, False, True, True]) == 0.75  # one value: the majority only
    assert category_accuracy(["a", "a", "b", "b"], [True, True, False, False]) == 1.0
    # every value unique: a claim's own label never predicts itself, so no better than the others' majority
    assert category_accuracy(["a", "b", "c", "d"], [True, False, True, False]) == 0.0


def test_surface_audit_finds_a_cue_phrase_that_follows_the_labels():
    claims = [Claim(question=f"Review {k}", choice="The answer is positive." + (" I am sure this is right." if k % 2
                                                                                 else "")) for k in range(20)]
    labels = [k % 2 == 1 for k in range(20)]
    audit = surface_audit(claims, labels)
    assert audit["features"]["cue"] == 1.0 and audit["cue_phrase"] in ("i am sure", "this is right")
    assert audit["majority_share"] == 0.5 and audit["lift"] == 0.5
    quality = label_quality(claims, labels, [3.0] * 20)
    assert any("alone predicts" in w for w in quality["warnings"]) and quality["score"] == 0.5
    shuffled = [k % 3 == 0 for k in range(20)]  # labels unrelated to the cue
    assert surface_audit(claims, shuffled)["features"]["cue"] < 0.75


def test_low_margin_share_counts_scores_below_the_threshold():
    claims = [Claim(question=f"q{k}", choice="c") for k in range(4)]
    scores = [0.01, -0.02, 3.0, -3.0]  # sd about 2.1: the first two are within 0.25 sd of 0
    quality = label_quality(claims, [True, False, True, False], scores)
    assert quality["low_margin"]["share"] == 0.5 and quality["agreement"] is None
    assert quality["low_margin"]["threshold"] == pytest.approx(LOW_MARGIN * 2.1213, rel=1e-3)
    scaled = label_quality(claims, [True, False, True, False], [100 * s for s in scores])  # scale-free
    assert scaled["low_margin"]["share"] == 0.5


def test_restarts_vote_over_independent_seeds(tiny):
    model, tokenizer = tiny
    rows = arithmetic_claims(4)
    claims = claims_from_records(rows)
    backend = InProcessBackend(model, tokenizer)
    config = ICMConfig(iterations=12, seed=3, restarts=3)
    results, summary = search_labels(claims, backend, config, show_progress=False)
    singles = [label_claims(claims, backend, ICMConfig(iterations=12, seed=s))[0] for s in (3, 4, 5)]
    for i, r in enumerate(results):
        votes = [s[i]["icm_label"] for s in singles]
        assert r["icm_label"] == (sum(votes) >= 2)
        assert r["icm_agreement"] == pytest.approx(votes.count(r["icm_label"]) / 3)
        assert r["icm_score"] == pytest.approx(sum(s[i]["icm_score"] for s in singles) / 3)
    assert [x["seed"] for x in summary["restarts"]] == [3, 4, 5]
    agree = summary["quality"]["agreement"]
    assert agree["restarts"] == 3
    assert agree["mean"] == pytest.approx(sum(r["icm_agreement"] for r in results) / len(results))
    # one restart is today's search, bit for bit, with a quality object but no agreement
    one, one_summary = search_labels(claims, backend, ICMConfig(iterations=12, seed=3), show_progress=False)
    assert one == singles[0] and one_summary["quality"]["agreement"] is None


def test_label_cli_restarts_write_agreement_column_and_quality(tiny_model_dir, tmp_path):
    src = write_jsonl(tmp_path / "claims.jsonl", arithmetic_claims())
    out = tmp_path / "labels.parquet"
    result = runner.invoke(app, ["label", str(src), "--output", str(out), "--model", tiny_model_dir,
                                 "--iterations", "10", "--restarts", "3", "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    assert "label quality" in result.output
    agreement = pq.read_table(out).column("icm_agreement").to_pylist()
    assert all(a in (pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0) for a in agreement)
    assert min(agreement) >= 2 / 3 - 1e-9  # three restarts: the vote has at least two of them
    run = json.loads((tmp_path / "labels.run" / "run.json").read_text())
    assert run["config"]["restarts"] == 3 and run["quality"]["agreement"]["restarts"] == 3
    assert run["quality"]["agreement"]["mean"] == pytest.approx(sum(agreement) / len(agreement))
    assert (tmp_path / "labels.run" / "restart-2" / "checkpoint.json").exists()
    bad = runner.invoke(app, ["label", str(src), "--output", str(out), "--model", tiny_model_dir, "--restarts", "0"])
    assert bad.exit_code == 2


def test_estimate_share_finds_the_share_of_two_separated_classes():
    import numpy as np

    from icm.scoring import SHARE_LIMITS, estimate_share, threshold

    rng = np.random.default_rng(0)
    for share in (0.25, 0.75):
        truth = rng.random(400) < share
        scores = np.where(truth, rng.normal(3, 1, 400), rng.normal(-1, 1, 400))
        estimated, separation = estimate_share(scores)
        assert abs(estimated - share) < 0.08 and separation > 1.5
        cut = threshold(scores, (estimated, separation))
        # the mean pulls the cut into the larger class; the estimated threshold does not
        assert np.mean((scores > cut) == truth) > np.mean((scores > scores.mean()) == truth) + 0.05
    few = np.r_[rng.normal(-5, 0.5, 98), rng.normal(5, 0.5, 2)]
    assert estimate_share(few)[0] == SHARE_LIMITS[0]  # the collapse guard: clipped
    assert estimate_share([1.0, 1.0, 1.0, 1.0]) == (0.5, 0.0)
    assert threshold([0.0, 2.0], (0.5, 3.0)) == 1.0  # share one half: the mean


def test_balance_estimate_searches_and_reports_the_estimated_share(tiny):
    model, tokenizer = tiny
    claims = claims_from_records(arithmetic_claims(4))
    backend = InProcessBackend(model, tokenizer)
    results, summary = label_claims(claims, backend, ICMConfig(iterations=12, balance="estimate"))
    assert len(results) == len(claims) and 0.05 <= summary["estimated_true_share"] <= 0.95
    center, center_summary = label_claims(claims, backend, ICMConfig(iterations=12))
    assert "estimated_true_share" not in center_summary
    with pytest.raises(ValueError, match="balance"):
        ICMConfig(balance="half")


def test_failure_mode_sets_have_the_share_the_cue_and_the_unanswerable_items():
    import numpy as np

    from bench.claimsets import sentiment_pivot_claims
    from bench.failure_modes import CUE, cue_set, share_set, spearman, unanswerable_set

    pool = sentiment_pivot_claims(1000, 0)
    for share in (0.1, 0.75):
        rows = share_set(pool, 40, share, 0)
        assert len(rows) == 40 and np.mean([r["label"] for r in rows]) == round(share * 40) / 40
    cued = cue_set(pool, 40, 0)
    on_false = np.mean([r["choice"].endswith(CUE) for r in cued if not r["label"]])
    on_true = np.mean([r["choice"].endswith(CUE) for r in cued if r["label"]])
    assert on_false > 0.6 and on_true < 0.3
    cut = [r for r in unanswerable_set(pool, 40, 0) if r.get("unanswerable")]
    assert len(cut) == 20 and all(len(r["question"].split('Review: "')[1].split()) <= 2 for r in cut)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0) and spearman([1, 1, 1], [1, 2, 3]) is None
