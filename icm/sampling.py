"""The in-process sampling loop and the prompt helpers every engine shares.

- :func:`user_message` and :func:`build_prompt`: the text a model is asked (the instruction and question, the
  chat template applied by the model's own tokenizer), the same for every engine.
- :func:`sample_completions`: ``n`` completions per prompt from a transformers model in this process, batched
  and seeded per batch; ``icm.backends.InProcessBackend`` samples with it, servers and vLLM implement the same
  contract themselves (``icm.server``, ``icm.vllm_engine``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from icm.config import DEFAULT_INSTRUCTION
from icm.data.candidates import Completion, GenerationStats
from icm.data.console import progress_bar

# Extra end-of-turn tokens some chat templates use besides the tokenizer's eos token.
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>")


def user_message(question: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The user turn the generator sees: the instruction, a blank line, then ``Question: ...``."""
    return f"{instruction.strip()}\n\nQuestion: {question}" if instruction.strip() else question


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(tokenizer, user_message: str, use_chat_template: bool) -> str:
    """The text fed to the model: the chat template applied to one user turn (with the generation prompt),
    or, for raw prompts / tokenizers without a template, the message followed by ``\\nAnswer:``."""
    if use_chat_template and has_chat_template(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": user_message}], tokenize=False,
                                             add_generation_prompt=True)
    return f"{user_message}\nAnswer:"


def prompt_token_ids(tokenizer, user_messages: list[str], use_chat_template: bool) -> list[list[int]]:
    """Each user message's :func:`build_prompt` text as token ids, for engines that take ids (a chat template
    already holds the BOS token, so none is added then)."""
    chat = use_chat_template and has_chat_template(tokenizer)
    return [tokenizer(build_prompt(tokenizer, m, use_chat_template), add_special_tokens=not chat).input_ids
            for m in user_messages]


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def sample_completions(
    model,
    tokenizer,
    prompts: list[str],
    *,
    num_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    seed: int = 0,
    use_chat_template: bool = True,
    progress: bool = True,
    on_batch: Callable[[list[Completion]], None] | None = None,
    stats: GenerationStats | None = None,
    description: str = "generating",
    done_batches: dict[int, list[Completion]] | None = None,
) -> list[list[Completion]]:
    """Generate ``num_samples`` completions per user message, batched with left padding.

    Each prompt is repeated ``num_samples`` times and the flat list is cut into batches of ``batch_size``;
    batch ``i`` is seeded with ``seed + i``, so a batch's samples do not depend on what ran before it.
    Completions are cut at the first stop string and carry the number of tokens generated (up to and
    including the end-of-sequence token). ``on_batch`` receives each finished batch's completions;
    ``description`` names the progress display. ``done_batches`` (batch index -> its completions, from an
    interrupted run) are used as they are instead of being generated again, so a resumed run gives exactly the
    completions of an uninterrupted one. ``model`` is a transformers model in this process (other engines
    implement ``Backend.sample_completions`` themselves)."""
    from transformers import GenerationConfig as HFGenerationConfig

    chat = use_chat_template and has_chat_template(tokenizer)
    texts = [build_prompt(tokenizer, p, use_chat_template) for p in prompts]
    jobs = [(i, j) for i in range(len(prompts)) for j in range(num_samples)]
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    stop = [s for s in stop if s]
    sampling = temperature > 0
    gen_config = HFGenerationConfig(  # top_k=None: only top_p truncates the distribution
        do_sample=sampling, temperature=temperature if sampling else None, top_p=top_p if sampling else None,
        top_k=None, max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id,
        bos_token_id=model.generation_config.bos_token_id, stop_strings=stop or None)
    results: list[list[Completion]] = [[] for _ in prompts]
    stats = stats if stats is not None else GenerationStats()
    start = time.perf_counter()
    with progress_bar(description, total=len(jobs), enabled=progress) as advance:
        for b, lo in enumerate(range(0, len(jobs), batch_size)):
            batch = jobs[lo:lo + batch_size]
            if done_batches and b in done_batches:
                for c in done_batches[b]:
                    results[c.prompt_index].append(c)
                advance(len(batch))
                continue
            enc = tokenizer([texts[i] for i, _ in batch], return_tensors="pt", padding=True,
                            padding_side="left", add_special_tokens=not chat).to(model.device)
            torch.manual_seed(seed + b)
            with torch.inference_mode():
                out = model.generate(**enc, generation_config=gen_config,
                                     tokenizer=tokenizer if stop else None)
            new_tokens = out[:, enc["input_ids"].shape[1]:].tolist()
            done = []
            for (i, j), row in zip(batch, new_tokens, strict=True):
                n = _generated_length(row, eos_ids, pad_id)
                text = truncate_at_stop(tokenizer.decode(row[:n], skip_special_tokens=True), stop).strip()
                done.append(Completion(text, n, i, j))
                results[i].append(done[-1])
                stats.tokens += n
            stats.sequences += len(batch)
            if on_batch is not None:
                on_batch(done)
            advance(len(batch))
    stats.seconds += time.perf_counter() - start
    return results


def _generated_length(row: list[int], eos_ids: list[int], pad_id: int) -> int:
    """Tokens the model produced: through the first eos, or up to the padding after a stop string."""
    for k, token in enumerate(row):
        if token in eos_ids:
            return k + 1
        if token == pad_id:
            return k
    return len(row)


def generate_texts(model, tokenizer, prompts: list[str], **kwargs: Any) -> list[list[str]]:
    """Completions (texts) for each user message in ``prompts``; takes the keyword arguments of
    :func:`sample_completions` (``temperature=0``, the default, means greedy decoding)."""
    return [[c.text for c in group] for group in sample_completions(model, tokenizer, prompts, **kwargs)]
