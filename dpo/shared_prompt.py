"""DPO forward passes that run each pair's prompt once: its keys and values serve both answers.

TRL's ``DPOTrainer`` scores a batch as ``[prompt + chosen; prompt + rejected]``: every prompt goes through the
model twice (and, on CPU, every position through the LM head). ``install_shared_prompt`` replaces the fused
forward TRL puts on the model (``fused_lm_head=True``) by one that

1. runs the distinct prompts of the batch once (right-padded, with the cache on; the tokens all of them begin
   with, such as a system prompt and an instruction, once for the batch),
2. runs the answers' tokens after them, each row reusing its prompt's keys and values (gradients flow into the
   shared prompt pass), and
3. projects only the hidden states that predict an answer token through the LM head.

It returns the same ``FusedCausalLMOutput`` fields (log-probs, entropy, mean logits, top-1 hits) at the same
positions, so TRL's losses and metrics are unchanged; the policy, the reference (adapters disabled) and
``precompute_ref_log_probs`` all go through it. Batches it cannot split (no prompt, left padding, extra inputs,
gradient checkpointing, scaled or soft-capped logits) use TRL's forward.
"""

from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

_SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                  "logits_scaling")
"""Config fields that change the logits after the LM head: such models keep TRL's forward."""
_PASSED_THROUGH = {"input_ids", "attention_mask", "use_cache", "return_dict"}


@dataclass
class Plan:
    """How one batch splits into prompts and answers (rows ``r``, sequence positions ``t``).

    Fields:
        prompt_len: ``p_r``, the tokens before the first scored label of each row (its prompt).
        length: the non-padding tokens of each row.
        prompt_of: the index of each row's prompt among the distinct prompts.
        prompt_rows: for each distinct prompt, the first row that has it.
    """

    prompt_len: torch.Tensor
    length: torch.Tensor
    prompt_of: torch.Tensor
    prompt_rows: torch.Tensor


def plan_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> Plan | None:
    """The prompt/answer split of a right-padded batch, or None when it has none (then TRL's forward is used)."""
    width = input_ids.shape[1]
    scored = labels != -100
    if not bool(scored.any(dim=1).all()):
        return None
    positions = torch.arange(width, device=input_ids.device)
    length = attention_mask.sum(dim=1)
    if not torch.equal(attention_mask.bool(), positions < length[:, None]):  # only right padding
        return None
    prompt_len = scored.int().argmax(dim=1)
    if bool((prompt_len < 1).any()) or bool((scored & (positions >= length[:, None])).any()):
        return None
    rows: dict[tuple[int, ...], int] = {}
    prompt_of = []
    for ids, p in zip(input_ids.tolist(), prompt_len.tolist(), strict=True):
        prompt_of.append(rows.setdefault(tuple(ids[:p]), len(rows)))
    first = {u: r for r, u in reversed(list(enumerate(prompt_of)))}
    device = input_ids.device
    return Plan(prompt_len, length, torch.tensor(prompt_of, device=device),
                torch.tensor([first[u] for u in range(len(rows))], device=device))


def shared_prompt_outputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                          plan: Plan, outputs: tuple[str, ...], num_items_in_batch: Any = None):
    """``FusedCausalLMOutput`` of ``model`` (a causal LM) on the batch, computed with its prompts shared."""
    from transformers import DynamicCache
    from trl.trainer.utils import FusedCausalLMOutput

    device = input_ids.device
    n, width = input_ids.shape
    backbone = model.base_model
    cache_arg = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
    # 1. the distinct prompts, right-padded; the tokens they all begin with (a system prompt, an instruction) once
    prompt_len = plan.prompt_len[plan.prompt_rows]
    p_max = int(prompt_len.max())
    positions = torch.arange(p_max, device=device)
    prompt_mask = (positions < prompt_len[:, None]).long()
    prompt_ids = input_ids[plan.prompt_rows, :p_max] * prompt_mask
    same = (prompt_ids == prompt_ids[:1]).all(dim=0).tolist() + [False]
    common = min(same.index(False), int(prompt_len.min()) - 1) if len(prompt_ids) > 1 else 0
    cache = DynamicCache(config=model.config)
    if common > 0:
        backbone(input_ids=prompt_ids[:1, :common], position_ids=positions[None, :common], use_cache=True,
                 **{cache_arg: cache})
        cache = _select(cache, torch.zeros(len(prompt_ids), dtype=torch.long, device=device), model.config)
    prompt_out = backbone(input_ids=prompt_ids[:, common:], attention_mask=prompt_mask,
                          position_ids=positions[common:].expand(len(prompt_ids), -1), use_cache=True,
                          **{cache_arg: cache})
    # the last prompt position predicts the first answer token
    hidden = [prompt_out.last_hidden_state[plan.prompt_of, plan.prompt_len - 1 - common]]
    rows, cols = [torch.arange(n, device=device)], [plan.prompt_len - 1]
    # 2. the answer tokens but the last (whose successor is not scored), after their prompt's cache
    answer_len = plan.length - 1 - plan.prompt_len
    a_max = int(answer_len.max())
    if a_max > 0:
        steps = torch.arange(a_max, device=device)
        answer_mask = steps < answer_len[:, None]
        gather = (plan.prompt_len[:, None] + steps).clamp(max=width - 1)
        answer_ids = input_ids.gather(1, gather) * answer_mask
        cache = _select(cache, plan.prompt_of, model.config)  # the prompts' cache, one copy per row
        answer_out = backbone(input_ids=answer_ids,
                              attention_mask=torch.cat([prompt_mask[plan.prompt_of], answer_mask.long()], dim=1),
                              position_ids=plan.prompt_len[:, None] + steps, use_cache=True, **{cache_arg: cache})
        r, j = answer_mask.nonzero(as_tuple=True)
        hidden.append(answer_out.last_hidden_state[r, j])
        rows.append(r)
        cols.append(plan.prompt_len[r] + j)
    # 3. the LM head on the scored positions only; the outputs are laid out as TRL's (n, width - 1)
    rows, cols = torch.cat(rows), torch.cat(cols)
    targets = labels[rows, cols + 1]
    keep = targets != -100
    rows, cols, targets = rows[keep], cols[keep], targets[keep]
    lm_head = model.get_output_embeddings()
    hidden_states = torch.cat(hidden)[keep].to(lm_head.weight.device)
    # in float32 outside autocast, as TRL's fused head accumulates: bf16 logits shift log-probs by ~0.1 nat
    with torch.autocast(hidden_states.device.type, enabled=False):
        bias = None if lm_head.bias is None else lm_head.bias.float()
        logits = F.linear(hidden_states.float(), lm_head.weight.float(), bias)
    log_softmax = F.log_softmax(logits, dim=-1)
    mask = labels[:, 1:] != -100

    def place(values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(mask.shape).index_put((rows, cols), values)

    log_probs = place(log_softmax.gather(1, targets[:, None]).squeeze(1))
    extra: dict[str, torch.Tensor | None] = dict.fromkeys(("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))
    with torch.no_grad():
        if "entropy" in outputs:
            extra["entropy"] = place(-(log_softmax.exp() * log_softmax).sum(dim=-1))
        if "log_sum_sq_probs" in outputs:
            extra["log_sum_sq_probs"] = place(torch.logsumexp(2 * log_softmax, dim=-1))
        if "mean_logits" in outputs:
            extra["mean_logits"] = place(logits.mean(dim=-1))
        if "is_top1" in outputs:
            extra["is_top1"] = mask.new_zeros(mask.shape).index_put((rows, cols), logits.argmax(dim=-1) == targets)
    loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, label_mask=mask, **extra)


def _select(cache, rows: torch.Tensor, config):
    """A new cache holding the keys and values of ``cache``'s ``rows`` (repeats allowed; gradients flow back)."""
    from transformers import DynamicCache

    selected = DynamicCache(config=config)
    for i, layer in enumerate(cache.layers):
        selected.update(layer.keys[rows], layer.values[rows], i)
    return selected


def install_shared_prompt(model, outputs: tuple[str, ...]) -> bool:
    """Wrap the fused forward TRL added to ``model`` (the causal LM under any PEFT wrapper) so that batches with
    prompts share them; returns whether it was installed (models with scaled logits keep TRL's)."""
    text_config = model.config.get_text_config()
    if any(getattr(text_config, name, None) is not None for name in _SCALED_LOGITS) or \
            getattr(text_config, "output_router_logits", False):
        return False
    fused_forward = model.forward

    @functools.wraps(type(model).forward)  # as TRL's: generate checks its inputs against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, num_items_in_batch=None, **kwargs):
        plain = fused_lm_head and not args and labels is not None and "input_ids" in kwargs and \
            not self.is_gradient_checkpointing and \
            all(k in _PASSED_THROUGH or v is None for k, v in kwargs.items())
        plan = None
        if plain:
            input_ids = kwargs["input_ids"]
            attention_mask = kwargs.get("attention_mask")
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            plan = plan_batch(input_ids, attention_mask, labels)
        if plan is None:
            return fused_forward(*args, fused_lm_head=fused_lm_head, labels=labels,
                                 num_items_in_batch=num_items_in_batch, **kwargs)
        return shared_prompt_outputs(self, input_ids, attention_mask, labels, plan, outputs, num_items_in_batch)

    model.forward = types.MethodType(forward, model)
    return True
