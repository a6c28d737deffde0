"""``icm generate``: sample candidate solutions from a model and write them as claims for ``icm label``.

Finished samples are appended to ``OUT.partial.jsonl`` a batch at a time, so an interrupted run resumes exactly
(``--resume``); the claims Parquet and its diversity report are written atomically at the end.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icm.backends import Backend
from icm.config import GenerationConfig
from icm.data.answers import check_extractor
from icm.data.candidates import candidate_rows, claims_table, diversity_report, report_path
from icm.data.io import InputError, atomic_path, regular_file, scrub_text, write_json, write_parquet
from icm.data.tasks import Question
from icm.sampling import Completion, GenerationStats, user_message

if TYPE_CHECKING:
    from icm.config import ServerConfig, VLLMConfig


def sample(backend: Backend, prompts: list[str], config: GenerationConfig, **kwargs: Any) -> list[list[Completion]]:
    """``config.num_candidates`` completions of each user message from ``backend``, sampled as ``config`` says;
    ``kwargs`` go to ``Backend.sample_completions`` (progress, on_batch, stats, done_batches)."""
    return backend.sample_completions(
        prompts, num_samples=config.num_candidates, temperature=config.temperature, top_p=config.top_p,
        max_new_tokens=config.max_new_tokens, stop=config.stop, batch_size=config.batch_size, seed=config.seed,
        use_chat_template=config.use_chat_template, **kwargs)


def generate_candidates(
    questions: list[Question],
    backend: Backend,
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
    completions = sample(backend, prompts, config, progress=progress, on_batch=on_batch, stats=stats)
    rows = candidate_rows(questions, prompts, completions, config, generator_name)
    return rows, diversity_report(rows, stats, config)


def checkpoint_path(output: str | Path) -> Path:
    return Path(output).with_suffix(".partial.jsonl")


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
        lines = regular_file(path).read_bytes().decode("utf-8", errors="replace").split("\n")
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
    engine: ServerConfig | VLLMConfig | None = None,
) -> dict[str, Any]:
    """Generate candidates for ``questions`` with ``model_spec`` and write the claims Parquet ``output`` and
    its diversity report (``OUT.report.json``), both atomically. Finished samples are appended to
    ``OUT.partial.jsonl`` as they come, a batch at a time; with ``resume`` the batches completed there are not
    generated again, and since batch ``i`` is always seeded with ``seed + i``, the result is exactly that of an
    uninterrupted run (a run killed at any moment included). ``engine`` samples through OpenAI-compatible
    servers serving ``model_spec`` (a ``ServerConfig``, ``icm.server``), checked before anything is written, or
    in vLLM's offline engine (a ``VLLMConfig``, ``icm.vllm_engine``). Returns the report."""
    from icm.engines import load_backend

    output = Path(output)
    if output.suffix != ".parquet":
        raise InputError(output, "the output must be a .parquet file")
    check_extractor(config.extractor)
    prompts = [user_message(q.question, config.instruction) for q in questions]
    by_id = {q.id: p for q, p in zip(questions, prompts, strict=True)}
    ckpt = checkpoint_path(output)
    if ckpt.exists() and not resume:
        raise InputError(ckpt, "an interrupted run left this checkpoint: pass --resume to continue it, or delete it")
    kind = "in-process" if engine is None else type(engine).__name__  # ServerConfig or VLLMConfig
    fingerprint = _fingerprint(model_spec, config, by_id, dtype, device, kind)
    order = {q.id: i for i, q in enumerate(questions)}
    done, lines = _load_checkpoint(ckpt, order, config, fingerprint) if resume and ckpt.exists() else ({}, [])
    backend = load_backend(model_spec, engine, dtype=dtype, device=device)
    with atomic_path(ckpt) as tmp:  # only whole batches are kept: a line cut short by a kill goes
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    stats = GenerationStats()
    with ckpt.open("a", encoding="utf-8") as f:
        def save(batch: list[Completion]) -> None:
            for c in batch:
                q = questions[c.prompt_index]
                f.write(scrub_text(json.dumps({
                    "format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "question_id": q.id,
                    "batch": (c.prompt_index * config.num_candidates + c.sample_index) // config.batch_size,
                    "sample_index": c.sample_index, "text": c.text, "num_tokens": c.num_tokens})) + "\n")
            f.flush()

        completions = sample(backend, prompts, config, progress=progress, on_batch=save, stats=stats,
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
