"""Logical consistency between claims, and ConsistencyFix (Wen et al. 2025, Algorithm 2).

Four rules, each between two claims of the same consistency group:
- ``exclusive``: different final answers cannot both be True;
- ``equal``: the same final answer gets the same label;
- ``asymmetric``: "A better than B" and "B better than A" cannot both be True, nor both False;
- ``exactly_one``: the two answers of a closed two-way question (both enumerated, ``Claim.exactly_one``): one
  True and one False. A closed set of more answers keeps ``exclusive`` between its pairs ("at least one True"
  is not a rule between two claims).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from icm.data.claims import Claim

#: For each rule, the label assignments of a pair (i, j) that satisfy it.
ALLOWED: dict[str, tuple[tuple[bool, bool], ...]] = {
    "exclusive": ((True, False), (False, True), (False, False)),
    "equal": ((True, True), (False, False)),
    "asymmetric": ((True, False), (False, True)),
    "exactly_one": ((True, False), (False, True)),
}


@dataclass(frozen=True)
class Constraint:
    i: int
    j: int
    kind: str

    def violated(self, a: bool, b: bool) -> bool:
        return (a, b) not in ALLOWED[self.kind]


def build_constraints(claims: list[Claim], members: Iterable[int] | None = None) -> list[Constraint]:
    """All pairwise rules implied by the groups, keys and comparison pairs of ``claims`` (or of the
    claims at indices ``members``); constraints refer to indices into ``claims``."""
    groups: dict[str, list[int]] = defaultdict(list)
    for idx in members if members is not None else range(len(claims)):
        claim = claims[idx]
        if claim.group is not None:
            groups[claim.group].append(idx)
    constraints = []
    for members in groups.values():
        two_way = all(claims[i].exactly_one for i in members) and len({claims[i].key for i in members}) == 2
        for i, j in combinations(members, 2):
            a, b = claims[i], claims[j]
            if a.choice_2 is not None and b.choice_2 is not None:
                if a.choice == b.choice_2 and a.choice_2 == b.choice:
                    constraints.append(Constraint(i, j, "asymmetric"))
                elif a.choice == b.choice and a.choice_2 == b.choice_2:
                    constraints.append(Constraint(i, j, "equal"))
            elif a.choice_2 is None and b.choice_2 is None and a.key is not None and b.key is not None:
                kind = "equal" if a.key == b.key else "exactly_one" if two_way else "exclusive"
                constraints.append(Constraint(i, j, kind))
    return constraints


class ConstraintIndex:
    """Constraints indexed by claim, for counting violations among the labelled claims."""

    def __init__(self, constraints: list[Constraint]):
        self.constraints = constraints
        self.by_claim: dict[int, list[Constraint]] = defaultdict(list)
        for c in constraints:
            self.by_claim[c.i].append(c)
            self.by_claim[c.j].append(c)

    def violations(self, labels: Mapping[int, bool]) -> list[Constraint]:
        return [c for c in self.constraints if c.i in labels and c.j in labels
                and c.violated(labels[c.i], labels[c.j])]

    def count(self, labels: Mapping[int, bool]) -> int:
        return len(self.violations(labels))

    def count_around(self, labels: Mapping[int, bool], claims: set[int]) -> int:
        """Violations that involve any claim in ``claims``."""
        seen = {c for k in claims for c in self.by_claim.get(k, ())}
        return sum(1 for c in seen if c.i in labels and c.j in labels and c.violated(labels[c.i], labels[c.j]))


def label_logprob(log_odds: float, label: bool) -> float:
    """log P(label) under a two-way softmax with log-odds ``log_odds`` of True vs False."""
    return float(-np.logaddexp(0.0, -log_odds if label else log_odds))


def _pair_utility(labels: Mapping[int, bool], c: Constraint, option: tuple[bool, bool],
                  log_odds: Mapping[int, float], index: ConstraintIndex, alpha: float) -> float:
    trial = {**labels, c.i: option[0], c.j: option[1]}
    fit = label_logprob(log_odds[c.i], option[0]) + label_logprob(log_odds[c.j], option[1])
    return alpha * fit - index.count_around(trial, {c.i, c.j})


def consistency_fix(labels: dict[int, bool], log_odds: Mapping[int, float], index: ConstraintIndex,
                    alpha: float, rng: np.random.Generator, max_iters: int = 10) -> dict[int, bool]:
    """Algorithm 2: repeatedly pick a violated pair and give it its best consistent assignment.

    Each option is scored by ``alpha * (log P(y_i) + log P(y_j)) - violations around i and j``, with each
    claim's log-odds given the other labelled claims as currently scored. This is the local part of U(D)
    that the pair controls; the caller then scores the whole result exactly before accepting it.
    Returns a new dict; ``labels`` is not modified.
    """
    labels = dict(labels)
    for _ in range(max_iters):
        violated = index.violations(labels)
        if not violated:
            break
        c = violated[rng.integers(len(violated))]
        current = (labels[c.i], labels[c.j])
        best = max(ALLOWED[c.kind], key=lambda option, c=c: _pair_utility(labels, c, option, log_odds, index, alpha))
        if _pair_utility(labels, c, best, log_odds, index, alpha) > _pair_utility(
                labels, c, current, log_odds, index, alpha):
            labels[c.i], labels[c.j] = best
    return labels
