"""Scoring claims: the log-odds of " True" vs " False" after a context of labelled demonstrations.

The expensive part of ICM is computing, for every labelled claim, P(label | claim, the other labelled
claims). Four things make it cheap on a CPU:

- only the two label logits are computed, from the last hidden state of each target (no vocab-wide head);
- the demonstration prefix is run once and its KV cache is shared by a batch of targets;
- a prefix cache is kept per "slot" and, when the demonstrations change, only the tokens from the first
  changed chunk onwards are recomputed. Chunks sit at fixed absolute positions, so the cache of a given
  token sequence is computed the same way whatever the history, and results are reproducible on resume;
- every prefix cache lives in buffers of one fixed size, which a new version takes over from the version it
  replaces, and both appending a chunk and scoring targets write into them in place: a long search uses the same few
  buffers again and again (concatenating into ever-different sizes fragmented the heap, and the process's
  memory kept growing) and copies no cache per chunk or per target batch.

:class:`MutualPredictor` splits the claims into folds: a claim is scored with the labelled claims of the
other folds as context. ``folds=0`` is exact leave-one-out (one fold per claim).
"""

from __future__ import annotations

import inspect
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from icm.config import DEMO_ORDERS, PromptTemplate
from icm.data.claims import Claim


def unescape(text: str, name: str = "text") -> str:
    """``text`` with its Python escapes (``\\n``, ``\\t``, ``\\u00e9``) read, e.g. a separator given on the
    command line; a bad escape is a ``ValueError`` naming ``name``."""
    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as error:
        raise ValueError(f"{name}: bad escape in {text!r} ({error.reason})") from None


def _single_token(tokenizer, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def resolve_label_tokens(tokenizer, template: PromptTemplate) -> tuple[int, int, bool]:
    """Token ids of the True/False words and whether the space belongs to the label token."""
    spaced = (_single_token(tokenizer, " " + template.true_word), _single_token(tokenizer, " " + template.false_word))
    bare = (_single_token(tokenizer, template.true_word), _single_token(tokenizer, template.false_word))
    use_label_space = template.space == "label" or (template.space == "auto" and None not in spaced)
    ids = spaced if use_label_space else bare
    if None in ids:
        words = [(" " if use_label_space else "") + w for w in (template.true_word, template.false_word)]
        raise ValueError(f"label words {words} are not single tokens for this tokenizer; choose other words")
    return ids[0], ids[1], use_label_space


def _common(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = min(len(a), len(b))
    return next((k for k in range(n) if a[k] != b[k]), n)


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


class _BufferLayer(DynamicLayer):
    """One layer's keys and values, the first ``length`` positions of two fixed-size buffers; ``update`` writes the
    new positions after them in place (``DynamicLayer`` concatenates into new tensors). Buffers are allocated at the
    first update when none are given."""

    def __init__(self, capacity: int, buffers: tuple[torch.Tensor, torch.Tensor] | None = None, length: int = 0):
        super().__init__()
        self.capacity, self.buffers, self.length = capacity, buffers, length
        if buffers is not None:
            self.device, self.is_initialized = buffers[0].device, True
            self.keys, self.values = (b[..., :length, :] for b in buffers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.buffers is None:
            self.buffers = tuple(s.new_empty((*s.shape[:-2], self.capacity, s.shape[-1]))
                                 for s in (key_states, value_states))
            self.device, self.is_initialized = key_states.device, True
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"prefix cache overflow: {end} positions in buffers of {self.capacity}")
        for buffer, states in zip(self.buffers, (key_states, value_states)):
            buffer[..., self.length:end, :] = states
        self.length = end
        self.keys, self.values = (b[..., :end, :] for b in self.buffers)
        return self.keys, self.values


def _attended(tokens: int, past: int) -> int:
    """Key positions that ``tokens`` new tokens attend to, causally, after ``past`` cached ones."""
    return tokens * past + tokens * (tokens + 1) // 2


def _cache(layers: list[_BufferLayer]) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = layers
    return cache


def _buffers(prefix: _Prefix | None) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The buffers of ``prefix``'s layers, if it has any."""
    if prefix is None or not prefix.layers or prefix.layers[0].buffers is None:
        return None
    return [layer.buffers for layer in prefix.layers]


@dataclass
class _Prefix:
    tokens: list[int] = field(default_factory=list)
    layers: list[_BufferLayer] = field(default_factory=list)
    """One per model layer (none in the empty placeholder); their buffers belong to this prefix alone, and a prefix
    of no tokens may have none allocated."""


class ClaimScorer:
    """Log-odds of True vs False for target claims after demonstrations, with prefix-cache reuse."""

    def __init__(self, model, tokenizer, claims: list[Claim], template: PromptTemplate | None = None,
                 max_context_tokens: int | None = None, batch_size: int = 16, chunk_size: int = 128,
                 prefix_versions: int = 2):
        self.model, self.claims = model, claims
        self.template = template or PromptTemplate()
        self.true_id, self.false_id, label_space = resolve_label_tokens(tokenizer, self.template)
        strip = 1 if label_space else 0

        def encode(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False)

        prompts = [self.template.render(c) for c in claims]
        self.prompt_ids = [encode(p[:-1] if strip and p.endswith(" ") else p) for p in prompts]
        self.label_ids = {True: [self.true_id], False: [self.false_id]}
        self.sep_ids = encode(self.template.separator)
        self.bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None) or 2048
        self.max_context_tokens = min(max_context_tokens or limit, limit)
        self.batch_size, self.chunk_size = batch_size, chunk_size
        # Positions a target batch may add after its prefix: batches are also cut at this many tokens (a claim
        # longer than it goes alone), so every prefix buffer fits its prefix plus any batch.
        self.batch_tokens = min(batch_size * max(map(len, self.prompt_ids), default=1), self.max_context_tokens)
        self.capacity = self.max_context_tokens + self.batch_tokens
        self.prefix_versions = max(prefix_versions, 1)  # prefix caches kept per slot (see _sync)
        self._free: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # a throwaway prefix's buffers, to reuse
        self.n_layers = model.config.get_text_config().num_hidden_layers
        self.decoder = model.get_decoder()
        # transformers >= 5.2x names the KV-cache argument ``cache`` (``past_key_values`` is deprecated there)
        self.cache_arg = "cache" if "cache" in inspect.signature(self.decoder.forward).parameters else "past_key_values"
        head = model.get_output_embeddings()
        self.label_head = head.weight[[self.true_id, self.false_id]].detach().float()
        text_config = model.config.get_text_config()
        self.softcap = getattr(text_config, "final_logit_softcapping", None)
        layer_types = getattr(text_config, "layer_types", None) or ()
        sliding = "sliding_attention" in layer_types
        self.sliding_window = getattr(text_config, "sliding_window", None) if sliding else None
        self.device = next(model.parameters()).device
        self._slots: dict[Hashable, list[_Prefix]] = {}  # per slot, least recently used first
        self.prefix_tokens = 0  # tokens run through the model for demonstration prefixes
        self.target_tokens = 0  # tokens run for the claims being scored
        self.uncached_tokens = 0  # what the same scores would cost with every context run from scratch
        self.attended_keys = 0  # over the tokens run, the key positions each attends to (attention's cost)

    @property
    def forward_tokens(self) -> int:
        return self.prefix_tokens + self.target_tokens

    def demo_ids(self, idx: int, label: bool) -> list[int]:
        return self.prompt_ids[idx] + self.label_ids[label] + self.sep_ids

    def context(self, demos: Iterable[tuple[int, bool]], budget: int) -> list[int]:
        """BOS plus demonstrations, in order, skipping any that would push the total over ``budget``."""
        tokens = list(self.bos)
        for idx, label in demos:
            demo = self.demo_ids(idx, label)
            if len(tokens) + len(demo) <= budget:
                tokens += demo
        return tokens

    def score(self, targets: list[int], demos: Iterable[tuple[int, bool]] = (),
              slot: Hashable | None = None) -> np.ndarray:
        """Log-odds (True minus False) of each target, after ``demos`` as (claim index, label) pairs.

        Demonstrations are packed in order into the token budget left by the longest target, so a target
        is never cut. ``slot`` names a prefix cache to reuse between calls; None uses a throwaway one.
        """
        if not targets:
            return np.zeros(0)
        prefix = self._sync(slot, self._context_for(targets, demos))
        out: dict[int, float] = {}
        for batch in self._batches(targets):
            out.update(zip(batch, self._score_batch(prefix, batch)))
        if slot is None:
            self._release(prefix)
        return np.array([out[t] for t in targets])

    def _batches(self, targets: list[int]) -> list[list[int]]:
        """Targets by length, cut into batches of at most ``batch_size`` targets and ``batch_tokens`` tokens."""
        batches: list[list[int]] = []
        tokens = 0
        for t in sorted(targets, key=lambda t: (len(self.prompt_ids[t]), t)):
            n = len(self.prompt_ids[t])
            if not batches or len(batches[-1]) == self.batch_size or tokens + n > self.batch_tokens:
                batches.append([])
                tokens = 0
            batches[-1].append(t)
            tokens += n
        return batches

    def _release(self, prefix: _Prefix) -> None:
        """Keep a throwaway prefix's buffers for the next one (one set at most)."""
        if (buffers := _buffers(prefix)) and not self._free:
            self._free.append(buffers)

    def keep(self, targets: list[int], demos: Iterable[tuple[int, bool]], slot: Hashable) -> None:
        """Mark the prefix cache that ``score(targets, demos, slot)`` would use as just used, if ``slot`` holds
        it, so that it outlives the next other version; runs no model (for callers that reuse its scores)."""
        tokens = self._context_for(targets, demos)
        versions = self._slots.get(slot, [])
        for prefix in versions:
            if prefix.tokens == tokens:
                versions.remove(prefix)
                versions.append(prefix)
                return

    def _context_for(self, targets: list[int], demos: Iterable[tuple[int, bool]]) -> list[int]:
        """The prefix tokens of ``targets`` after ``demos``: packed into the budget left by the longest target."""
        longest = max(len(self.prompt_ids[t]) for t in targets)
        if longest + len(self.bos) > self.max_context_tokens:
            raise ValueError(f"a claim is {longest} tokens, longer than the context budget {self.max_context_tokens}")
        return self.context(demos, self.max_context_tokens - longest)

    @torch.inference_mode()
    def _sync(self, slot: Hashable | None, tokens: list[int]) -> _Prefix:
        """The cache of ``tokens``, computed from the stored version of ``slot`` that shares the longest
        prefix with it. Up to ``prefix_versions`` versions are kept per slot, so after a rejected proposal
        the previous context is still cached. A kept version's positions are never modified: a new version
        takes the buffers of the version it replaces (or the free ones, or new ones), copies the shared chunks
        into them unless they are already there (the replaced version was the base), and appends."""
        versions = self._slots.setdefault(slot, []) if slot is not None else []
        base = max(versions, key=lambda p: _common(p.tokens, tokens), default=_Prefix())
        if versions and base.tokens == tokens:
            versions.remove(base)
            versions.append(base)
            return base
        keep = _common(base.tokens, tokens) // self.chunk_size * self.chunk_size
        dropped = versions.pop(0) if len(versions) >= self.prefix_versions else None
        buffers = _buffers(dropped) or (self._free.pop() if self._free else None)
        in_place = dropped is base and buffers is not None
        prefix = _Prefix(list(tokens), [_BufferLayer(self.capacity, buffers[i] if buffers else None,
                                                     keep if in_place else 0) for i in range(self.n_layers)])
        for layer, old in zip(prefix.layers, [] if in_place or not keep else base.layers):
            layer.update(old.keys[..., :keep, :], old.values[..., :keep, :])
        cache = _cache(prefix.layers)
        for start in range(keep, len(tokens), self.chunk_size):
            piece = tokens[start:start + self.chunk_size]
            self.decoder(input_ids=torch.tensor([piece], device=self.device), **{self.cache_arg: cache},
                         position_ids=torch.arange(start, start + len(piece), device=self.device)[None],
                         use_cache=True)
            self.prefix_tokens += len(piece)
            self.attended_keys += _attended(len(piece), start)
        versions.append(prefix)
        return prefix

    @torch.inference_mode()
    def _score_batch(self, prefix: _Prefix, batch: list[int]) -> list[float]:
        """Score targets packed into one row after the prefix: each attends to the prefix and to itself
        only (a block-diagonal 4D mask), so the prefix's KV cache is used as is, never copied per target."""
        lengths = [len(self.prompt_ids[t]) for t in batch]
        past, total = len(prefix.tokens), sum(lengths)
        ids = torch.tensor([[tok for t in batch for tok in self.prompt_ids[t]]], device=self.device)
        owner = torch.repeat_interleave(torch.arange(len(batch)), torch.tensor(lengths))
        offset = torch.cat([torch.arange(n) for n in lengths])
        positions = past + offset  # every target starts right after the prefix
        same_target = (owner[:, None] == owner[None, :]) & (offset[:, None] >= offset[None, :])
        mask = torch.cat([torch.ones(total, past, dtype=torch.bool), same_target], dim=1)
        key_positions = torch.cat([torch.arange(past), positions])
        masks: torch.Tensor | dict[str, torch.Tensor] = mask[None, None].to(self.device)
        if self.sliding_window:
            sliding = mask & (positions[:, None] - key_positions[None, :] < self.sliding_window)
            masks = {"full_attention": masks, "sliding_attention": sliding[None, None].to(self.device)}
        # The targets' keys and values go into the prefix's buffers after its positions, which stay as they were
        cache = _cache([_BufferLayer(self.capacity, layer.buffers, past) for layer in prefix.layers]) if past else None
        hidden = self.decoder(input_ids=ids, attention_mask=masks, position_ids=positions[None].to(self.device),
                              **{self.cache_arg: cache}, use_cache=cache is not None).last_hidden_state[0]
        ends = torch.cumsum(torch.tensor(lengths), 0) - 1
        logits = hidden[ends.to(self.device)].float() @ self.label_head.T
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        self.target_tokens += total
        self.uncached_tokens += len(batch) * past + total
        self.attended_keys += sum(_attended(n, past) for n in lengths)
        return (logits[:, 0] - logits[:, 1]).tolist()


class MutualPredictor:
    """Each claim's log-odds given the *other* labelled claims, with claims split into folds.

    A claim in fold f is scored with the labelled claims of every other fold as demonstrations, so one
    prefix cache serves the whole fold. ``folds=0`` gives exact leave-one-out (one fold per claim).
    ``see_group=True`` spreads the claims of one consistency group over different folds, so each sees its
    group-mates' labels, as in the paper's prompts; ``False`` keeps a group in one fold (leave-one-group-out
    with ``folds=0``), so a claim is predicted from other questions only and a small model cannot just copy
    the label of a near-identical group-mate. ``reuse_targets=False`` scores a fold's targets as one set (the
    previous behaviour: adding one label re-scores its whole fold even when the fold's context is unchanged).

    ``order`` is the order of the demonstrations: ``labelling`` is the order in which the claims were first
    labelled (the insertion order of the ``labels`` dict), so a new label appends to its fold's prompt and only
    its own tokens are run; ``fixed`` is a seeded order grouped by consistency group, each fold starting at a
    different place (a new label lands mid-prompt and everything after it is recomputed).
    """

    def __init__(self, scorer: ClaimScorer, members: list[int], folds: int, seed: int = 0, see_group: bool = True,
                 reuse_targets: bool = True, order: str = "labelling"):
        if order not in DEMO_ORDERS:
            raise ValueError(f"demonstration order must be 'labelling' or 'fixed', not {order!r}")
        self.scorer, self.members, self.demo_order = scorer, members, order
        rng = np.random.default_rng(seed)
        groups: dict[str, list[int]] = {}
        for idx in members:
            group = scorer.claims[idx].group
            groups.setdefault(group if group is not None else f"\0{idx}", []).append(idx)
        group_list = [groups[k] for k in rng.permutation(sorted(groups))]
        order = [idx for claims in group_list for idx in claims]
        # Round-robin over the group order, dealing single claims or whole groups: folds stay balanced.
        units = [[idx] for idx in order] if see_group else group_list
        self.leave_out = folds <= 0
        self.n_folds = len(units) if self.leave_out else min(folds, len(units))
        self.fold: dict[int, int] = {idx: k % self.n_folds for k, unit in enumerate(units) for idx in unit}
        self.order = order
        self.fold_members = [[i for i in members if self.fold[i] == f] for f in range(self.n_folds)]
        # Targets are scored in fixed groups of a fold's members: a new label re-scores its own group only,
        # and a group's forward pass (hence its floating-point result) depends on nothing else.
        size = scorer.batch_size if reuse_targets else max(len(members), 1)
        self.target_groups = [[fm[k:k + size] for k in range(0, len(fm), size)] for fm in self.fold_members]
        self.reuse_targets = reuse_targets
        self._memo: dict[tuple, np.ndarray] = {}
        self._memo_size = 4 * sum(map(len, self.target_groups)) + 4

    def demos(self, fold: int, labels: Mapping[int, bool]) -> list[tuple[int, bool]]:
        if self.demo_order == "labelling":
            return [(i, y) for i, y in labels.items() if self.fold.get(i, fold) != fold]
        # Each fold starts the shared order at a different place, so a short budget still spreads the
        # demonstrations over all claims. Leave-one-out keeps the paper's fixed order: rotating there would
        # put a claim's group-mate right before it for half the claims.
        start = 0 if self.leave_out else len(self.order) * fold // self.n_folds
        rotated = self.order[start:] + self.order[:start]
        return [(i, labels[i]) for i in rotated if i in labels and self.fold[i] != fold]

    def center(self, log_odds: Mapping[int, float], labels: Mapping[int, bool],
               prior: tuple[float, float] | None = None) -> tuple[dict[int, float], dict]:
        """Subtract each fold's mean log-odds over its labelled claims; returns the centered log-odds and the
        means (to center claims scored later against the same contexts).

        All targets of a fold share one context, and its labels shift them together (the model copies the
        majority or the last label); centering removes that shared shift, keeps the ranking within the fold,
        and makes a one-label solution unable to predict itself. With exact leave-one-out the contexts are
        nearly identical, so one global mean is used (also for leave-one-group-out).

        ``prior`` (``balance="estimate"``: :func:`estimate_share` of the zero-shot log-odds) moves each fold's
        threshold from its mean to where two classes of that share and separation would meet (:func:`threshold`),
        so a set that is mostly True is not pushed towards half and half."""
        means = {}
        for f, targets in enumerate(self.fold_members):
            pool = [log_odds[i] for i in (self.members if self.leave_out else targets)
                    if i in labels and i in log_odds]
            means[f] = (float(np.mean(pool)) if prior is None else threshold(pool, prior)) if pool else 0.0
        return {i: z - means[self.fold[i]] for i, z in log_odds.items()}, means

    def log_odds(self, labels: Mapping[int, bool], targets: Iterable[int] | None = None) -> dict[int, float]:
        """Log-odds of ``targets`` (default: the labelled claims), each given the labelled claims of the other
        folds. Results are memoised per (fold, demonstrations, targets of a group), so a group whose context
        and targets are unchanged costs nothing. With ``reuse_targets`` a group's labelled and unlabelled targets
        are scored apart, so predicting every claim after scoring the labelled ones runs the unlabelled ones only
        (and a labelled claim's score does not depend on which other claims are asked for)."""
        wanted = set(labels) if targets is None else set(targets)
        result: dict[int, float] = {}
        for f, groups in enumerate(self.target_groups):
            demos: tuple | None = None
            for group in groups:
                asked = [i for i in group if i in wanted]
                parts = [[i for i in asked if i in labels], [i for i in asked if i not in labels]] \
                    if self.reuse_targets else [asked]
                for group_targets in parts:
                    if group_targets:
                        if demos is None:
                            demos = tuple(self.demos(f, labels))
                        result.update(self._group_log_odds(f, demos, group_targets))
        return result

    def _group_log_odds(self, f: int, demos: tuple, group_targets: list[int]) -> dict[int, float]:
        """The log-odds of some targets of fold ``f``, scored together after ``demos`` (memoised)."""
        key = (f, demos, tuple(group_targets))
        if key not in self._memo:
            self._memo[key] = self.scorer.score(group_targets, demos, slot=f)
            while len(self._memo) > self._memo_size:
                self._memo.pop(next(iter(self._memo)))
        else:  # the fold's cache stays among the recent ones, as if it had been scored
            self.scorer.keep(group_targets, demos, slot=f)
        return dict(zip(group_targets, self._memo[key].tolist()))


SHARE_LIMITS = (0.05, 0.95)
"""The estimated True share is clipped to this range (the collapse guard of ``balance="estimate"``)."""


def estimate_share(scores: Sequence[float] | np.ndarray, steps: int = 200) -> tuple[float, float]:
    """(True share, separation) of log-odds ``scores`` from a two-component Gaussian mixture with one shared variance
    (EM): the weight of the upper component, clipped to :data:`SHARE_LIMITS`, and the distance between the two
    means in units of the scores' standard deviation (near 0 when the scores are not bimodal: then the threshold
    stays near the mean, as ``balance="center"`` has it)."""
    x = np.asarray(scores, dtype=float)
    sd = float(x.std())
    if len(x) < 4 or sd == 0:
        return 0.5, 0.0
    upper = x > x.mean()  # start from the split at the mean (quantiles would start a 95/5 set on one mode)
    mu = np.array([x[~upper].mean(), x[upper].mean()])
    var, pi = max(float(np.where(upper, x - mu[1], x - mu[0]).var()), 1e-6 * sd**2), float(upper.mean())
    for _ in range(steps):
        log_p = np.stack([np.log(1 - pi) - (x - mu[0]) ** 2 / (2 * var), np.log(pi) - (x - mu[1]) ** 2 / (2 * var)])
        resp = np.exp(log_p - log_p.max(axis=0))
        resp /= resp.sum(axis=0)
        weight = resp.sum(axis=1)
        if weight.min() < 1e-9:
            break
        mu = (resp @ x) / weight
        var = max(float((resp * (x - mu[:, None]) ** 2).sum() / len(x)), 1e-6 * sd**2)
        pi = float(np.clip(weight[1] / len(x), 1e-3, 1 - 1e-3))
    if mu[1] < mu[0]:
        mu, pi = mu[::-1], 1 - pi
    return float(np.clip(pi, *SHARE_LIMITS)), float((mu[1] - mu[0]) / sd)


def threshold(scores: Sequence[float] | np.ndarray, prior: tuple[float, float]) -> float:
    """Where log-odds ``scores`` are cut for a True share and separation ``prior`` (:func:`estimate_share`): their
    mean plus (0.5 - share) x separation x their standard deviation, the midpoint between two equal-variance classes
    of that share (the mean itself for a share of 0.5)."""
    x = np.asarray(scores, dtype=float)
    share, separation = prior
    return float(x.mean() + (0.5 - share) * separation * x.std()) if len(x) else 0.0
