"""Sample diverse candidate solutions from a model and turn them into claims for ``icm label``."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import pyarrow as pa
import torch

from icm.data.answers import answers_match, check_extractor, closed_answers, extract_answer, extract_closed, whole_word
from icm.data.console import console
from icm.data.io import InputError, atomic_path, write_json, write_parquet
from icm.data.tasks import DEFAULT_INSTRUCTION, Question

if TYPE_CHECKING:
    from icm.server import ServerConfig
    from icm.vllm_engine import VLLMConfig

# Extra end-of-turn tokens some chat templates use besides the tokenizer's eos token.
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>")

CLAIMS_SCHEMA = pa.schema([
    ("question", pa.string()),
    ("choice", pa.string()),
    ("answer", pa.string()),
    ("consistency_id", pa.int64()),
    ("label", pa.bool_()),
    ("prompt", pa.string()),
    ("reference", pa.string()),
    ("candidate_index", pa.int64()),
    ("generator", pa.string()),
    ("num_tokens", pa.int64()),
    ("question_id", pa.string()),
])


@dataclass
class GenerationConfig:
    """How ``icm generate`` samples candidate solutions.

    Args:
        num_candidates: solutions sampled per question (before exact duplicates are removed).
        temperature: sampling temperature; 0 means greedy decoding (then all candidates are identical).
        top_p: nucleus sampling threshold (1.0 disables it); there is no top-k cut.
        max_new_tokens: the most tokens generated per candidate.
        stop: strings that end a candidate; the completion is cut at the first one (it is not kept).
        instruction: text put before each question in the user message (empty for the bare question).
        use_chat_template: wrap the user message in the model's chat template when it has one; otherwise
            the prompt is the raw user message followed by a new line and ``Answer:``.
        batch_size: sequences generated together (left padded).
        seed: sampling seed; batch ``i`` is seeded with ``seed + i``, so the same seed and batch size give
            the same candidates.
        extractor: answer extractor name (see ``data.answers.EXTRACTORS``), ``"auto"``, or a closed answer set
            ``"a|b|..."`` (the first allowed answer the text states).
        include_reference: also add the question's reference solution as a candidate (``candidate_index`` -1).
        enumerate_answers: with a closed answer set (``extractor`` ``"a|b|..."``), make sure every allowed answer
            is among a question's candidates: for an answer no sample gave, each sample is copied with its answer
            word replaced (``candidate_index`` -2, generator ``enumerated``), so a question always yields a right
            and a wrong candidate that differ only in the answer.
    """

    num_candidates: int = 4
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ("\nQuestion:",)
    instruction: str = DEFAULT_INSTRUCTION
    use_chat_template: bool = True
    batch_size: int = 8
    seed: int = 0
    extractor: str = "auto"
    include_reference: bool = False
    enumerate_answers: bool = False


@dataclass
class Completion:
    """One sampled completion: its text (cut at the stop strings), the tokens generated, and which prompt and
    sample it is."""

    text: str
    num_tokens: int
    prompt_index: int = 0
    sample_index: int = 0


@dataclass
class GenerationStats:
    """Running totals for throughput: tokens generated, sequences sampled, seconds spent generating."""

    tokens: int = 0
    sequences: int = 0
    seconds: float = 0.0


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr; yields ``advance(n)``."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


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


@runtime_checkable
class Sampler(Protocol):
    """A model that samples by itself (an ``icm.backends.Backend``, e.g. a served one) rather than a transformers
    model: :func:`sample_completions` hands it the work."""

    def sample_completions(self, prompts: list[str], **kwargs: Any) -> list[list[Completion]]: ...


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
    completions of an uninterrupted one."""
    if isinstance(model, Sampler):  # e.g. a model served elsewhere (icm.server.ServerBackend)
        return model.sample_completions(
            prompts, num_samples=num_samples, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
            stop=stop, batch_size=batch_size, seed=seed, use_chat_template=use_chat_template, progress=progress,
            on_batch=on_batch, stats=stats, description=description, done_batches=done_batches)
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


def generate_candidates(
    questions: list[Question],
    model,
    tokenizer,
    config: GenerationConfig,
    generator_name: str = "",
    progress: bool = True,
    on_batch: Callable[[list[Completion]], None] | None = None,
) -> tuple[list[dict], dict]:
    """Sample ``config.num_candidates`` solutions per question; return ``(claims rows, diversity report)``.

    Each question is one consistency group (``consistency_id`` = its position in ``questions``). Exact
    duplicate solutions within a question are dropped; candidates without an extractable answer are kept
    with ``answer=""`` (and ``label=False`` when there is a reference)."""
    prompts = [user_message(q.question, config.instruction) for q in questions]
    stats = GenerationStats()
    completions = sample_completions(
        model, tokenizer, prompts, num_samples=config.num_candidates, temperature=config.temperature,
        top_p=config.top_p, max_new_tokens=config.max_new_tokens, stop=config.stop, batch_size=config.batch_size,
        seed=config.seed, use_chat_template=config.use_chat_template, progress=progress, on_batch=on_batch,
        stats=stats)
    rows = candidate_rows(questions, prompts, completions, config, generator_name)
    return rows, diversity_report(rows, stats, config)


def candidate_rows(questions: list[Question], prompts: list[str], completions: list[list[Completion]],
                   config: GenerationConfig, generator_name: str = "") -> list[dict]:
    """Claims rows for sampled completions (plus the reference solutions when asked), duplicates and empty
    completions (nothing to label or to train on) removed."""
    rows = []
    for cid, (q, prompt, group) in enumerate(zip(questions, prompts, completions, strict=True)):
        candidates = [(c.text, c.sample_index, c.num_tokens, generator_name) for c in group]
        if config.include_reference and q.solution:
            candidates.append((q.solution.strip(), -1, 0, "reference"))
        if config.enumerate_answers and (options := closed_answers(config.extractor)):
            candidates += [(text, -2, 0, "enumerated") for text in enumerated_answers(
                [c.text for c in group], options)]
        seen: set[str] = set()
        for text, index, num_tokens, generator in candidates:
            if not text or text in seen:
                continue
            seen.add(text)
            answer = extract_answer(text, config.extractor)
            if index == -1 and not answer:
                answer = q.reference or ""
            rows.append({
                "question": q.question, "choice": text, "answer": answer, "consistency_id": cid,
                "label": None if q.reference is None else answers_match(answer, q.reference),
                "prompt": prompt, "reference": q.reference, "candidate_index": index, "generator": generator,
                "num_tokens": num_tokens, "question_id": q.id,
            })
    return rows


def swap_answer(text: str, old: str, new: str) -> str:
    """``text`` with its first whole-word ``old`` replaced by ``new``, keeping the case of the first letter."""
    match = whole_word(old).search(text)
    if match is None:
        return new
    word = new[:1].upper() + new[1:] if match.group(0)[:1].isupper() else new
    return text[:match.start()] + word + text[match.end():]


def enumerated_answers(texts: list[str], options: tuple[str, ...]) -> list[str]:
    """Extra candidates that give the allowed answers none of ``texts`` gives: each text that states an allowed
    answer, with that answer swapped for the missing one (the bare answer when no text states any)."""
    stated = [(text, extract_closed(text, options)) for text in texts]
    given = {answer for _, answer in stated if answer}
    extra: list[str] = []
    for missing in (o for o in options if o not in given):
        swapped = [swap_answer(text, answer, missing) for text, answer in stated if answer] or [missing]
        extra += [t for t in dict.fromkeys(swapped) if t not in extra]
    return extra


def diversity_report(rows: list[dict], stats: GenerationStats, config: GenerationConfig,
                     sampled: int | None = None) -> dict[str, Any]:
    """How useful the candidates are for ICM: distinct answers per question, and how many questions have
    both a correct and an incorrect candidate (only those can yield gold-checkable preference pairs).
    ``sampled`` is the number of candidates sampled in all (default: ``stats.sequences``, this run's)."""
    sampled = stats.sequences if sampled is None else sampled
    groups: dict[int, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["consistency_id"], []).append(row)
    generated = [r for r in rows if r["candidate_index"] >= 0]
    distinct = [len({r["answer"] for r in g if r["answer"]}) for g in groups.values()]
    with_gold = [g for g in groups.values() if g[0]["reference"] is not None]
    n_gold = len(with_gold)
    mixed = sum(any(r["label"] for r in g) and not all(r["label"] for r in g) for g in with_gold)
    graded = [r for r in generated if r["label"] is not None]
    report = {
        "questions": len(groups),
        "candidates_sampled": sampled,
        "claims": len(rows),
        "duplicates_removed": sampled - len(generated),
        "no_answer": sum(not r["answer"] for r in generated),
        "distinct_answers_mean": sum(distinct) / len(distinct) if distinct else 0.0,
        "distinct_answers_histogram": {str(k): distinct.count(k) for k in sorted(set(distinct))},
        "questions_with_reference": n_gold,
        "candidate_accuracy": sum(bool(r["label"]) for r in graded) / len(graded) if graded else None,
        "questions_any_correct": sum(any(r["label"] for r in g) for g in with_gold),
        "questions_mixed": mixed,
        "mixed_share": mixed / n_gold if n_gold else None,
        "tokens_generated": stats.tokens,
        "seconds": round(stats.seconds, 3),
        "tokens_per_second": stats.tokens / stats.seconds if stats.seconds else None,
        "config": asdict(config),
    }
    return report


def claims_table(rows: list[dict]) -> pa.Table:
    """Rows from :func:`generate_candidates` as an Arrow table with the claims schema (without the gold
    ``label`` column when no question has a reference answer)."""
    schema = CLAIMS_SCHEMA
    if all(row["label"] is None for row in rows):
        schema = schema.remove(schema.get_field_index("label"))
    return pa.Table.from_pylist(rows, schema=schema)


def checkpoint_path(output: str | Path) -> Path:
    return Path(output).with_suffix(".partial.jsonl")


def report_path(output: str | Path) -> Path:
    return Path(output).with_suffix(".report.json")


CHECKPOINT_FORMAT = 2
"""Version of the lines in ``OUT.partial.jsonl``; lines of another format are refused, not misread."""


def _fingerprint(model_spec: str, config: GenerationConfig, prompts: dict[str, str], dtype: str,
                 device: str | None, engine: str) -> str:
    """What the sampled completions depend on: the model, the engine that samples, the settings, and every
    question's id and prompt."""
    h = hashlib.sha256(json.dumps([model_spec, asdict(config), dtype, device, engine], default=str).encode())
    h.update(json.dumps(list(prompts.items())).encode())
    return h.hexdigest()[:16]


def _load_checkpoint(path: Path, order: dict[str, int], config: GenerationConfig,
                     fingerprint: str) -> tuple[dict[int, list[Completion]], list[str]]:
    """The batches a previous run finished (every sample of the batch in the file), and their lines. A line cut
    short by the interruption is skipped (its batch is generated again); a line of another icm version or of
    other questions, model or settings is an error that says what to do."""
    restart = "delete it to start over, or write to another output path"
    found: dict[int, dict[tuple[int, int], tuple[Completion, str]]] = {}
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    except OSError as error:
        raise InputError(path, f"cannot read the checkpoint ({error.strerror}); {restart}") from None
    for line in lines:
        try:
            record = json.loads(line)
            i, j = order[record["question_id"]], int(record["sample_index"])
            c = Completion(str(record["text"]), int(record["num_tokens"]), i, j)
            b, version = int(record["batch"]), record["format"]
        except (ValueError, KeyError, TypeError):  # cut short, or damaged: that batch is generated again
            continue
        if version != CHECKPOINT_FORMAT or record.get("fingerprint") != fingerprint:
            why = ("another icm version" if version != CHECKPOINT_FORMAT
                   else "other questions, model or settings")
            raise InputError(path, f"checkpoint written by {why}; {restart}")
        found.setdefault(b, {})[(i, j)] = (c, line)
    jobs = [(i, j) for i in range(len(order)) for j in range(config.num_candidates)]
    done = {b: entries for b, entries in found.items()
            if set(entries) == set(jobs[b * config.batch_size:(b + 1) * config.batch_size])}
    return ({b: [entries[job][0] for job in sorted(entries)] for b, entries in done.items()},
            [entries[job][1] for _, entries in sorted(done.items()) for job in sorted(entries)])


def generate_file(
    questions: list[Question],
    output: str | Path,
    model_spec: str,
    config: GenerationConfig,
    *,
    dtype: str = "auto",
    device: str | None = None,
    resume: bool = False,
    command: str = "",
    progress: bool = True,
    server: ServerConfig | VLLMConfig | None = None,
) -> dict[str, Any]:
    """Generate candidates for ``questions`` with ``model_spec`` and write the claims Parquet ``output`` and
    its diversity report (``OUT.report.json``), both atomically. Finished samples are appended to
    ``OUT.partial.jsonl`` as they come, a batch at a time; with ``resume`` the batches completed there are not
    generated again, and since batch ``i`` is always seeded with ``seed + i``, the result is exactly that of an
    uninterrupted run (a run killed at any moment included). ``server`` samples through OpenAI-compatible
    servers serving ``model_spec`` (a ``ServerConfig``, ``icm.server``), checked before anything is written, or
    in vLLM's offline engine (a ``VLLMConfig``, ``icm.vllm_engine``). Returns the report."""
    from icm.backends import load_backend

    output = Path(output)
    if output.suffix != ".parquet":
        raise InputError(output, "the output must be a .parquet file")
    check_extractor(config.extractor)
    prompts = [user_message(q.question, config.instruction) for q in questions]
    by_id = {q.id: p for q, p in zip(questions, prompts, strict=True)}
    ckpt = checkpoint_path(output)
    if ckpt.exists() and not resume:
        raise InputError(ckpt, "an interrupted run left this checkpoint: pass --resume to continue it, or delete it")
    engine = "in-process" if server is None else type(server).__name__  # ServerConfig or VLLMConfig
    fingerprint = _fingerprint(model_spec, config, by_id, dtype, device, engine)
    order = {q.id: i for i, q in enumerate(questions)}
    done, lines = _load_checkpoint(ckpt, order, config, fingerprint) if resume and ckpt.exists() else ({}, [])
    model, tokenizer = load_backend(model_spec, server, dtype=dtype, device=device)
    with atomic_path(ckpt) as tmp:  # only whole batches are kept: a line cut short by a kill goes
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    stats = GenerationStats()
    with ckpt.open("a", encoding="utf-8") as f:
        def save(batch: list[Completion]) -> None:
            for c in batch:
                q = questions[c.prompt_index]
                f.write(json.dumps({"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "question_id": q.id,
                                    "batch": (c.prompt_index * config.num_candidates + c.sample_index)
                                    // config.batch_size, "sample_index": c.sample_index, "text": c.text,
                                    "num_tokens": c.num_tokens}) + "\n")
            f.flush()

        completions = sample_completions(
            model, tokenizer, prompts, num_samples=config.num_candidates,
            temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens,
            stop=config.stop, batch_size=config.batch_size, seed=config.seed,
            use_chat_template=config.use_chat_template, progress=progress, on_batch=save, stats=stats,
            done_batches=done)
    from_checkpoint = Counter(c.prompt_index for batch in done.values() for c in batch)
    rows = candidate_rows(questions, prompts, completions, config, model_spec)
    report = diversity_report(rows, stats, config, sampled=sum(map(len, completions)))
    report["resumed_questions"] = sum(n == config.num_candidates for n in from_checkpoint.values())
    report["model"] = model_spec
    metadata = {"model": model_spec, "config": asdict(config), "seed": config.seed, "command": command,
                "report": {k: v for k, v in report.items() if k != "config"}}
    write_parquet(output, claims_table(rows), metadata=metadata)
    write_json(report_path(output), report)
    ckpt.unlink(missing_ok=True)
    return report


def report_table(report: dict[str, Any]):
    """The diversity report as a rich table (for the terminal)."""
    from rich.table import Table

    def fmt(value: Any, spec: str = "") -> str:
        return "-" if value is None else format(value, spec)

    table = Table(title="icm generate", show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in [
        ("questions", fmt(report["questions"])),
        ("candidates sampled", fmt(report["candidates_sampled"])),
        ("claims written (duplicates removed)", f"{report['claims']} ({report['duplicates_removed']})"),
        ("candidates without an answer", fmt(report["no_answer"])),
        ("distinct answers per question", fmt(report["distinct_answers_mean"], ".2f")),
        ("candidate accuracy (gold)", fmt(report["candidate_accuracy"], ".1%")),
        ("questions with a correct candidate", fmt(report["questions_any_correct"])),
        ("questions with correct and incorrect", f"{report['questions_mixed']} ({fmt(report['mixed_share'], '.0%')})"),
        ("tokens generated", fmt(report["tokens_generated"])),
        ("tokens / second", fmt(report["tokens_per_second"], ".1f")),
    ]:
        table.add_row(name, value)
    return table
