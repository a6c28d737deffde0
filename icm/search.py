"""Internal Coherence Maximization (Wen et al. 2025, Algorithm 1): simulated annealing over labels.

U(D) = alpha * P(D) - I(D), where P(D) is the mutual predictability of the labelled set D (each label's
log-probability given the other labelled claims, averaged over D as in the paper's code; see
``ICMConfig.average``) and I(D) counts violated consistency rules.
Gold labels are never passed to the search."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from icm.backends import Backend, Scorer
from icm.config import ICMConfig
from icm.consistency import ConstraintIndex, build_constraints, consistency_fix, label_logprob
from icm.data.claims import Claim
from icm.data.io import InputError, regular_file, write_json
from icm.scoring import ClaimScorer, MutualPredictor, estimate_share


def temperature(n: int, config: ICMConfig) -> float:
    return max(config.final_temperature, config.initial_temperature / (1 + config.cooling * math.log(n)))


def metropolis_accept(delta: float, temp: float, u: float) -> bool:
    """Accept an improvement always, a worsening with probability exp(delta / T)."""
    return delta > 0 or u < math.exp(delta / temp)


def make_batches(claims: list[Claim], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffle whole consistency groups (seeded) and pack them into batches of at most ``batch_size``."""
    groups: dict[str, list[int]] = {}
    for idx, claim in enumerate(claims):
        groups.setdefault(claim.group if claim.group is not None else f"\0{idx}", []).append(idx)
    keys = sorted(groups)
    batches: list[list[int]] = [[]]
    for k in np.random.default_rng(seed).permutation(len(keys)):
        members = groups[keys[k]]
        if batches[-1] and len(batches[-1]) + len(members) > batch_size:
            batches.append([])
        batches[-1].extend(members)
    return [sorted(b) for b in batches if b]


@dataclass
class BatchState:
    """Everything needed to continue a batch's search exactly where it stopped."""

    labels: dict[int, bool] = field(default_factory=dict)
    iteration: int = 0
    rng_state: dict | None = None
    trajectory: list[float] = field(default_factory=list)
    proposals: int = 0
    accepted: int = 0
    rejected: list[int] = field(default_factory=list)
    """Claims whose greedy flip was rejected since the last accepted one (polishing phase)."""
    log_odds: dict[int, float] = field(default_factory=dict)
    """Uncentered log-odds of the labelled claims as last scored (stale between exact steps)."""
    checks: int = 0
    """Exact proposals that were also decided with the approximate U."""
    disagreements: int = 0
    """Of those, how many the approximate U would have decided the other way."""
    outcomes: list[int] = field(default_factory=list)
    """Per step: 1 a proposal was accepted, 0 rejected, -1 no proposal (the label already matched)."""
    context: dict[int, bool] = field(default_factory=dict)
    """The labels as of the last exact step: the demonstrations that approximate steps predict against."""

    def copy(self) -> BatchState:
        """A copy that the search's later steps leave unchanged (what a checkpoint holds between its writes)."""
        return replace(self, labels=dict(self.labels), trajectory=list(self.trajectory), rejected=list(self.rejected),
                       log_odds=dict(self.log_odds), outcomes=list(self.outcomes), context=dict(self.context),
                       rng_state=copy.deepcopy(self.rng_state))


class ICMSearch:
    """Runs the search over one batch of claims with a model-backed :class:`MutualPredictor`."""

    def __init__(self, scorer: ClaimScorer, members: list[int], config: ICMConfig, batch_index: int = 0):
        self.members, self.config = members, config
        self.predictor = MutualPredictor(scorer, members, config.folds, seed=config.seed + batch_index,
                                         see_group=config.see_group, reuse_targets=config.reuse_scores,
                                         order=config.demo_order)
        self.index = ConstraintIndex(build_constraints(scorer.claims, members))
        self.groups: dict[int, str | None] = {i: scorer.claims[i].group for i in members}
        self.rng = np.random.default_rng([config.seed, batch_index])
        self.iterations = config.iterations or 4 * len(members)
        polish = config.polish_iterations
        self.polish_iterations = len(members) // 4 if polish is None else polish
        self.prior: tuple[float, float] | None = None
        """balance="estimate": the (True share, separation) estimated from the batch's zero-shot log-odds."""
        if config.balance == "estimate":
            self.prior = estimate_share(scorer.score(list(members), demos=()))

    # -- the objective ----------------------------------------------------------------------------------
    def utility(self, labels: dict[int, bool], z: dict[int, float]) -> float:
        if not labels:
            return 0.0
        fit = sum(label_logprob(z[i], y) for i, y in labels.items())
        if self.config.average:
            fit /= len(labels)
        return self.config.alpha * fit - self.index.count(labels)

    def evaluate(self, labels: dict[int, bool],
                 log_odds: dict[int, float] | None = None) -> tuple[dict[int, float], dict | None, float]:
        """Log-odds of the labelled claims given the others (centered per fold), the fold means, and U(D).
        ``log_odds`` (uncentered, of at least the labelled claims) replaces scoring: the approximate U."""
        z = self.predictor.log_odds(labels) if log_odds is None else {i: log_odds[i] for i in labels}
        means = None
        if self.config.balance != "none":
            z, means = self.predictor.center(z, labels, self.prior)
        return z, means, self.utility(labels, z)

    def predict(self, targets: list[int], labels: dict[int, bool], means: dict | None) -> dict[int, float]:
        """Log-odds of (possibly unlabelled) claims given the labelled set, on the same scale as ``evaluate``."""
        z = self.predictor.log_odds(labels, targets)
        return {i: v - means[self.predictor.fold[i]] for i, v in z.items()} if means else z

    def fix(self, labels: dict[int, bool], z: dict[int, float]) -> dict[int, bool]:
        alpha = self.config.alpha / max(len(labels), 1) if self.config.average else self.config.alpha
        return consistency_fix(labels, z, self.index, alpha, self.rng, self.config.consistency_fix_iterations)

    # -- the search -------------------------------------------------------------------------------------
    def initial_state(self) -> BatchState:
        k = min(self.config.initial_labels, len(self.members))
        chosen = self.rng.choice(self.members, size=k, replace=False)
        flags = self.rng.permutation([i % 2 == 0 for i in range(k)])
        labels = {int(i): bool(f) for i, f in zip(chosen, flags)}
        z, _, _ = self.evaluate(labels)
        labels = self.fix(labels, z)
        log_odds = self.predictor.log_odds(labels)
        _, _, u = self.evaluate(labels, log_odds)
        return BatchState(labels=labels, trajectory=[u], rng_state=self.rng.bit_generator.state, log_odds=log_odds,
                          context=dict(labels))

    def sample(self, labels: dict[int, bool]) -> int:
        seeded = {self.groups[i] for i in labels if self.groups[i] is not None}
        weights = np.array([self.config.group_weight if i not in labels and self.groups[i] in seeded else 1.0
                            for i in self.members])
        return int(self.members[self.rng.choice(len(self.members), p=weights / weights.sum())])

    def contradicted(self, labels: dict[int, bool], z: dict[int, float], skip: list[int]) -> int | None:
        """The labelled claim whose prediction disagrees with its label most confidently, if any."""
        wrong = [i for i, y in labels.items() if y != (z[i] > 0) and i not in skip]
        return max(wrong, key=lambda i: (abs(z[i]), -i)) if wrong else None

    def run(self, state: BatchState | None = None,
            on_step: Callable[[BatchState], None] | None = None) -> tuple[BatchState, dict[int, float]]:
        """Anneal for ``self.iterations`` steps, then polish greedily for up to ``self.polish_iterations``;
        ``on_step`` is called after each step (for checkpoints)."""
        state = state or self.initial_state()
        self.rng.bit_generator.state = state.rng_state
        labels, log_odds, context = dict(state.labels), dict(state.log_odds), dict(state.context)
        z, means, u = self.evaluate(labels, log_odds)
        every = self.config.exact_every
        while state.iteration < self.iterations + self.polish_iterations:
            n = state.iteration + 1
            polishing = state.iteration >= self.iterations
            exact = n % every == 0 or n == self.iterations if not polishing else (n - self.iterations) % every == 0
            i = None
            while True:
                if exact:  # catch up on the contexts that approximate steps changed (free when none did)
                    approximate_u = u
                    log_odds, context = self.predictor.log_odds(labels), dict(labels)
                    z, means, u = self.evaluate(labels, log_odds)
                if not polishing:
                    break
                i = self.contradicted(labels, z, state.rejected)
                if i is not None or exact:
                    break
                exact = True  # approximate scores see no contradiction left: polishing ends on exact ones
            if polishing:
                if i is None:
                    break
                raw_i = log_odds[i]
            else:
                i = self.sample(labels)
                raw_i = log_odds[i] if i in labels else self.predictor.log_odds(labels if exact else context, [i])[i]
                draw = self.rng.random()
            z_i = raw_i - means[self.predictor.fold[i]] if means else raw_i
            if labels.get(i) != (z_i > 0):
                proposal = self.fix({**labels, i: z_i > 0}, {**z, i: z_i})
                checked = exact and (polishing or every == 1 or n == self.iterations
                                     or (n // every) % self.config.check_every == 0)
                proposed_log_odds = self.predictor.log_odds(proposal) if checked else {**log_odds, i: raw_i}
                z_new, means_new, u_new = self.evaluate(proposal, proposed_log_odds)
                state.proposals += 1
                temp = 0.0 if polishing else temperature(n, self.config)
                accept = u_new > u if polishing else metropolis_accept(u_new - u, temp, draw)
                if checked and every > 1:
                    _, _, u_guess = self.evaluate(proposal, {**state.log_odds, i: raw_i})
                    state.checks += 1
                    state.disagreements += accept != (u_guess > approximate_u if polishing else
                                                      metropolis_accept(u_guess - approximate_u, temp, draw))
                if accept:
                    labels, log_odds, z, means, u = proposal, proposed_log_odds, z_new, means_new, u_new
                    if checked:
                        context = dict(labels)
                    state.accepted += 1
                    state.rejected = []
                elif polishing:
                    state.rejected.append(i)
                state.outcomes.append(int(accept))
            else:
                state.outcomes.append(-1)
            state.iteration, state.labels, state.log_odds = n, dict(labels), dict(log_odds)
            state.context = dict(context)
            state.trajectory.append(u)
            state.rng_state = self.rng.bit_generator.state
            if on_step is not None:
                on_step(state)
        _, means, _ = self.evaluate(labels)
        return state, self.predict(self.members, labels, means)


# -- labelling a whole claims table, with checkpoints -------------------------------------------------------

def fingerprint(claims: list[Claim], config: ICMConfig, model_name: str) -> str:
    """What a search's result depends on: the claims, the settings and the model (a checkpoint must match)."""
    settings = {k: v for k, v in asdict(config).items() if k != "restarts"}  # one search; restarts have their own
    h = hashlib.sha256(json.dumps([settings, model_name], sort_keys=True, default=str).encode())
    for c in claims:
        h.update(json.dumps([c.question, c.choice, c.choice_2, c.group, c.key]).encode())
    return h.hexdigest()[:16]


DONE_KEYS = {"labels", "scores", "trajectory", "proposals", "accepted", "iterations", "inconsistencies", "checks",
             "disagreements", "constraints"}
CHECKPOINT_FORMAT = 4
"""Version of ``checkpoint.json``'s layout; a checkpoint of another format is refused, not misread.
4: ``current`` holds the state of every batch being searched, by batch number (3: one ``[batch, state]``)."""


def checkpoint_seconds() -> float:
    """Seconds between checkpoints of the search (``$ICM_CHECKPOINT_SECONDS``, default 10; 0 = every step)."""
    raw = os.environ.get("ICM_CHECKPOINT_SECONDS", "10")
    try:
        return max(float(raw), 0.0)
    except ValueError:
        raise InputError("ICM_CHECKPOINT_SECONDS", f"expected a number of seconds, got {raw!r}") from None


def _restart(path: Path) -> str:
    return f"delete {path} to start the search over, or use another --run-dir"


class Checkpoint:
    """The search state on disk (``run_dir/checkpoint.json``), written atomically. Not thread-safe:
    :func:`label_claims` serializes its use when batches run concurrently."""

    def __init__(self, run_dir: Path | None, fingerprint: str, every_seconds: float | None = None):
        self.path = run_dir / "checkpoint.json" if run_dir else None
        self.fingerprint = fingerprint
        self.every = checkpoint_seconds() if every_seconds is None else every_seconds
        self.done: dict[str, dict[str, Any]] = {}
        """Finished batches by batch number (as a string): labels, scores and counters."""
        self.current: dict[int, BatchState] = {}
        """The last finished step of each batch being searched, by batch number."""
        self._last = time.monotonic()

    @staticmethod
    def read(path: Path) -> dict[str, Any] | None:
        """The checkpoint's content (None when there is none), refusing a damaged one or one of another format
        with an :class:`InputError` that says what to do. Cheap: ``label_file`` calls it before loading a model."""
        if not os.path.lexists(path):
            return None
        regular_file(path)  # a FIFO or a directory there is refused, not waited on
        try:
            data = json.loads(path.read_bytes())
            version = data.get("format") if isinstance(data, dict) else None
        except (OSError, ValueError) as error:
            raise InputError(path, f"damaged checkpoint ({type(error).__name__}); {_restart(path)}") from None
        if version != CHECKPOINT_FORMAT:
            raise InputError(path, f"checkpoint of another icm version (format {version}, this one reads "
                             f"{CHECKPOINT_FORMAT}); {_restart(path)}")
        return data

    def load(self) -> None:
        """Read the checkpoint, if any. A damaged one, one of another format, or one made for other claims,
        model or settings is an :class:`InputError` that says what to do; nothing is guessed."""
        data = self.read(self.path) if self.path else None
        if data is None:
            return
        restart = _restart(self.path)
        if data.get("fingerprint") != self.fingerprint:
            raise InputError(self.path, f"checkpoint was made with other claims, model or settings; {restart}")
        try:
            done = {str(b): dict(batch) for b, batch in data["done"].items()}
            for batch in done.values():
                if missing := DONE_KEYS - set(batch):
                    raise KeyError(", ".join(sorted(missing)))
            current = {}
            for b, s in data["current"].items():
                s = dict(s, labels={int(k): bool(v) for k, v in s["labels"].items()},
                         log_odds={int(k): float(v) for k, v in s["log_odds"].items()},
                         context={int(k): bool(v) for k, v in s["context"].items()})
                current[int(b)] = BatchState(**s)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise InputError(self.path, f"damaged checkpoint ({type(error).__name__}: {error}); {restart}") from None
        self.done, self.current = done, current

    def save(self, force: bool = False) -> None:
        if not self.path or (not force and time.monotonic() - self._last < self.every):
            return
        current = {str(b): asdict(s) for b, s in sorted(self.current.items())}
        write_json(self.path, {"format": CHECKPOINT_FORMAT, "fingerprint": self.fingerprint, "done": self.done,
                               "current": current})
        self._last = time.monotonic()


class _Stopped(Exception):
    """Ends a batch's search because another one failed or was interrupted (its last step is checkpointed)."""


def label_claims(claims: list[Claim], backend: Backend, config: ICMConfig | None = None, *,
                 template=None, run_dir: Path | None = None, resume: bool = False, model_name: str = "",
                 progress: Callable[[dict[str, Any]], None] | None = None, batches: list[list[int]] | None = None,
                 labeller: Callable[[int, dict[str, dict[str, Any]]], Backend] | None = None,
                 ) -> tuple[list[dict[str, Any]], dict]:
    """Label every claim with ICM. Returns one result per claim (``icm_label``, ``icm_score``,
    ``icm_searched``) and a summary (U trajectories, acceptance, balance, token counts).

    ``batches`` replaces :func:`make_batches`; ``labeller(b, done)`` gives the backend that searches batch ``b``
    given the finished batches ``done`` (checkpoint entries by batch number), e.g. one fine-tuned on their labels
    (iterative ICM, ``icm.iterative``); by default ``backend`` searches every batch.

    A backend with several lanes (``Backend.lanes``: one per server) searches up to that many batches at the
    same time, one thread each, each batch's requests going to its lane's server; the lane is the only thing
    that differs, so the labels are those of a sequential run. One lane (in-process, one server, a labeller, or a
    single batch left): one batch after another in this thread."""
    config = config or ICMConfig()
    batches = batches or make_batches(claims, config.batch_size, config.seed)
    checkpoint = Checkpoint(run_dir, fingerprint(claims, config, model_name))
    if resume:
        checkpoint.load()
    elif run_dir and checkpoint.path.exists():
        checkpoint.path.unlink()
    started = time.monotonic()
    _Lanes(claims, batches, backend, config, template, checkpoint, progress, labeller).run()
    return _collect(claims, checkpoint.done, time.monotonic() - started)


class _Lanes:
    """Searches the batches not yet in ``checkpoint`` on the backend's lanes (threads), checkpointing every step;
    the first error (a Ctrl-C, a server gone) stops every lane after its last finished step is saved."""

    def __init__(self, claims: list[Claim], batches: list[list[int]], backend: Backend, config: ICMConfig, template,
                 checkpoint: Checkpoint, progress: Callable[[dict[str, Any]], None] | None,
                 labeller: Callable[[int, dict[str, dict[str, Any]]], Backend] | None):
        self.claims, self.batches, self.backend, self.config, self.template = claims, batches, backend, config, template
        self.checkpoint, self.progress, self.labeller = checkpoint, progress, labeller
        todo = [b for b in range(len(batches)) if str(b) not in checkpoint.done]
        self.lanes = 1 if labeller is not None else max(1, min(backend.lanes, len(todo)))
        self.pending = iter(todo)
        self.lock, self.stop = threading.Lock(), threading.Event()  # lock: checkpoint, running, pending, errors
        self.running: dict[int, tuple[int, int]] = {}  # batch -> (steps done, steps in all), for the progress display
        self.errors: list[BaseException] = []

    def scorer(self, searcher: Backend, lane: int | None = None) -> Scorer:
        config = self.config
        return searcher.scorer(self.claims, self.template, config.max_context_tokens, config.scoring_batch_size,
                               prefix_versions=2 if config.reuse_scores else 1, lane=lane)

    def run(self) -> None:
        helpers = [threading.Thread(target=self.work, args=(k,), name=f"icm-lane-{k}", daemon=True)
                   for k in range(1, self.lanes)]
        for thread in helpers:
            thread.start()
        self.work(0)  # in this thread, where a Ctrl-C lands
        try:
            for thread in helpers:
                thread.join()
        except BaseException as error:  # Ctrl-C while the other lanes finish
            self.errors.append(error)
            self.stop.set()
            for thread in helpers:
                thread.join()
        if self.errors:
            self.checkpoint.save(force=True)
            raise self.errors[0]

    def work(self, lane: int) -> None:
        """Search batches on ``lane`` until none is left or another lane stops the run."""
        try:
            pinned = lane if self.lanes > 1 else None  # one lane: requests spread over every server
            scorer = self.scorer(self.backend, pinned) if self.labeller is None else None
            while True:
                with self.lock:
                    b = None if self.stop.is_set() else next(self.pending, None)
                if b is None:
                    return
                searcher = self.scorer(self.labeller(b, self.checkpoint.done)) if self.labeller else scorer
                self.search(b, searcher, pinned)
        except _Stopped:
            pass
        except BaseException as error:  # Ctrl-C, a server gone: every lane's last finished step is kept
            with self.lock:
                self.errors.append(error)
            self.stop.set()

    def search(self, b: int, scorer: Scorer, lane: int | None) -> None:
        """Search batch ``b`` (from its checkpointed state, if any) and record it as done."""
        checkpoint, tokens = self.checkpoint, (scorer.forward_tokens, scorer.uncached_tokens)
        search = ICMSearch(scorer, self.batches[b], self.config, batch_index=b)
        steps = search.iterations + search.polish_iterations
        with self.lock:
            state = checkpoint.current.get(b)
            self.running[b] = (state.iteration if state else 0, steps)
        state, z = search.run(state, lambda s: self.on_step(b, s, steps))
        entry = {
            "labels": {str(i): y for i, y in state.labels.items()}, "scores": {str(i): z[i] for i in self.batches[b]},
            "trajectory": state.trajectory, "proposals": state.proposals, "accepted": state.accepted,
            "iterations": state.iteration, "inconsistencies": search.index.count(state.labels),
            "checks": state.checks, "disagreements": state.disagreements,
            "constraints": len(search.index.constraints), "outcomes": state.outcomes,
            "forward_tokens": scorer.forward_tokens - tokens[0], "uncached_tokens": scorer.uncached_tokens - tokens[1],
        } | ({"estimated_true_share": search.prior[0]} if search.prior else {})
        with self.lock:
            checkpoint.done[str(b)] = entry
            checkpoint.current.pop(b, None)
            self.running.pop(b, None)
            checkpoint.save(force=True)
        self.backend.batch_done(lane)

    def on_step(self, b: int, s: BatchState, steps: int) -> None:
        """After each step of batch ``b``: checkpoint it, show it, and stop if another lane failed."""
        with self.lock:
            self.checkpoint.current[b] = snapshot = s.copy()
            self.running[b] = (s.iteration, steps)
            self.checkpoint.save()
            info = {"batch": b, "batches": len(self.batches), "iteration": s.iteration, "iterations": steps,
                    "utility": s.trajectory[-1], "labels": snapshot.labels,
                    "acceptance": s.accepted / max(s.proposals, 1), "done": len(self.checkpoint.done),
                    "running": dict(self.running)}
        if self.stop.is_set():
            raise _Stopped
        if self.progress:
            self.progress(info)


def batch_labels(batch: dict[str, Any]) -> dict[int, bool]:
    """Every member's label in a finished batch: searched claims keep their label, the rest get their prediction."""
    return {int(i): bool(batch["labels"][i]) if i in batch["labels"] else z > 0 for i, z in batch["scores"].items()}


def _collect(claims: list[Claim], done: dict[str, dict[str, Any]], seconds: float) -> tuple[list[dict[str, Any]], dict]:
    results: list[dict[str, Any]] = [{} for _ in claims]
    done = {b: done[b] for b in sorted(done, key=int)}  # batch order, whatever order they finished in
    for batch in done.values():
        for i, label in batch_labels(batch).items():
            results[i] = {"icm_label": label, "icm_score": float(batch["scores"][str(i)]),
                          "icm_searched": str(i) in batch["labels"]}
    proposals = sum(b["proposals"] for b in done.values())
    forward_tokens = sum(b.get("forward_tokens", 0) for b in done.values())
    labels = [r["icm_label"] for r in results]
    summary = {
        "claims": len(claims),
        "batches": len(done),
        "searched": sum(r["icm_searched"] for r in results),
        "true_share": float(np.mean(labels)) if labels else 0.0,
        "inconsistencies": sum(b["inconsistencies"] for b in done.values()),
        "constraints": sum(b["constraints"] for b in done.values()),
        "proposals": proposals,
        "acceptance_rate": sum(b["accepted"] for b in done.values()) / max(proposals, 1),
        "approximate_checks": sum(b["checks"] for b in done.values()),
        "approximate_disagreements": sum(b["disagreements"] for b in done.values()),
        "trajectories": [b["trajectory"] for b in done.values()],
        "outcomes": [b.get("outcomes", []) for b in done.values()],
        "seconds": seconds,
        "forward_tokens": forward_tokens,
        "uncached_tokens": sum(b.get("uncached_tokens", 0) for b in done.values()),
        "forward_tokens_per_claim": forward_tokens / max(len(claims), 1),
    }
    if estimated := [b["estimated_true_share"] for b in done.values() if "estimated_true_share" in b]:
        summary["estimated_true_share"] = float(np.mean(estimated))  # balance="estimate", over the batches
    return results, summary
