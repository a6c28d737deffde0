"""The shared-prompt DPO forward gives TRL's log-probs, metrics, losses and gradients on the same batches."""

from __future__ import annotations

import pytest
import torch

from icm.config import DPOTrainingConfig
from icm.dpo import reference, shared_prompt
from icm.dpo.shared_prompt import plan_batch
from icm.dpo.training import build_trainer

PAIRS = [
    {"prompt": "Is the review positive? The review is negative.", "chosen": "negative", "rejected": "positive"},
    {"prompt": "What is 2 + 3?", "chosen": "The answer is 5.", "rejected": "7"},
    {"prompt": "Is the sky green?", "chosen": "False", "rejected": "True"},
    {"prompt": "Paris is the capital of France. True or False?", "chosen": "True", "rejected": "False False"},
]

SHARED_OUTPUTS = shared_prompt.shared_prompt_outputs


@pytest.fixture(autouse=True)
def _empty_reference_cache():
    reference.clear_cache()
    yield
    reference.clear_cache()


def _trainer(tiny_model_dir, tmp_path, share: bool, lora: bool = True, pairs=PAIRS, reuse: bool = False,
             **overrides):
    config = DPOTrainingConfig(max_steps=2, batch_size=4, max_length=64, loss_type="sigmoid,sft",
                               loss_weights=(1.0, 1.0), save_steps=0, share_prompt=share, lora=lora,
                               lora_dropout=0.0, precision="fp32", reuse_reference=reuse, **overrides)
    out = tmp_path / f"{'shared' if share else 'trl'}-{'reuse' if reuse else 'inloop'}-{reference.cached_sequences()}"
    return build_trainer(pairs, tiny_model_dir, out, config, progress=False)


def _batch(trainer):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])


@pytest.mark.parametrize("lora", [True, False])
def test_loss_metrics_and_gradients_match_trl(tiny_model_dir, tmp_path, lora, monkeypatch):
    calls = []
    monkeypatch.setattr(shared_prompt, "shared_prompt_outputs",
                        lambda *a, **k: calls.append(1) or SHARED_OUTPUTS(*a, **k))
    results = []
    for share in (False, True):
        trainer = _trainer(tiny_model_dir, tmp_path, share, lora=lora)
        trainer.model.train()
        batch = _batch(trainer)
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        results.append((loss.item(), grads, metrics))
    (loss_a, grads_a, metrics_a), (loss_b, grads_b, metrics_b) = results
    assert len(calls) == 2  # the policy and the reference went through the shared forward, not TRL's
    assert loss_b == pytest.approx(loss_a, rel=1e-4)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6)
    assert metrics_a.keys() == metrics_b.keys()
    for key in metrics_a:
        assert metrics_b[key] == pytest.approx(metrics_a[key], rel=1e-4, abs=1e-6), key


def test_reference_log_probs_match_trl_with_adapters_disabled(tiny_model_dir, tmp_path):
    refs = []
    for share in (False, True):
        trainer = _trainer(tiny_model_dir, tmp_path, share)
        refs.append(torch.cat(trainer.compute_ref_log_probs(trainer.model, _batch(trainer))))
    torch.testing.assert_close(refs[1], refs[0], rtol=1e-5, atol=1e-5)


def test_plan_finds_the_shared_prompts_and_refuses_unsplittable_batches():
    ids = torch.tensor([[5, 6, 7, 8, 0], [9, 6, 7, 0, 0], [5, 6, 3, 3, 3], [9, 6, 4, 4, 0]])
    mask = (ids != 0).long()
    mask[2] = 1
    labels = ids.masked_fill(torch.tensor([[1, 1, 0, 0, 1], [1, 1, 0, 1, 1], [1, 1, 0, 0, 0], [1, 1, 0, 0, 1]],
                                          dtype=torch.bool), -100)
    plan = plan_batch(ids, mask, labels)
    assert plan.prompt_len.tolist() == [2, 2, 2, 2]
    assert plan.prompt_of.tolist() == [0, 1, 0, 1] and plan.prompt_rows.tolist() == [0, 1]
    assert plan_batch(ids, mask, labels.masked_fill(torch.ones_like(ids, dtype=torch.bool), -100)) is None
    assert plan_batch(ids, mask.flip(1), labels) is None  # left padding
    no_prompt = labels.clone()
    no_prompt[0, 0] = 5
    assert plan_batch(ids, mask, no_prompt) is None


def test_training_with_the_shared_prompt_follows_trl(tiny_model_dir, tmp_path):
    losses = []
    for share in (False, True):
        trainer = _trainer(tiny_model_dir, tmp_path, share, learning_rate=1e-2)
        trainer.train()
        losses.append([e["loss"] for e in trainer.state.log_history if "loss" in e])
    assert len(losses[0]) == 2
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)


def test_reference_scores_once_before_training_and_reused_by_the_next_run(tiny_model_dir, tmp_path):
    inloop = _trainer(tiny_model_dir, tmp_path, share=True)
    expected = inloop.compute_loss(inloop.model, _batch(inloop)).item()
    reused = _trainer(tiny_model_dir, tmp_path, share=True, reuse=True)
    assert reused.precompute_ref_logps and reference.cached_sequences() == 2 * len(PAIRS)
    assert reused.compute_loss(reused.model, _batch(reused)).item() == pytest.approx(expected, rel=1e-5)
    # another arm: the same answers, chosen and rejected swapped for half the pairs; nothing new to score
    swapped = [p if i % 2 else {**p, "chosen": p["rejected"], "rejected": p["chosen"]} for i, p in enumerate(PAIRS)]
    again = _trainer(tiny_model_dir, tmp_path, share=True, reuse=True, pairs=swapped)
    assert reference.cached_sequences() == 2 * len(PAIRS)
    chosen = again.train_dataset["ref_chosen_logps"]
    assert chosen[0] == reused.train_dataset["ref_rejected_logps"][0]
    assert chosen[1] == reused.train_dataset["ref_chosen_logps"][1]
    with torch.no_grad():  # the cached values are the reference's log-probs of these pairs
        direct = again.compute_ref_log_probs(again.model, _batch(again))[0]
    torch.testing.assert_close(direct, torch.tensor(chosen), rtol=1e-5, atol=1e-5)
