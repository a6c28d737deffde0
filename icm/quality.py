"""A label-quality estimate that reads no gold: how far a run's labels can be trusted.

``run.json``'s ``quality`` object (:func:`label_quality`) holds

- ``agreement``: with ``--restarts R > 1`` (independent searches, seeds seed, seed+1, ...), the mean over claims of
  the fraction of restarts that agree with the final (voted) label, and the share of claims on which they do not
  all agree; None with one restart.
- ``low_margin``: the share of labels whose ``|icm_score|`` is below :data:`LOW_MARGIN` (0.25) times the standard
  deviation of the run's scores: relative to their spread, because the scale of the log-odds differs from model
  to model (SmolLM2's centered sentiment log-odds are mostly below 0.5 nats, Gemma3's are not). Scores that form
  two well-separated modes have few such labels; one unimodal heap around the cut has about 20%.
- ``surface``: the surface-feature audit: how well one surface feature alone predicts the labels (the claim's
  length, the answer it asserts, its position in the input, a confidence cue phrase), each as the accuracy of the
  best one-feature rule, next to the majority share; ``lift`` is the best one's accuracy minus the majority share.
  Labels that a surface feature predicts much better than the majority share (lift >= :data:`SURFACE_LIFT`) may
  follow that feature rather than the task.
- ``score``: one number in [0, 1] to rank runs by (not an accuracy): mean agreement (1 with one restart) x
  (1 - low-margin share) x (1 - max(lift, 0)).
- ``warnings``: what a user should look at, in words.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from icm.data.claims import Claim

LOW_MARGIN = 0.25
"""|icm_score| below which a label counts as low-margin, in standard deviations of the run's scores."""
SURFACE_LIFT = 0.2
"""Lift over the majority share from which the surface audit warns that a feature predicts the labels."""
CUE_PHRASES = ("i am sure", "i'm sure", "i am confident", "i'm confident", "trust me", "definitely", "certainly",
               "obviously", "clearly", "without a doubt", "this is right", "this is correct")
"""Confidence / sycophancy cue phrases the audit looks for (case-insensitive) in a claim's text."""


def vote(labels: Sequence[Sequence[bool]], scores: Sequence[Sequence[float]]) -> tuple[list[bool], list[float],
                                                                                          list[float]]:
    """Final labels of R restarts (``labels[r][i]``) by majority vote, a tie (even R) broken by the sign of the
    mean score (and by the first restart's label when that is exactly 0); returns the labels, the mean scores and
    each claim's agreement (fraction of restarts whose label is the final one)."""
    votes = np.asarray(labels, dtype=bool)
    mean = np.asarray(scores, dtype=float).mean(axis=0)
    trues = votes.sum(axis=0)
    r = votes.shape[0]
    final = np.where(2 * trues > r, True, np.where(2 * trues < r, False,
                                                   np.where(mean != 0, mean > 0, votes[0])))
    agreement = np.where(final, trues, r - trues) / r
    return [bool(y) for y in final], [float(s) for s in mean], [float(a) for a in agreement]


def stump_accuracy(values: Sequence[float], labels: Sequence[bool]) -> float:
    """Accuracy of the best rule ``label = value > t`` or ``label = value <= t`` over every threshold t."""
    x, y = np.asarray(values, dtype=float), np.asarray(labels, dtype=bool)
    n = len(y)
    if n == 0:
        return 0.0
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    below_true = np.concatenate([[0], np.cumsum(y)])  # Trues among the first k
    total_true = below_true[-1]
    k = np.arange(n + 1)
    cut = np.concatenate([[True], x[1:] != x[:-1], [True]])  # thresholds only between distinct values
    # rule "True above the cut": first k False, rest True
    above = (k - below_true) + (total_true - below_true)
    best = max(above[cut].max(), (n - above)[cut].max())
    return float(best / n)


def category_accuracy(values: Sequence[str], labels: Sequence[bool]) -> float:
    """Leave-one-out accuracy of predicting a label by the majority label of the other claims with the same value
    (the overall majority of the others when no other claim has it): a claim's own label never predicts itself."""
    y = [bool(v) for v in labels]
    n = len(y)
    if n < 2:
        return 0.0
    counts: dict[str, Counter] = {}
    for v, label in zip(values, y):
        counts.setdefault(v, Counter())[label] += 1
    total = Counter(y)
    hits = 0
    for v, label in zip(values, y):
        own = counts[v].copy()
        own[label] -= 1
        pool = own if sum(own.values()) else total - Counter([label])
        guess = pool[True] > pool[False] or (pool[True] == pool[False] and total[True] >= total[False])
        hits += guess == label
    return hits / n


def surface_audit(claims: Sequence[Claim], labels: Sequence[bool]) -> dict[str, Any]:
    """How well one surface feature alone predicts ``labels``: ``features`` (accuracy per feature),
    ``majority_share``, ``best_feature``, ``best_accuracy`` and ``lift`` (best accuracy - majority share)."""
    n = len(labels)
    texts = [f"{c.question}\n{c.choice}\n{c.choice_2 or ''}" for c in claims]
    features: dict[str, float] = {
        "length": stump_accuracy([len(t) for t in texts], labels),
        "answer": category_accuracy([c.key if c.key is not None else c.choice for c in claims], labels),
        "position": stump_accuracy(list(range(n)), labels),
    }
    cue = None
    for phrase in CUE_PHRASES:
        present = [phrase in t.lower() for t in texts]
        if any(present) and not all(present):
            accuracy = stump_accuracy([float(p) for p in present], labels)
            if cue is None or accuracy > features["cue"]:
                cue, features["cue"] = phrase, accuracy
    majority = max(float(np.mean(labels)), 1 - float(np.mean(labels))) if n else 0.0
    best = max(features, key=lambda k: features[k])
    return {"features": features, "cue_phrase": cue, "majority_share": majority, "best_feature": best,
            "best_accuracy": features[best], "lift": features[best] - majority}


def label_quality(claims: Sequence[Claim], labels: Sequence[bool], scores: Sequence[float],
                  agreement: Sequence[float] | None = None, restarts: int = 1) -> dict[str, Any]:
    """The ``quality`` object of ``run.json`` (see the module docstring); ``agreement`` per claim with restarts."""
    n = len(labels)
    agree = None
    if agreement is not None and restarts > 1:
        agree = {"restarts": restarts, "mean": float(np.mean(agreement)) if n else None,
                 "share_below_1": float(np.mean([a < 1 for a in agreement])) if n else None}
    spread = float(np.std(scores)) if n else 0.0
    low = float(np.mean([abs(s) < LOW_MARGIN * spread for s in scores])) if n else 0.0
    surface = surface_audit(claims, labels)
    score = (agree["mean"] if agree and agree["mean"] is not None else 1.0) * (1 - low) * (1 - max(surface["lift"], 0))
    warnings = []
    if agree and agree["share_below_1"] and agree["share_below_1"] > 0.2:
        warnings.append(f"restarts disagree on {agree['share_below_1']:.0%} of the claims")
    if low > 0.3:
        warnings.append(f"{low:.0%} of the labels have |icm_score| < {LOW_MARGIN} sd of the scores")
    if surface["lift"] >= SURFACE_LIFT:
        warnings.append(f"the {surface['best_feature']} alone predicts {surface['best_accuracy']:.0%} of the labels "
                        f"(majority share {surface['majority_share']:.0%})")
    share = float(np.mean(labels)) if n else 0.0
    if n and min(share, 1 - share) < 0.05:
        warnings.append(f"{share:.0%} of the labels are True: a collapsed labelling?")
    return {"agreement": agree, "low_margin": {"threshold": LOW_MARGIN * spread, "threshold_sd": LOW_MARGIN,
                                               "share": low}, "surface": surface,
            "score": score, "warnings": warnings}


def quality_line(quality: dict[str, Any]) -> str:
    """The quality object in one line (console summary)."""
    agree = quality.get("agreement")
    parts = [f"agreement {agree['mean']:.0%} ({agree['share_below_1']:.0%} of claims < 1)"] if agree else []
    surface = quality["surface"]
    parts += [f"low margin {quality['low_margin']['share']:.0%}",
              f"surface {surface['best_feature']} {surface['best_accuracy']:.0%} vs majority "
              f"{surface['majority_share']:.0%}", f"score {quality['score']:.2f}"]
    return ", ".join(parts)
