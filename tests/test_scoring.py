import numpy as np
import pytest
import torch

from icm.config import PromptTemplate
from icm.data.claims import Claim
from icm.models import load_model
from icm.scoring import ClaimScorer, MutualPredictor, resolve_label_tokens


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir, dtype="fp32")


CLAIMS = [Claim(f"What is {a} + {b}?", f"The answer is {a + b + d}.", group=f"q{a}{b}", key=str(a + b + d))
          for a, b in [(2, 3), (4, 1), (6, 2)] for d in (0, 1, 2)]


def full_forward_log_odds(model, scorer, context, target):
    """Reference: one plain forward over context + target, no cache."""
    ids = torch.tensor([context + scorer.prompt_ids[target]])
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    return float(logits[scorer.true_id] - logits[scorer.false_id])


def test_label_words_are_single_tokens_with_the_space(tiny):
    _, tokenizer = tiny
    t, f, in_label = resolve_label_tokens(tokenizer, PromptTemplate())
    assert in_label and tokenizer.decode([t]) == " True" and tokenizer.decode([f]) == " False"
    with pytest.raises(ValueError, match="single tokens"):
        resolve_label_tokens(tokenizer, PromptTemplate(true_word="Definitely", false_word="Nope", space="prompt"))


def test_prompt_ends_before_the_label_space(tiny):
    model, tokenizer = tiny
    scorer = ClaimScorer(model, tokenizer, CLAIMS)
    assert tokenizer.decode(scorer.prompt_ids[0]).endswith("I think this claim is")
    paper = ClaimScorer(model, tokenizer, CLAIMS, PromptTemplate(space="prompt"))
    assert tokenizer.decode(paper.prompt_ids[0]).endswith("I think this claim is ")


def test_cached_scores_match_a_plain_forward_after_label_changes(tiny):
    model, tokenizer = tiny
    scorer = ClaimScorer(model, tokenizer, CLAIMS, chunk_size=8, batch_size=3)
    targets = [0, 4, 8]
    for labels in ([True] * 6, [True, False, True, True, False, True], [False] * 6):
        demos = list(zip([1, 2, 3, 5, 6, 7], labels))
        got = scorer.score(targets, demos, slot="s")
        context = scorer.context(demos, scorer.max_context_tokens)
        want = [full_forward_log_odds(model, scorer, context, t) for t in targets]
        np.testing.assert_allclose(got, want, atol=1e-4)
    # The second and third calls reused the cached prefix up to the first changed chunk.
    assert scorer.prefix_tokens < 3 * len(context)


def test_budget_never_cuts_the_target(tiny):
    model, tokenizer = tiny
    budget = 120
    scorer = ClaimScorer(model, tokenizer, CLAIMS, max_context_tokens=budget)
    demos = [(i, True) for i in range(1, 9)]
    longest = max(len(scorer.prompt_ids[t]) for t in (0, 3))
    context = scorer.context(demos, budget - longest)
    assert 0 < len(context) <= budget - longest < sum(len(scorer.demo_ids(i, True)) for i, _ in demos)
    got = scorer.score([0, 3], demos)
    want = [full_forward_log_odds(model, scorer, context, t) for t in (0, 3)]
    np.testing.assert_allclose(got, want, atol=1e-4)
    tight = ClaimScorer(model, tokenizer, CLAIMS, max_context_tokens=5)
    with pytest.raises(ValueError, match="longer than the context budget"):
        tight.score([0], demos)


def test_folds_spread_groups_and_exact_mode_is_leave_one_out(tiny):
    model, tokenizer = tiny
    scorer = ClaimScorer(model, tokenizer, CLAIMS)
    members = list(range(len(CLAIMS)))
    two = MutualPredictor(scorer, members, folds=3)
    for group in ("q23", "q41", "q62"):  # 3 claims per group over 3 folds: each sees its group-mates
        assert sorted(two.fold[i] for i in members if CLAIMS[i].group == group) == [0, 1, 2]
    loo = MutualPredictor(scorer, members, folds=0)
    labels = {i: i % 2 == 0 for i in members}
    assert all(i not in dict(loo.demos(loo.fold[i], labels)) for i in members)
    assert all(len(loo.demos(loo.fold[i], labels)) == len(members) - 1 for i in members)
    z = loo.log_odds(labels)
    reference = ClaimScorer(model, tokenizer, CLAIMS)
    assert z[4] == pytest.approx(reference.score([4], loo.demos(loo.fold[4], labels))[0], abs=1e-4)


def test_hidden_group_keeps_a_claims_group_mates_out_of_its_context(tiny):
    model, tokenizer = tiny
    scorer = ClaimScorer(model, tokenizer, CLAIMS)
    members = list(range(len(CLAIMS)))
    labels = {i: i % 2 == 0 for i in members}
    for folds in (2, 0):  # 0: leave-one-group-out
        predictor = MutualPredictor(scorer, members, folds=folds, see_group=False)
        for i in members:
            context = dict(predictor.demos(predictor.fold[i], labels))
            mates = {j for j in members if j != i and CLAIMS[j].group == CLAIMS[i].group}
            assert i not in context and not mates & set(context)
            assert len(context) == len(members) - 1 - len(mates) if folds == 0 else len(context) > 0


def test_leave_one_out_keeps_one_demonstration_order(tiny):
    model, tokenizer = tiny
    loo = MutualPredictor(ClaimScorer(model, tokenizer, CLAIMS), list(range(len(CLAIMS))), folds=0, order="fixed")
    labels = {i: True for i in range(len(CLAIMS))}
    for i in range(len(CLAIMS)):
        assert [j for j, _ in loo.demos(loo.fold[i], labels)] == [j for j in loo.order if j != i]


@pytest.mark.parametrize("order", ["labelling", "fixed"])
def test_reused_scores_match_a_plain_forward_after_any_sequence_of_label_changes(tiny, order):
    """Group-wise score reuse and two prefix versions per fold give a plain forward's log-odds (atol 1e-4,
    float32) whatever the history of label changes, and going back to the previous labelling is free."""
    model, tokenizer = tiny
    scorer = ClaimScorer(model, tokenizer, CLAIMS, chunk_size=8, batch_size=2)
    members = list(range(len(CLAIMS)))
    predictor = MutualPredictor(scorer, members, folds=2, order=order)
    rng = np.random.default_rng(0)
    labels: dict[int, bool] = {}
    for step in range(12):
        previous = dict(labels)
        i = int(rng.choice(members))
        labels[i] = not labels.get(i, bool(rng.random() < 0.5))
        z = predictor.log_odds(labels, members)
        for t in members:
            context = scorer.context(predictor.demos(predictor.fold[t], labels), scorer.max_context_tokens)
            assert z[t] == pytest.approx(full_forward_log_odds(model, scorer, context, t), abs=1e-4)
        if step % 3 == 2:  # undo (a rejected proposal): both folds' caches and scores are still there
            tokens = scorer.forward_tokens
            predictor.log_odds(previous, members)
            assert scorer.forward_tokens == tokens
            labels = previous


def test_prefix_caches_reuse_a_fixed_set_of_buffers(tiny):
    """However many label changes, the folds' prefix versions live in (folds x versions) sets of fixed-size
    buffers: a new version takes over the buffers of the one it replaces, nothing is reallocated."""
    model, tokenizer = tiny
    scorer = ClaimScorer(model, tokenizer, CLAIMS, chunk_size=8, batch_size=2)
    members = list(range(len(CLAIMS)))
    predictor = MutualPredictor(scorer, members, folds=2)
    rng = np.random.default_rng(1)
    labels: dict[int, bool] = {}
    seen: dict[int, torch.Tensor] = {}  # every key buffer ever used, kept alive so that ids stay unique
    for _ in range(30):
        i = int(rng.choice(members))
        labels[i] = not labels.get(i, bool(rng.random() < 0.5))
        predictor.log_odds(labels, members)
        for versions in scorer._slots.values():
            for prefix in versions:
                for layer in prefix.layers:
                    if prefix.tokens:  # an empty context runs nothing and may hold no buffers
                        assert layer.buffers[0].shape[-2] == scorer.capacity
                        seen[id(layer.buffers[0])] = layer.buffers[0]
    assert scorer.forward_tokens > 0 and 0 < len(seen) <= 2 * scorer.prefix_versions * scorer.n_layers


def test_attended_keys_count_what_each_token_run_attends_to(tiny):
    """A prefix run in chunks attends like one causal row (P (P + 1) / 2 keys); each target adds its length times the
    prefix plus its own triangle. A second call on the same prefix runs only the targets."""
    model, tokenizer = tiny
    scorer = ClaimScorer(model, tokenizer, CLAIMS, chunk_size=8)
    demos = [(i, True) for i in (1, 2, 3)]
    scorer.score([0, 4], demos, slot=0)
    p = scorer.prefix_tokens
    lengths = [len(scorer.prompt_ids[t]) for t in (0, 4)]
    targets = sum(n * p + n * (n + 1) // 2 for n in lengths)
    assert p > 8 and scorer.attended_keys == p * (p + 1) // 2 + targets
    scorer.score([0, 4], demos, slot=0)
    assert scorer.attended_keys == p * (p + 1) // 2 + 2 * targets


def test_long_targets_are_cut_into_batches_that_fit_after_the_prefix(tiny):
    model, tokenizer = tiny
    budget = 80
    scorer = ClaimScorer(model, tokenizer, CLAIMS, max_context_tokens=budget, batch_size=8)
    assert scorer.batch_tokens == budget < 8 * max(map(len, scorer.prompt_ids))
    targets = [0, 2, 4, 6, 8]
    batches = scorer._batches(targets)
    assert sorted(t for b in batches for t in b) == targets and len(batches) > 1
    assert all(sum(len(scorer.prompt_ids[t]) for t in b) <= budget for b in batches)
    demos = [(i, i % 2 == 0) for i in (1, 3, 5, 7)]
    got = scorer.score(targets, demos, slot=0)
    longest = max(len(scorer.prompt_ids[t]) for t in targets)
    context = scorer.context(demos, budget - longest)
    assert len(context) > 1
    want = [full_forward_log_odds(model, scorer, context, t) for t in targets]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_adding_a_label_rescores_only_its_own_group_where_the_context_is_unchanged(tiny):
    model, tokenizer = tiny
    members = list(range(len(CLAIMS)))
    cost = {}
    for reuse in (True, False):
        scorer = ClaimScorer(model, tokenizer, CLAIMS, batch_size=2)
        predictor = MutualPredictor(scorer, members, folds=2, reuse_targets=reuse)
        new = predictor.fold_members[1][0]
        labels = {i: i % 2 == 0 for i in members if i != new}
        predictor.log_odds(labels)
        before = scorer.target_tokens
        predictor.log_odds(labels | {new: True})
        cost[reuse] = scorer.target_tokens - before
    # Fold 0's context gained a demonstration: all its targets are re-scored. Fold 1's context is unchanged:
    # with reuse only the group of the new claim is scored again, without it the whole fold.
    length = [len(p) for p in scorer.prompt_ids]
    group = predictor.fold_members[1][:2]  # the first group of fold 1 (batch_size 2) holds the new claim
    assert cost[True] == sum(length[i] for i in predictor.fold_members[0] + group)
    assert cost[False] == sum(length[i] for i in members)


def test_labelling_order_appends_a_new_label_to_the_cached_prefix(tiny):
    """Demonstrations in labelling order: a fold's prompt lists the other folds' claims in the order they were first
    labelled (a flip keeps its place), so a new label re-runs only the prefix's last partial chunk and its own tokens;
    in the fixed order the same label lands mid-prompt and the rest of the prefix is recomputed."""
    model, tokenizer = tiny
    members, chunk = list(range(len(CLAIMS))), 4
    cost = {}
    for order in ("labelling", "fixed"):
        scorer = ClaimScorer(model, tokenizer, CLAIMS, chunk_size=chunk)
        predictor = MutualPredictor(scorer, members, folds=2, order=order)
        first = predictor.order[0]  # the first claim of the seeded order: the fixed order puts it first
        labels = {i: True for i in reversed(members) if predictor.fold[i] == predictor.fold[first] and i != first}
        other = 1 - predictor.fold[first]
        if order == "labelling":
            assert [i for i, _ in predictor.demos(other, labels)] == list(labels)
            flipped = labels | {next(iter(labels)): False}  # a flip keeps the claim's place
            assert [i for i, _ in predictor.demos(other, flipped)] == list(labels)
        predictor.log_odds(labels, predictor.fold_members[other])
        before = scorer.prefix_tokens
        predictor.log_odds(labels | {first: True}, predictor.fold_members[other])
        cost[order] = scorer.prefix_tokens - before
    new_demo = len(scorer.demo_ids(first, True))
    assert cost["labelling"] < chunk + new_demo < cost["fixed"]


def test_predicting_every_claim_runs_only_the_unlabelled_ones(tiny):
    """After the labelled claims are scored, predicting all claims scores the unlabelled targets only, and a
    labelled claim's log-odds are the same whichever other claims are asked for."""
    model, tokenizer = tiny
    scorer = ClaimScorer(model, tokenizer, CLAIMS, batch_size=4)
    members = list(range(len(CLAIMS)))
    predictor = MutualPredictor(scorer, members, folds=2)
    labels = {i: i % 3 == 0 for i in members[::2]}
    labelled = predictor.log_odds(labels)
    before = scorer.target_tokens
    everything = predictor.log_odds(labels, members)
    assert scorer.target_tokens - before == sum(len(scorer.prompt_ids[i]) for i in members if i not in labels)
    assert {i: everything[i] for i in labels} == labelled
