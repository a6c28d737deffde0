"""The search's speed options: the approximate U can be switched off, and exact score reuse changes nothing."""

import pytest

from icm.backends import InProcessBackend
from icm.config import ICMConfig
from icm.data.claims import claims_from_records
from icm.models import load_model
from icm.scoring import ClaimScorer
from icm.search import ICMSearch, label_claims
from tests.test_label import arithmetic_claims


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir, dtype="fp32")


def trajectory_and_exact_utilities(tiny, config: ICMConfig) -> tuple[list[float], list[float]]:
    model, tokenizer = tiny
    claims = claims_from_records(arithmetic_claims(5))
    search = ICMSearch(ClaimScorer(model, tokenizer, claims), list(range(len(claims))), config)
    exact: list[float] = []
    state, _ = search.run(on_step=lambda s: exact.append(search.evaluate(s.labels)[2]))
    return state.trajectory[1:], exact


def test_exact_every_1_scores_every_step_exactly(tiny):
    trajectory, exact = trajectory_and_exact_utilities(tiny, ICMConfig(iterations=40, exact_every=1, seed=2))
    assert trajectory == pytest.approx(exact, abs=1e-9)


def test_approximate_steps_are_caught_up_every_exact_every_steps(tiny):
    config = ICMConfig(iterations=40, exact_every=4, check_every=1, polish_iterations=0, seed=2)
    trajectory, exact = trajectory_and_exact_utilities(tiny, config)
    assert trajectory != pytest.approx(exact, abs=1e-9)  # in between, U is approximate
    # an exact step evaluates its proposal exactly and, if it rejects it, re-scores the current labels
    assert [trajectory[n - 1] for n in range(4, 41, 4)] == pytest.approx([exact[n - 1] for n in range(4, 41, 4)])


def test_every_check_every_th_exact_step_scores_its_proposal_exactly(tiny):
    """With ``check_every`` 2 the proposals of exact steps 2, 4, ... (and of the last annealing step) are scored
    exactly and counted; the other exact steps re-score the labels but decide on the approximate U, which costs
    fewer forward tokens than checking every one."""
    config = ICMConfig(iterations=40, exact_every=4, check_every=2, polish_iterations=0, seed=2)
    trajectory, exact = trajectory_and_exact_utilities(tiny, config)
    checked = [8, 16, 24, 32, 40]
    assert [trajectory[n - 1] for n in checked] == pytest.approx([exact[n - 1] for n in checked])
    model, tokenizer = tiny
    backend = InProcessBackend(model, tokenizer)
    claims = claims_from_records(arithmetic_claims(6))
    runs = {every: label_claims(claims, backend, ICMConfig(iterations=60, exact_every=3, check_every=every,
                                                                    polish_iterations=0, seed=1))[1]
            for every in (1, 2)}
    assert 0 < runs[2]["approximate_checks"] < runs[1]["approximate_checks"]
    assert runs[2]["forward_tokens"] < runs[1]["forward_tokens"]


def test_approximate_steps_predict_against_the_last_exact_context_and_run_no_prefix(tiny):
    """Between exact steps a sampled claim is predicted against the labels of the last exact step, whose prefix
    caches are kept: no prefix token is computed, and the prediction equals a plain forward over that context."""
    model, tokenizer = tiny
    claims = claims_from_records(arithmetic_claims(6))
    scorer = ClaimScorer(model, tokenizer, claims, batch_size=2)
    config = ICMConfig(iterations=48, exact_every=6, polish_iterations=0, seed=4)
    search = ICMSearch(scorer, list(range(len(claims))), config)
    start = search.initial_state()
    prefix = [scorer.prefix_tokens]
    contexts: list[dict[int, bool]] = []

    def on_step(state) -> None:
        prefix.append(scorer.prefix_tokens)
        contexts.append(dict(state.context))

    state, _ = search.run(start, on_step=on_step)
    approximate = [n for n in range(1, 49) if n % 6 and n != 48]
    assert all(prefix[n] == prefix[n - 1] for n in approximate)
    assert any(prefix[n] > prefix[n - 1] for n in range(6, 49, 6))
    assert sum(state.outcomes[n - 1] == 1 for n in approximate) > 0  # labels did change between exact steps
    assert all(contexts[n - 1] == contexts[n - 2] for n in approximate if n > 1)
    # the memoised prediction of every claim against the last exact context is a plain forward's
    reference = ICMSearch(ClaimScorer(model, tokenizer, claims, batch_size=2), search.members, config)
    fresh = reference.predictor.log_odds(state.context, search.members)
    cached = search.predictor.log_odds(state.context, search.members)
    assert cached == pytest.approx(fresh, abs=1e-4)


def test_approximate_polishing_ends_on_exact_scores(tiny):
    model, tokenizer = tiny
    claims = claims_from_records(arithmetic_claims(6))
    config = ICMConfig(iterations=12, polish_iterations=30, exact_every=4, seed=1)
    search = ICMSearch(ClaimScorer(model, tokenizer, claims), list(range(len(claims))), config)
    exact: list[float] = []
    state, _ = search.run(on_step=lambda s: exact.append(search.evaluate(s.labels)[2]))
    polish_exact = [n for n in range(16, state.iteration + 1, 4)]
    assert [state.trajectory[n] for n in polish_exact] == pytest.approx([exact[n - 1] for n in polish_exact])
    z, _, _ = search.evaluate(state.labels)
    if state.iteration < config.iterations + config.polish_iterations:  # stopped early, on exact scores
        assert search.contradicted(state.labels, z, state.rejected) is None


def test_score_reuse_keeps_the_previous_search(tiny):
    model, tokenizer = tiny
    backend = InProcessBackend(model, tokenizer)
    claims = claims_from_records(arithmetic_claims(6))
    runs = [label_claims(claims, backend, ICMConfig(iterations=50, exact_every=1, reuse_scores=reuse, seed=1,
                                                           scoring_batch_size=2))
            for reuse in (True, False)]
    assert [r["icm_label"] for r in runs[0][0]] == [r["icm_label"] for r in runs[1][0]]
    assert sum(runs[0][1]["trajectories"], []) == pytest.approx(sum(runs[1][1]["trajectories"], []), abs=1e-4)
    assert runs[0][1]["forward_tokens"] < runs[1][1]["forward_tokens"]


def test_run_json_counts_disagreements_of_approximate_and_exact_acceptance(tiny):
    model, tokenizer = tiny
    backend = InProcessBackend(model, tokenizer)
    claims = claims_from_records(arithmetic_claims(6))
    _, approximate = label_claims(claims, backend, ICMConfig(iterations=60, exact_every=3))
    _, exact = label_claims(claims, backend, ICMConfig(iterations=60, exact_every=1))
    assert 0 <= approximate["approximate_disagreements"] <= approximate["approximate_checks"] > 0
    assert exact["approximate_checks"] == 0
