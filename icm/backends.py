"""One model interface for the two things ICM asks of a model: scoring and sampling.

- **Scoring**: the log-odds of the True vs the False label token after a context of labelled demonstrations
  (:meth:`Backend.scorer` returns a :class:`Scorer`, used by the search through ``MutualPredictor``).
- **Sampling**: n completions per prompt with temperature / top-p / max tokens / stop / seed
  (:meth:`Backend.sample_completions`, used by ``icm generate`` and by ``icm label`` on a questions file).

Implementations: :class:`InProcessBackend` (a transformers model in this process), ``icm.server.ServerBackend``
(OpenAI-compatible inference servers: vLLM, SGLang, llama.cpp) and ``icm.vllm_engine.VLLMBackend`` (vLLM's
offline engine, sampling only). ``icm.engines.load_backend`` picks and loads one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable
from typing import Any, Protocol

import numpy as np

from icm.config import PromptTemplate
from icm.data.candidates import Completion
from icm.data.claims import Claim
from icm.sampling import sample_completions
from icm.scoring import ClaimScorer


class Scorer(Protocol):
    """What the search needs from a scorer (``icm.scoring.ClaimScorer`` is the in-process one)."""

    claims: list[Claim]
    batch_size: int

    @property
    def forward_tokens(self) -> int: ...

    @property
    def uncached_tokens(self) -> int: ...

    def score(self, targets: list[int], demos: Iterable[tuple[int, bool]] = (),
              slot: Hashable | None = None) -> np.ndarray:
        """Log-odds (True minus False) of each target claim after ``demos`` as (claim index, label) pairs."""
        ...

    def keep(self, targets: list[int], demos: Iterable[tuple[int, bool]], slot: Hashable) -> None:
        """Hint that the context of ``score(targets, demos, slot)`` is still in use (a local prefix cache keeps it)."""
        ...


class Backend(ABC):
    """A model that scores claims and samples completions; ``tokenizer`` is the model's own."""

    tokenizer: Any

    @property
    def lanes(self) -> int:
        """How many batches can be searched at the same time, each by its own scorer (one per server)."""
        return 1

    @abstractmethod
    def scorer(self, claims: list[Claim], template: PromptTemplate | None, max_context_tokens: int | None,
               batch_size: int, prefix_versions: int = 2, lane: int | None = None) -> Scorer:
        """A scorer of ``claims`` written with ``template``, demonstrations packed into ``max_context_tokens``;
        ``lane`` (below :attr:`lanes`) is where its work goes, None: anywhere (spread over every server)."""

    def batch_done(self, lane: int | None) -> None:
        """A batch's search on ``lane`` finished (counted in the report where lanes are servers)."""
        return None  # nothing to count in this process

    @abstractmethod
    def sample_completions(self, prompts: list[str], **kwargs: Any) -> list[list[Completion]]:
        """Completions of each user message; the keyword arguments of ``icm.sampling.sample_completions``."""

    def report(self) -> dict[str, Any]:
        """What run files record about the backend (never a secret)."""
        return {"backend": "in-process"}


class InProcessBackend(Backend):
    """A transformers model in this process (``model`` is also what ``icm.iterative`` fine-tunes)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def scorer(self, claims: list[Claim], template: PromptTemplate | None, max_context_tokens: int | None,
               batch_size: int, prefix_versions: int = 2, lane: int | None = None) -> ClaimScorer:
        return ClaimScorer(self.model, self.tokenizer, claims, template, max_context_tokens, batch_size,
                           prefix_versions=prefix_versions)

    def sample_completions(self, prompts: list[str], **kwargs: Any) -> list[list[Completion]]:
        return sample_completions(self.model, self.tokenizer, prompts, **kwargs)
