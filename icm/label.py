"""``icm label``: read claims, run the ICM search, write labels (Parquet) and a run directory.

The output has every input column, in input order, plus ``icm_label``, ``icm_score`` (the final log-odds
of True vs False given the other labelled claims) and ``icm_searched``. ``run_dir/run.json`` records the
model, template, hyperparameters, seed, U trajectory, acceptance rate and, when the input has a gold
column, accuracy against it (computed after the search, and shown in the progress bar for display only).
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import asdict, replace
from dataclasses import fields as fields_of
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from icm.backends import Backend
from icm.config import (
    GenerationConfig,
    ICMConfig,
    IterativeConfig,
    PromptTemplate,
    SourceConfig,
    check_claim_mode,
)
from icm.data.answers import closed_answers
from icm.data.claims import AnswerClaims, Claim, ClaimFields, answer_claims, claims_from_records, gold_labels
from icm.data.console import console
from icm.data.io import (
    InputError,
    check_output,
    check_outputs,
    first_line,
    read_parquet_metadata,
    read_records,
    text_value,
    write_json,
    write_parquet,
)
from icm.data.tasks import load_questions
from icm.generate import generate_candidates
from icm.iterative import label_iteratively
from icm.quality import label_quality, vote
from icm.scoring import estimate_share, threshold
from icm.search import Checkpoint, fingerprint, label_claims
from icm.sources import confidence_labels, judge_labels, majority_labels

if TYPE_CHECKING:
    from icm.config import ServerConfig


def run_dir_for(output: str | Path, run_dir: str | Path | None = None) -> Path:
    """The run directory of a labels file: ``run_dir`` when given, else ``OUTPUT.run`` next to it."""
    return Path(run_dir) if run_dir else Path(output).with_suffix(".run")


RUN_FILES = ("run.json", "checkpoint.json", "claims.json", "recipe.yaml")
"""What ``icm label`` writes in its run directory."""


def check_run_files(output: str | Path, run_dir: str | Path | None, input_path: str | Path) -> None:
    """Refuse, before any work, a labels file or run directory (or a file in it) that is the input or each other,
    and a file where the default run directory ``OUTPUT.run`` goes (saying what to do)."""
    check_output(output, input_path)
    directory = run_dir_for(output, run_dir)
    if run_dir is None and directory.exists() and not directory.is_dir():
        raise InputError(directory, f"is a file where the run directory of -o {output} goes; move it away or "
                         "pass --run-dir DIR")
    check_output(directory, input_path, directory=True)
    if os.path.realpath(directory) == os.path.realpath(output):
        raise InputError(output, "the output and its run directory are the same path; pass another --run-dir")
    check_outputs({"the output": output} | {f"the run's {name}": directory / name for name in RUN_FILES},
                  [input_path])


def accuracy(labels: dict[int, bool] | list[bool], gold: list[bool | None]) -> float | None:
    items = labels.items() if isinstance(labels, dict) else enumerate(labels)
    hits = [y == gold[i] for i, y in items if gold[i] is not None]
    return float(np.mean(hits)) if hits else None


def progress_text(info: dict[str, Any], gold: list[bool | None] | None) -> tuple[int, int, str]:
    """(steps done, steps in all, description) of the progress bar after a search step (``info`` as
    ``label_claims`` reports it): the batch's own steps, or, with several batches searched at the same time,
    the steps of all of them and each one's progress, the numbers after the batch that reported."""
    running = info.get("running") or {info["batch"]: (info["iteration"], info["iterations"])}
    stats = f"U {info['utility']:.2f}  accept {info['acceptance']:.0%}"
    if gold is not None and (acc := accuracy(info["labels"], gold)) is not None:
        stats += f"  gold acc {acc:.0%}"
    if len(running) == 1:
        return info["iteration"], info["iterations"], f"batch {info['batch'] + 1}/{info['batches']}  {stats}"
    each = " ".join(f"{b + 1} ({done}/{steps})" for b, (done, steps) in sorted(running.items()))
    text = (f"batches {info.get('done', 0)}/{info['batches']} done, running {each}  "
            f"batch {info['batch'] + 1}: {stats}")
    return sum(done for done, _ in running.values()), sum(steps for _, steps in running.values()), text


def label_records(records: list[dict[str, Any]], backend: Backend, config: ICMConfig | None = None, *,
                  template: PromptTemplate | None = None, fields: ClaimFields | None = None,
                  run_dir: Path | None = None, resume: bool = False, model_name: str = "",
                  source: str | Path = "<input>", show_progress: bool = True,
                  iterative: IterativeConfig | None = None) -> tuple[list[dict[str, Any]], dict]:
    """Label claim rows; returns the rows with ``icm_label``, ``icm_score``, ``icm_searched`` added, and a
    summary. The gold column (``fields.label``) is read only to report accuracy after the fact.
    ``iterative`` labels batch by batch with a labeller fine-tuned as it goes (:mod:`icm.iterative`)."""
    fields = fields or ClaimFields()
    results, summary = search_labels(claims_from_records(records, source, fields), backend, config,
                                     gold=gold_labels(records, source, fields.label), template=template,
                                     run_dir=run_dir, resume=resume, model_name=model_name,
                                     show_progress=show_progress, iterative=iterative)
    return [{**record, **result} for record, result in zip(records, results)], summary


def search_labels(claims: list[Claim], backend: Backend, config: ICMConfig | None = None, *,
                  gold: list[bool | None] | None = None, template: PromptTemplate | None = None,
                  run_dir: Path | None = None, resume: bool = False, model_name: str = "", show_progress: bool = True,
                  iterative: IterativeConfig | None = None) -> tuple[list[dict[str, Any]], dict]:
    """The ICM search over ``claims`` with a progress display: one result per claim (``icm_label``,
    ``icm_score``, ``icm_searched``) and the summary, with accuracy against ``gold`` when given (after the fact,
    and in the progress bar for display only)."""
    config = config or ICMConfig()
    progress = Progress(TextColumn("[bold]ICM"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                        TimeElapsedColumn(), disable=not show_progress, console=console)
    task = progress.add_task("", total=None)

    def on_progress(info: dict[str, Any]) -> None:
        completed, total, text = progress_text(info, gold)
        progress.update(task, completed=completed, total=total, description=text)

    search = label_claims if iterative is None else functools.partial(label_iteratively, iterative=iterative)
    runs = []
    with progress:
        for r in range(config.restarts):  # restart 0 is the plain search, in run_dir itself
            restart = replace(config, seed=config.seed + r, restarts=1) if config.restarts > 1 else config
            where = run_dir / f"restart-{r}" if run_dir is not None and r else run_dir
            runs.append(search(claims, backend, restart, template=template, run_dir=where,
                               resume=resume, model_name=model_name, progress=on_progress))
    results, summary = runs[0] if len(runs) == 1 else vote_restarts(runs, config.seed, gold)
    summary["quality"] = label_quality(claims, [r["icm_label"] for r in results], [r["icm_score"] for r in results],
                                       [r["icm_agreement"] for r in results] if len(runs) > 1 else None, len(runs))
    if gold is not None:
        labels = [r["icm_label"] for r in results]
        for batch in summary.get("iterative", {}).get("batches", []):
            batch["gold_accuracy"] = accuracy({i: labels[i] for i in batch["members"]}, gold)
        searched = {i: r["icm_label"] for i, r in enumerate(results) if r["icm_searched"]}
        summary["gold_accuracy"] = accuracy(labels, gold)
        summary["gold_accuracy_searched"] = accuracy(searched, gold)
        summary["gold_true_share"] = float(np.mean([g for g in gold if g is not None]))
    return results, summary


def vote_restarts(runs: list[tuple[list[dict[str, Any]], dict]], seed: int,
                  gold: list[bool | None] | None = None) -> tuple[list[dict[str, Any]], dict]:
    """One result per claim from several restarts' (results, summary): the voted label (:func:`icm.quality.vote`),
    the mean score, ``icm_searched`` when any restart searched the claim, and ``icm_agreement``; the summary is the
    first restart's with the counters summed and ``restarts`` (each restart's seed, True share and, with gold,
    accuracy) added."""
    labels, scores, agreement = vote([[r["icm_label"] for r in results] for results, _ in runs],
                                     [[r["icm_score"] for r in results] for results, _ in runs])
    results = [{"icm_label": y, "icm_score": z, "icm_searched": any(rs[i]["icm_searched"] for rs, _ in runs),
                "icm_agreement": a} for i, (y, z, a) in enumerate(zip(labels, scores, agreement))]
    summary = dict(runs[0][1])
    for key in ("seconds", "forward_tokens", "uncached_tokens", "proposals"):
        summary[key] = sum(s.get(key, 0) for _, s in runs)
    summary["forward_tokens_per_claim"] = summary["forward_tokens"] / max(len(results), 1)
    summary["true_share"] = float(np.mean(labels)) if labels else 0.0
    summary["searched"] = sum(r["icm_searched"] for r in results)
    summary["restarts"] = [{"seed": seed + k, "true_share": s["true_share"],
                            "acceptance_rate": s.get("acceptance_rate"), "inconsistencies": s.get("inconsistencies"),
                            "gold_accuracy": accuracy([r["icm_label"] for r in rs], gold) if gold else None}
                           for k, (rs, s) in enumerate(runs)]
    return results, summary


def candidate_labels(formulated: AnswerClaims, claim_results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each candidate's result from the answer claim that decides it (``icm_claim`` names the claim); a candidate
    with no allowed answer is False, scored below every claim."""
    floor = min((r["icm_score"] for r in claim_results), default=0.0) - 1.0
    out = []
    for link in formulated.source:
        if link is None:
            out.append({"icm_label": False, "icm_score": floor, "icm_searched": False, "icm_claim": ""}
                       | ({"icm_agreement": 1.0} if claim_results and "icm_agreement" in claim_results[0] else {}))
            continue
        claim, same = claim_results[link[0]], link[1]
        out.append({"icm_label": claim["icm_label"] == same,
                    "icm_score": claim["icm_score"] if same else -claim["icm_score"],
                    "icm_searched": claim["icm_searched"], "icm_claim": formulated.rows[link[0]]["choice"]}
                   | ({"icm_agreement": claim["icm_agreement"]} if "icm_agreement" in claim else {}))
    return out


def zero_shot_records(records: list[dict[str, Any]], backend: Backend, config: ICMConfig | None = None, *,
                      template: PromptTemplate | None = None, fields: ClaimFields | None = None,
                      source: str | Path = "<input>") -> tuple[list[dict[str, Any]], dict]:
    """:func:`zero_shot_labels` of claim rows; returns rows and a summary as :func:`label_records` does."""
    fields = fields or ClaimFields()
    results, summary = zero_shot_labels(claims_from_records(records, source, fields), backend, config,
                                        gold=gold_labels(records, source, fields.label), template=template)
    return [{**record, **result} for record, result in zip(records, results)], summary


def zero_shot_labels(claims: list[Claim], backend: Backend, config: ICMConfig | None = None, *,
                     gold: list[bool | None] | None = None,
                     template: PromptTemplate | None = None) -> tuple[list[dict[str, Any]], dict]:
    """The zero-shot baseline of the paper: each claim's log-odds with no demonstrations, minus their mean
    (the collapse guard of ICM's ``balance="center"``; kept raw with ``"none"``), labelled True when above 0.
    ``icm_searched`` is False everywhere."""
    config = config or ICMConfig()
    started = time.monotonic()
    scorer = backend.scorer(claims, template, config.max_context_tokens, config.scoring_batch_size)
    scores = scorer.score(list(range(len(claims))), demos=())
    if config.balance == "center" and len(scores):
        scores = scores - scores.mean()
    elif config.balance == "estimate" and len(scores):
        scores = scores - threshold(scores, estimate_share(scores))
    labels = [bool(z > 0) for z in scores]
    summary: dict[str, Any] = {"method": "zero-shot", "claims": len(claims), "searched": 0,
                               "true_share": float(np.mean(labels)) if labels else 0.0,
                               "seconds": time.monotonic() - started, "forward_tokens": scorer.forward_tokens}
    if gold is not None:
        summary["gold_accuracy"] = accuracy(labels, gold)
        summary["gold_true_share"] = float(np.mean([g for g in gold if g is not None]))
    return [{"icm_label": y, "icm_score": float(z), "icm_searched": False} for y, z in zip(labels, scores)], summary


LABEL_COLUMNS = {"icm_label": pa.bool_(), "icm_score": pa.float64(), "icm_searched": pa.bool_(),
                 "icm_claim": pa.string(), "icm_agreement": pa.float64()}
"""The columns ``icm label`` adds to its input (``icm_claim`` only for ``--claims answers`` / ``pivot``,
``icm_agreement`` only with ``--restarts`` above 1: the fraction of restarts agreeing with the final label)."""


def labels_table(records: list[dict[str, Any]], results: list[dict[str, Any]], source: str | Path) -> pa.Table:
    """The input rows as a table with the typed label columns of ``results`` set (replacing input columns of the
    same names in place, else appended)."""
    try:
        table = pa.Table.from_pylist(records)
    except (pa.ArrowException, OverflowError, ValueError, TypeError) as error:
        for name in dict.fromkeys(k for r in records for k in r):  # name the column Parquet cannot store
            try:
                pa.array([r.get(name) for r in records])
            except (pa.ArrowException, OverflowError, ValueError, TypeError) as problem:
                raise InputError(source, f"values that one Parquet column cannot store ({first_line(problem)}); "
                                 "give the column one type (quote numbers beyond 64 bits)", field=name) from None
        raise InputError(source, f"rows that Parquet cannot store ({first_line(error)})") from None
    for name, kind in LABEL_COLUMNS.items():
        if results and name in results[0]:
            column = pa.array([r[name] for r in results], kind)
            table = table.set_column(table.column_names.index(name), name, column) if name in table.column_names \
                else table.append_column(name, column)
    return table


def label_file(input_path: str | Path, output: str | Path, model_spec: str, config: ICMConfig | None = None, *,
               template: PromptTemplate | None = None, fields: ClaimFields | None = None,
               run_dir: str | Path | None = None, resume: bool = False, overwrite: bool = True, dtype: str = "auto",
               generation: GenerationConfig | None = None, answer_field: str = "answer",
               claim_mode: str = "candidates", answers: tuple[str, ...] | None = None,
               command: str = "", sources: SourceConfig | None = None,
               iterative: IterativeConfig | None = None, engine: ServerConfig | None = None) -> dict[str, Any]:
    """Label a claims file end to end. Input is validated before the model loads; the output Parquet
    and run.json are written atomically at the end, so a failure never leaves a half-written file.

    A file of questions (no ``choice`` column) is first turned into candidate claims by sampling
    ``generation.num_candidates`` solutions per question from the same model (as ``icm generate`` does).

    ``claim_mode`` says what the search labels: ``candidates`` (each row is a claim, as given), or claims about the
    candidates' final answers (``answers`` or ``pivot``, see :func:`data.claims.answer_claims`; ``answers`` is
    the closed answer set when there is one), whose labels are then copied back to the candidate rows.

    An existing ``output`` is replaced only with ``overwrite`` (or continued with ``resume``).

    ``sources.method`` is ``icm`` (the search), ``zero_shot`` (:func:`zero_shot_labels`, the paper's baseline) or one of
    the label-free alternatives of :mod:`icm.sources` (``majority``, ``judge``, ``confidence``: they label the
    candidates themselves, whatever ``claim_mode``, with the settings in ``sources``; ``generation``, or the
    input's own ``icm generate`` settings when it has them, says how the candidates were prompted and their
    answers extracted). ``iterative`` labels with iterative ICM (:mod:`icm.iterative`). ``engine`` scores (and
    samples) through OpenAI-compatible servers serving ``model_spec`` (:mod:`icm.server`) instead of loading the
    model here; the servers are checked before anything is written."""
    from icm.engines import load_backend

    config = config or ICMConfig()
    sources = sources or SourceConfig()
    method = sources.method
    template = template or PromptTemplate()
    fields = fields or ClaimFields()
    records = read_records(input_path)
    check_run_files(output, run_dir, input_path)
    if answers is None and claim_mode != "candidates" and Path(input_path).suffix == ".parquet":
        answers = closed_answers(read_parquet_metadata(input_path).get("config", {}).get("extractor", "auto"))
    try:
        check_claim_mode(claim_mode, answers)
    except ValueError as error:
        raise InputError(input_path, str(error)) from None
    questions = None
    if not any(fields.choice in r for r in records):
        questions = load_questions(str(input_path), question_field=fields.question, answer_field=answer_field)
    output = Path(output)
    run_dir = run_dir_for(output, run_dir)

    def formulate() -> tuple[AnswerClaims | None, list[Claim], list[bool | None] | None]:
        """What the search labels (parsed once, before any model loads when the input holds claims) and its gold."""
        formulated = answer_claims(records, claim_mode, answers) if claim_mode != "candidates" else None
        claim_records, claim_fields = (formulated.rows, ClaimFields()) if formulated else (records, fields)
        return (formulated, claims_from_records(claim_records, input_path, claim_fields),
                gold_labels(claim_records, input_path, claim_fields.label))

    if questions is None:
        if claim_mode != "candidates":  # claims about answers group the candidates by question
            for row, record in enumerate(records, start=1):
                text_value(input_path, row, "consistency_id", record.get("consistency_id"))
        gold = gold_labels(records, input_path, fields.label)
        formulated, claims, claims_gold = formulate()
        labels_table(records, [], input_path)  # the output holds every input column: one Parquet cannot store fails now
        if resume and method == "icm" and iterative is None:  # a damaged checkpoint: reported before the model loads
            Checkpoint(run_dir, fingerprint(claims, config, model_spec)).load()
    if output.exists() and not (resume or overwrite):
        raise InputError(output, "labels already exist; pass --overwrite to replace them, or --resume to continue "
                         "an interrupted run")
    if engine is not None and iterative is not None:
        raise InputError("--iterative", "fine-tunes the labeller in this process; it cannot run with --base-url")
    started = time.time()
    backend = load_backend(model_spec, engine, dtype=dtype)
    run_dir.mkdir(parents=True, exist_ok=True)
    generation_report = None
    if questions is not None:
        generation = generation or GenerationConfig(seed=config.seed)
        records, generation_report = generate_candidates(questions, backend, generation, model_spec)
        fields = ClaimFields()
        gold = gold_labels(records, input_path, fields.label)
        formulated, claims, claims_gold = formulate()
    if method in SOURCE_METHODS:
        formulated = None
        prompted = _candidates_generation(input_path, generation, answers)
        results, summary = source_labels(method, records, backend, prompted, sources, config, gold)
    elif method == "zero_shot":
        results, summary = zero_shot_labels(claims, backend, config, gold=claims_gold, template=template)
        summary["quality"] = label_quality(claims, [r["icm_label"] for r in results],
                                           [r["icm_score"] for r in results])
    else:
        results, summary = search_labels(claims, backend, config, gold=claims_gold, template=template,
                                         run_dir=run_dir, resume=resume, model_name=model_spec, iterative=iterative)
    if formulated:  # what was labelled, before the copy to the candidates
        write_json(run_dir / "claims.json", [{**row, **r} for row, r in zip(formulated.rows, results)])
        results = candidate_labels(formulated, results)
        summary["answer_claims"] = len(formulated.rows)
        if gold is not None:
            summary["claims_gold_accuracy"] = summary.get("gold_accuracy")
            summary["gold_accuracy"] = accuracy([r["icm_label"] for r in results], gold)
        summary["true_share"] = float(np.mean([r["icm_label"] for r in results]))
    run = {"model": model_spec, "input": str(input_path), "output": str(output), "command": command,
           "method": method, "claims_mode": claim_mode,
           "generation": generation_report,
           "template": asdict(template), "config": asdict(config), "seed": config.seed,
           "gold_accuracy": summary.get("gold_accuracy"), "seconds": time.time() - started,
           "backend": backend.report(), **summary}
    metadata = {k: run[k] for k in ("model", "template", "config", "seed", "command", "gold_accuracy")}
    metadata["true_share"] = summary["true_share"]
    sampled = asdict(generation) if questions is not None and generation is not None else \
        read_parquet_metadata(input_path).get("config") or {} if Path(input_path).suffix == ".parquet" else {}
    if isinstance(sampled.get("use_chat_template"), bool):  # how the candidates were prompted: pairs train alike
        metadata["use_chat_template"] = sampled["use_chat_template"]
    write_parquet(output, labels_table(records, results, input_path), metadata)
    write_json(run_dir / "run.json", run)
    return run


SOURCE_METHODS = ("majority", "judge", "confidence")


def _candidates_generation(path: str | Path, generation: GenerationConfig | None,
                           answers: tuple[str, ...] | None) -> GenerationConfig:
    """How the candidates were prompted and their answers extracted: the settings ``icm generate`` wrote into the
    Parquet file, else ``generation`` (with the closed answer set ``answers`` as the extractor when given)."""
    written = read_parquet_metadata(path).get("config") if Path(path).suffix == ".parquet" else None
    if written:
        known = {f.name for f in fields_of(GenerationConfig)}
        return GenerationConfig(**{k: v for k, v in written.items() if k in known})
    generation = generation or GenerationConfig()
    return replace(generation, extractor="|".join(answers)) if answers else generation


def source_labels(method: str, records: list[dict[str, Any]], backend: Backend, generation: GenerationConfig,
                  sources: SourceConfig, config: ICMConfig,
                  gold: list[bool | None] | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Labels of every candidate row by one of :mod:`icm.sources`' methods."""
    if method == "majority":
        return majority_labels(records, backend, generation, sources, gold)
    if method == "judge":
        return judge_labels(records, backend, generation.extractor, config.balance, gold, config.scoring_batch_size)
    return confidence_labels(records, backend, generation, gold)
