"""The reference model's log-probs of each pair, computed once before training and kept for later runs.

With LoRA the reference is the policy with its adapters disabled, so its log-prob of a (prompt, answer) sequence
depends only on the base model, the precision and the tokens. ``attach_reference`` scores every sequence of the
trainer's datasets that is not in the process-wide cache yet (in batches, with the trainer's own
``compute_ref_log_probs``), stores them as the ``ref_chosen_logps`` / ``ref_rejected_logps`` columns TRL's
``precompute_ref_log_probs`` would add, and switches the trainer to read them instead of running the reference at
every step. ``icm transfer``'s arms train on the same candidates in one process: the second arm's pairs are
(mostly) the first arm's sequences, chosen and rejected swapped or not, and need no reference pass at all.
"""

from __future__ import annotations

from typing import Any

_CACHE: dict[tuple, float] = {}
"""(model key, prompt length, token ids) -> the reference's summed log-prob of the answer tokens."""


def sequence_keys(example: dict[str, Any], max_length: int | None) -> tuple[tuple, tuple]:
    """The cache keys of a tokenized pair's chosen and rejected sequences, truncated as the collator does."""
    prompt = list(example["prompt_ids"])
    keys = []
    for answer in ("chosen_ids", "rejected_ids"):
        ids = (prompt + list(example[answer]))[:max_length]
        keys.append((min(len(prompt), len(ids)), tuple(ids)))
    return keys[0], keys[1]


def attach_reference(trainer, model_key: tuple, batch_size: int) -> int:
    """Give the trainer's train (and eval) dataset the reference log-probs of each pair, from the cache or computed
    now; returns how many pairs had to be scored."""
    scored = 0
    for name in ("train_dataset", "eval_dataset"):
        dataset = getattr(trainer, name)
        if dataset is None:
            continue
        keys = [sequence_keys(dataset[i], trainer.args.max_length) for i in range(len(dataset))]
        missing = [i for i, pair in enumerate(keys) if any((model_key, *k) not in _CACHE for k in pair)]
        trainer.model.eval()
        for lo in range(0, len(missing), batch_size):
            rows = missing[lo:lo + batch_size]
            batch = trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in rows]))
            chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)
            for i, c, r in zip(rows, chosen.tolist(), rejected.tolist(), strict=True):
                _CACHE[(model_key, *keys[i][0])] = c
                _CACHE[(model_key, *keys[i][1])] = r
        scored += len(missing)
        trainer.model.train()
        dataset = dataset.add_column("ref_chosen_logps", [_CACHE[(model_key, *k[0])] for k in keys])
        setattr(trainer, name, dataset.add_column("ref_rejected_logps", [_CACHE[(model_key, *k[1])] for k in keys]))
    trainer.precompute_ref_logps = True  # DPOTrainer._compute_loss now reads the columns
    return scored


def clear_cache() -> None:
    """Forget every cached reference log-prob (tests; a model changed on disk under the same path)."""
    _CACHE.clear()


def cached_sequences() -> int:
    """How many sequences' reference log-probs the cache holds."""
    return len(_CACHE)

