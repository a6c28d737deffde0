"""The icm command line: generate -> label -> pairs -> dpo -> eval (and transfer, push).

Each command parses its options and calls into data/, icm/ or dpo/; no logic lives here.
Bad input is reported on one line (file, row, field) with exit code 2. Every command takes
--config FILE.yaml (data/recipes.py) and -q/-v (data/console.py).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Optional  # noqa: F401  (typer needs real Optional at runtime on 3.10)

import typer

from icm.data.console import console, result, version
from icm.data.console import error as print_error
from icm.data.console import summary as summary_table
from icm.data.io import InputError, OutputError, ServerError
from icm.data.recipes import RECIPE_FILE, RecipeSpec, RecipeTyper
from icm.models import DEFAULT_MODEL, ModelNotFoundError

app = RecipeTyper(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0],
                  rich_markup_mode=None)  # plain help: "[default: ...]" in option help is text, not markup

MODEL_HELP = "Hub id, local HF directory, .gguf file, or alias (smollm2-135m, gemma3-270m)."
BASE_URL_HELP = ("OpenAI-compatible server (vLLM, SGLang, llama.cpp) to use instead of loading the model here, e.g. "
                 "http://127.0.0.1:8000/v1; repeatable (requests are spread over the servers); --model names the "
                 "served model. API key: $OPENAI_API_KEY or --api-key-env.")
TOKENIZER_HELP = "With --base-url: the served model's tokenizer (alias, directory or Hub id) [default: --model]."
API_KEY_ENV_HELP = "With --base-url: environment variable holding the API key (its value is never written)."
CONCURRENCY_HELP = "With --base-url: requests in flight per server."


def fail(message: str, code: int = 2) -> None:
    print_error(message)
    raise typer.Exit(code)


def task_settings(task: str | None, instruction: str | None, extractor: str | None,
                  max_new_tokens: int | None) -> tuple[str, str, int]:
    """Instruction, answer extractor and answer length: the command line's, else the built-in task's, else the
    defaults for open math questions."""
    from icm.data.tasks import DEFAULT_INSTRUCTION, get_task

    spec = get_task(task) if task else None
    return (instruction if instruction is not None else spec.instruction if spec else DEFAULT_INSTRUCTION,
            extractor or (spec.extractor if spec else "auto"),
            max_new_tokens or (spec.max_new_tokens if spec else 256))


def server_config(base_urls: list[str] | None, model: str, tokenizer: str | None, api_key_env: str,
                  concurrency: int):
    """The ``icm.server.ServerConfig`` of the --base-url options, or None without them (the model runs here)."""
    if not base_urls:
        return None
    from icm.server import ServerConfig

    try:
        return ServerConfig(base_urls=tuple(base_urls), model=model, tokenizer=tokenizer, api_key_env=api_key_env,
                            concurrency=concurrency)
    except ValueError as error:
        fail(str(error))


def cli_errors(fn):
    """Turn known user errors into a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (InputError, ModelNotFoundError, FileNotFoundError) as problem:
            fail(str(problem).splitlines()[0] if str(problem) else repr(problem))
        except (OutputError, OSError, ServerError) as problem:  # a full disk, a server gone: nothing half-written
            fail(str(problem).splitlines()[0] if str(problem) else repr(problem), code=1)
        except KeyboardInterrupt:
            print_error("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        print(f"icm {version()}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging; the libraries' progress bars, "
                                 "logs and warnings are shown."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only errors and the final result line."),
    show_version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                      help="Print the version and exit."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Also load model weights stored as pickles "
                                      "(.bin/.pt), which can run code when loaded; default: safetensors only."),
) -> None:
    """Settings of every command: -v and -q here or after the command's name."""
    if allow_pickle:
        os.environ["ICM_ALLOW_PICKLE"] = "1"  # also seen by `accelerate launch` workers and TRL's model loading
    ctx.meta["icm.verbose"], ctx.meta["icm.quiet"] = verbose, quiet
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


def output_sibling(key: str) -> RecipeSpec:
    """Recipe written next to the output file ``--KEY``: ``NAME.recipe.yaml`` (nowhere without one)."""
    return RecipeSpec(path=lambda p: Path(f"{Path(p[key]).with_suffix('')}.recipe.yaml") if p.get(key) else None)


def in_directory(key: str) -> RecipeSpec:
    return RecipeSpec(path=lambda p: Path(p[key]) / RECIPE_FILE)


def label_run_dir(params: dict) -> Path:
    from icm.label import run_dir_for

    return run_dir_for(params["output"], params["run_dir"]) / RECIPE_FILE


EXACT_EVERY_HELP = ("Search steps per exact evaluation of U; the steps in between use an approximate U (see "
                    "ICMConfig.exact_every). 1 = every step exact, the paper's search [default: 32].")


LOSS_TYPE_HELP = ("TRL DPO loss: sigmoid, ipo, hinge, robust, ..., or several comma-separated, summed with "
                  "--loss-weights (sigmoid,sft: DPO plus the chosen answers' NLL, RPO).")
LOSS_WEIGHTS_HELP = "Comma-separated weight per --loss-type [default: 1 each]."
LABEL_SMOOTHING_HELP = "--loss-type robust: assumed share of flipped preferences, in [0, 0.5)."


def loss_weights_option(value: str | None) -> tuple[float, ...] | None:
    """``--loss-weights 1,0.5`` as floats (a one-line error when one is not a number)."""
    if value is None or not value.strip():
        return None
    try:
        return tuple(float(w) for w in value.split(","))
    except ValueError:
        fail(f"--loss-weights: expected comma-separated numbers, got '{value}'")
        return None


CHECK_EVERY_HELP = ("Exact steps per exact evaluation of their proposal (the others decide it with the approximate "
                    "U on fresh scores; see ICMConfig.check_every). 1 = every exact step's proposal [default: 4].")


DEMO_ORDER_HELP = ("Order of the demonstrations in the prompt: labelling (the order the claims were first labelled; "
                   "a new label appends to the cached prefix) or fixed (a seeded order, the search before "
                   "2026-12-02) [default: labelling].")


def speed_options(exact_every: int | None, check_every: int | None, demo_order: str | None) -> dict[str, int | str]:
    """``ICMConfig`` keywords for ``--exact-every`` / ``--check-every`` / ``--demo-order``: only those given (else
    the defaults apply)."""
    given = (("exact_every", exact_every), ("check_every", check_every), ("demo_order", demo_order))
    return {k: v for k, v in given if v is not None}


# transfer's options per stage in a recipe: {section: {key in the section: option}}
TRANSFER_SECTIONS = {
    "generate": {"generator": "generator", "num_candidates": "num_candidates", "temperature": "temperature",
                 "enumerate_answers": "enumerate_answers", "batch_size": "generation_batch_size"},
    "label": {"claims": "claims", "iterations": "icm_iterations", "polish_iterations": "polish_iterations",
              "batch_size": "icm_batch_size", "alpha": "alpha", "exact_every": "exact_every",
              "check_every": "check_every", "demo_order": "demo_order"},
    "pairs": {"strategy": "pairs_strategy", "max_per_question": "max_per_question"},
    "dpo": {"lora": "lora", "beta": "beta", "learning_rate": "learning_rate", "epochs": "epochs",
            "max_steps": "max_steps", "batch_size": "batch_size", "max_length": "max_length",
            "loss_type": "loss_type", "loss_weights": "loss_weights", "label_smoothing": "label_smoothing",
            "seed": "dpo_seed"},
}


# ---- icm generate (issue 3) -------------------------------------------------------------------------


@app.command(recipe=output_sibling("output"))
@cli_errors
def generate(
    input: Path | None = typer.Argument(None, help="Questions file (JSONL/JSON/CSV/Parquet)."),
    output: Path = typer.Option(..., "--output", "-o", help="Claims Parquet file to write."),
    task: str | None = typer.Option(None, help="Built-in offline task instead of INPUT: arithmetic."),
    dataset: str | None = typer.Option(None, help="Hub dataset instead of INPUT, e.g. gsm8k (needs network)."),
    dataset_config: str | None = typer.Option(None, help="Hub dataset configuration, e.g. main."),
    split: str = typer.Option("train", help="Hub dataset split."),
    question_field: str = typer.Option("question", help="Field holding the question."),
    answer_field: str = typer.Option("answer", help="Field holding the reference answer (optional in the data)."),
    id_field: str | None = typer.Option(None, help="Field holding a question id (default: row number)."),
    limit: int | None = typer.Option(None, min=1, help="Use at most this many questions."),
    shuffle: bool = typer.Option(False, help="Pick the --limit questions at random (with --seed)."),
    model: str = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    base_url: list[str] | None = typer.Option(None, "--base-url", metavar="URL", help=BASE_URL_HELP),
    tokenizer: str | None = typer.Option(None, help=TOKENIZER_HELP),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help=API_KEY_ENV_HELP),
    concurrency: int = typer.Option(16, min=1, help=CONCURRENCY_HELP),
    num_candidates: int = typer.Option(4, min=1, help="Solutions sampled per question."),
    temperature: float = typer.Option(0.8, min=0.0, help="Sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(0.95, min=0.0, max=1.0, help="Nucleus sampling threshold."),
    max_new_tokens: int | None = typer.Option(None, min=1, help="Most tokens per candidate [default: the "
                                              "task's, else 256]."),
    stop: list[str] | None = typer.Option(None, help="Stop string (repeatable; default '\\nQuestion:')."),
    instruction: str | None = typer.Option(None, help="Instruction before each question [default: the task's, "
                                           "else step by step ending 'The answer is N']."),
    raw_prompt: bool = typer.Option(False, help="Don't use the model's chat template."),
    batch_size: int = typer.Option(8, min=1, help="Sequences generated together."),
    seed: int = typer.Option(0, help="Seed for sampling, --shuffle and the built-in task."),
    extractor: str | None = typer.Option(None, help="Answer extractor: auto, gsm8k, boxed, answer_is, last_number, "
                                         "choice, text, or allowed answers 'a|b' [default: the task's, else auto]."),
    include_reference: bool = typer.Option(False, help="Also add each reference solution as a candidate."),
    enumerate_answers: bool = typer.Option(False, help="Closed answer sets: add every allowed answer no sample "
                                           "gave as a candidate (a sample with its answer swapped)."),
    dtype: str = typer.Option("auto", help="auto, bf16, fp16, fp32."),
    device: str | None = typer.Option(None, help="cpu, cuda, ... (default: GPU when present)."),
    vllm: bool = typer.Option(False, "--vllm", help="Sample in vLLM's offline engine (GPU, `pip install vllm`); "
                              "give it large batches, e.g. --batch-size 512."),
    tensor_parallel_size: int = typer.Option(1, min=1, help="--vllm: GPUs the model is sharded over."),
    gpu_memory_utilization: float = typer.Option(0.9, min=0.05, max=1.0,
                                                 help="--vllm: share of each GPU's memory vLLM may take."),
    resume: bool = typer.Option(False, help="Reuse questions finished in OUT.partial.jsonl by an interrupted run."),
) -> None:
    """Sample candidate solutions from a model and write them as claims for `icm label`."""
    from icm.data.answers import check_extractor
    from icm.data.candidates import GenerationConfig, report_path, report_table
    from icm.data.io import check_output
    from icm.data.tasks import load_questions
    from icm.generate import generate_file

    if sum(map(bool, (input, task, dataset))) != 1:
        fail("give exactly one of INPUT, --task or --dataset")
    check_output(output, input)
    instruction, extractor, max_new_tokens = task_settings(task, instruction, extractor, max_new_tokens)
    try:
        check_extractor(extractor)
    except ValueError as error:
        fail(str(error))
    questions = load_questions(
        str(input) if input else None, task=task, dataset=dataset, config=dataset_config, split=split,
        question_field=question_field, answer_field=answer_field, id_field=id_field, limit=limit, seed=seed,
        shuffle=shuffle)
    defaults = GenerationConfig()
    gen_config = GenerationConfig(
        num_candidates=num_candidates, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
        stop=tuple(stop) if stop else defaults.stop, instruction=instruction, use_chat_template=not raw_prompt,
        batch_size=batch_size, seed=seed, extractor=extractor, include_reference=include_reference,
        enumerate_answers=enumerate_answers)
    server = server_config(base_url, model, tokenizer, api_key_env, concurrency)
    if vllm:
        from icm.vllm_engine import VLLM_DTYPES, VLLMConfig

        if server is not None:
            fail("give --vllm or --base-url, not both")
        if dtype not in VLLM_DTYPES:
            fail(f"--dtype {dtype}: one of {', '.join(VLLM_DTYPES)} with --vllm")
        server = VLLMConfig(tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                            dtype=VLLM_DTYPES[dtype])
    report = generate_file(questions, output, model, gen_config, dtype=dtype, device=device, resume=resume,
                           command=" ".join(["icm", *sys.argv[1:]]), server=server)
    console.print(report_table(report))
    result(f"wrote {report['claims']} claims to {output} (report: {report_path(output)})")

# ---- icm label (issue 2) ----------------------------------------------------------------------------


@app.command(recipe=RecipeSpec(path=label_run_dir))
@cli_errors
def label(
    input: Path = typer.Argument(..., help="Claims: JSONL, JSON list, CSV or Parquet (the ICM paper's format)."),
    output: Path = typer.Option(..., "--output", "-o", help="Labels Parquet file to write."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=MODEL_HELP),
    base_url: list[str] | None = typer.Option(None, "--base-url", metavar="URL", help=BASE_URL_HELP),
    tokenizer: str | None = typer.Option(None, help=TOKENIZER_HELP),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help=API_KEY_ENV_HELP),
    concurrency: int = typer.Option(16, min=1, help=CONCURRENCY_HELP),
    seed: int = typer.Option(0, help="Seed of the search (same seed, same labels)."),
    iterations: int | None = typer.Option(None, min=0, help="Search steps per batch [default: 4 x batch claims]."),
    polish_iterations: int | None = typer.Option(None, min=0,
                                                 help="Greedy steps after annealing [default: batch claims / 4]."),
    alpha: float = typer.Option(50.0, min=0, help="Weight of mutual predictability vs inconsistencies."),
    initial_labels: int = typer.Option(8, min=0, help="K: claims labelled at random before the search."),
    batch_size: int = typer.Option(256, min=1, help="Claims searched together (whole consistency groups)."),
    folds: int = typer.Option(2, min=0, help="Context folds for mutual predictability; 0 = exact leave-one-out."),
    exact_every: int | None = typer.Option(None, min=1, help=EXACT_EVERY_HELP),
    check_every: int | None = typer.Option(None, min=1, help=CHECK_EVERY_HELP),
    demo_order: str | None = typer.Option(None, help=DEMO_ORDER_HELP),
    see_group: bool = typer.Option(True, "--see-group/--hide-group",
                                   help="Whether a claim's context holds the other claims of its consistency group."),
    max_context_tokens: int = typer.Option(2048, min=64, help="Token budget of demonstrations plus target."),
    balance: str = typer.Option("center", help="Collapse guard: center (subtract mean log-odds) or none."),
    label_space: str = typer.Option("auto", help="Space before the label word: auto, label (' True'), prompt ('is ')."),
    separator: str = typer.Option(r"\n\n", help="Text after each demonstration's label (Python escapes: \\n)."),
    resume: bool = typer.Option(False, help="Continue an interrupted search from RUN_DIR/checkpoint.json."),
    run_dir: Path | None = typer.Option(None, help="Run directory (run.json, checkpoint) [default: OUTPUT.run]."),
    dtype: str = typer.Option("auto", help="auto (bf16 where fast), bf16, fp16 or fp32."),
    question_field: str = typer.Option("question", help="Column holding the question."),
    choice_field: str = typer.Option("choice", help="Column holding the claim / candidate solution."),
    choice_2_field: str = typer.Option("choice_2", help="Column holding the second response of comparison claims."),
    id_field: str = typer.Option("consistency_id", help="Column grouping claims about one question."),
    key_field: str = typer.Option("consistency_key", help="Column with the asserted answer (else answer)."),
    label_field: str = typer.Option("label", help="Gold column, used only to report accuracy."),
    num_candidates: int = typer.Option(4, min=1, help="Questions-only input: solutions sampled per question."),
    temperature: float = typer.Option(0.8, min=0, help="Questions-only input: sampling temperature."),
    max_new_tokens: int = typer.Option(256, min=1, help="Questions-only input: length limit of a solution."),
    claims: str = typer.Option("candidates", help="What the search labels: candidates (each row), answers (one claim "
                               "per final answer of a question) or pivot (one claim per two-way question)."),
    answers: str | None = typer.Option(None, help="Closed answer set 'a|b' for --claims answers/pivot [default: "
                                       "the extractor `icm generate` used]."),
    push_to_hub: str | None = typer.Option(None, "--push-to-hub", metavar="OWNER/NAME", help="Publish the labels."),
    private: bool = typer.Option(False, help="Create the Hub repository private."),
    revision: str | None = typer.Option(None, help="Hub branch to push to."),
    license: str = typer.Option("unknown", help="License in the dataset card."),
    iterative: bool = typer.Option(False, help="Iterative ICM: label --batches batches in input order, fine-tuning "
                                   "the labeller (LoRA) on the labels found so far before each next batch."),
    batches: int = typer.Option(4, min=1, help="--iterative: number of batches."),
    finetune_steps: int = typer.Option(16, min=0, help="--iterative: LoRA steps per fine-tuning (0: plain "
                                       "batch-by-batch labelling, no fine-tuning)."),
    finetune_lr: float = typer.Option(2e-4, min=0, help="--iterative: learning rate of the fine-tuning."),
) -> None:
    """Label claims True/False with Internal Coherence Maximization (no gold label is read by the search).

    Given questions without a choice column, candidates are sampled first (as `icm generate` does)."""
    import shlex

    from icm.data.answers import closed_answers
    from icm.data.candidates import GenerationConfig
    from icm.data.claims import ClaimFields
    from icm.iterative import IterativeConfig
    from icm.label import label_file, run_dir_for
    from icm.scoring import PromptTemplate, unescape
    from icm.search import ICMConfig

    try:
        iterative_config = IterativeConfig(batches=batches, steps=finetune_steps, learning_rate=finetune_lr) \
            if iterative else None
        config = ICMConfig(alpha=alpha, initial_labels=initial_labels, iterations=iterations,
                           polish_iterations=polish_iterations, batch_size=batch_size,
                           folds=folds, see_group=see_group, max_context_tokens=max_context_tokens,
                           balance=balance, seed=seed, **speed_options(exact_every, check_every, demo_order))
        template = PromptTemplate(space=label_space, separator=unescape(separator, "--separator"))
        generation = GenerationConfig(num_candidates=num_candidates, temperature=temperature,
                                      max_new_tokens=max_new_tokens, seed=seed)
        options = closed_answers(answers) if answers else None
    except ValueError as error:
        fail(str(error))
    fields = ClaimFields(question=question_field, choice=choice_field, choice_2=choice_2_field,
                         consistency_id=id_field, consistency_key=key_field, label=label_field)
    command = shlex.join(["icm", *sys.argv[1:]])
    try:
        run = label_file(input, output, model, config, template=template, fields=fields, run_dir=run_dir,
                         resume=resume, dtype=dtype, generation=generation, claims=claims, answers=options,
                         command=command, iterative=iterative_config,
                         server=server_config(base_url, model, tokenizer, api_key_env, concurrency))
    except KeyboardInterrupt:
        print_error("interrupted: the search state is saved; rerun with --resume to continue")
        raise typer.Exit(130) from None
    gold = run.get("gold_accuracy")
    console.print(summary_table("icm label", {
        "model": run["model"], "claims": f"{run['claims']} ({run['searched']} searched)",
        "labels": f"{run['true_share']:.0%} True", "inconsistencies": run["inconsistencies"],
        "acceptance": f"{run['acceptance_rate']:.0%}", "gold accuracy": f"{gold:.1%}" if gold is not None else None,
        "time": f"{run['seconds']:.0f} s", "labels file": output, "run directory": run_dir_for(output, run_dir)}))
    result(f"labelled {run['claims']} claims ({run['searched']} searched), True share {run['true_share']:.0%}, "
           f"inconsistencies {run['inconsistencies']}, acceptance {run['acceptance_rate']:.0%}"
           + (f", gold accuracy {gold:.1%}" if gold is not None else "") + f" -> {output}")
    if push_to_hub:
        _push_or_exit({"train": output}, push_to_hub, private=private, revision=revision, license=license,
                      source=output)

# ---- icm pairs / icm push (issue 4) -----------------------------------------------------------------

PUSH_HELP = "Dataset repository OWNER/NAME on the Hugging Face Hub (token: HF_TOKEN or `hf auth login`)."


def _push_or_exit(files: dict[str, Path], repo: str, *, private: bool, revision: str | None, license: str,
                  source: Path) -> None:
    """Upload ``files`` with a generated card; on failure keep the local files and say which command to rerun."""
    import shlex

    from icm.data.card import dataset_card
    from icm.data.hub import check_repo_id, push_to_hub, scrub

    try:
        check_repo_id(repo)
    except ValueError as error:
        fail(str(error))
    card = dataset_card(files, repo_id=repo, license=license)
    rerun = shlex.join(["icm", "push", str(source), repo] + (["--private"] if private else [])
                       + (["--revision", revision] if revision else []) + ["--license", license])
    try:
        url = push_to_hub(files, repo, card=card, private=private, revision=revision)
    except Exception as error:  # network, auth, permissions: the local files stay, the user reruns the push
        reason = scrub(f"{type(error).__name__}: {error}".splitlines()[0])
        fail(f"upload to {repo} failed ({reason}); local files kept; rerun: {rerun}", code=1)
    result(f"pushed {', '.join(files)} to {url}")


@app.command(recipe=output_sibling("output"))
@cli_errors
def pairs(
    labels: Path = typer.Argument(..., help="Labels file from `icm label` (Parquet; JSONL/CSV with the same columns)."),
    output: Path = typer.Option(..., "--output", "-o", help="Pairs Parquet file (the train split with --test-size; "
                                "the test split goes to NAME.test.parquet, the report to NAME.report.json)."),
    strategy: str = typer.Option("all", help="all: every True x False pair of a question; best-margin: most "
                                 "confident True vs most confident False (by icm_score)."),
    max_per_question: int | None = typer.Option(None, min=1, help="Keep at most N pairs per question, highest "
                                                   "margin first (best-margin: default 1)."),
    min_margin: float | None = typer.Option(None, help="Drop pairs whose margin (chosen icm_score - rejected "
                                               "icm_score) is below this."),
    fmt: str = typer.Option("standard", "--format", help="standard (strings) or conversational (TRL messages)."),
    test_size: float | None = typer.Option(None, help="Questions for a test split: fraction (0-1) or count."),
    seed: int = typer.Option(0, help="Seed of the train/test split."),
    push_to_hub: str | None = typer.Option(None, "--push-to-hub", metavar="OWNER/NAME", help=PUSH_HELP),
    private: bool = typer.Option(False, help="Create the Hub repository private."),
    revision: str | None = typer.Option(None, help="Hub branch to push to (created if needed)."),
    license: str = typer.Option("unknown", help="License in the dataset card (Hub license id)."),
) -> None:
    """Turn ICM labels into DPO preference pairs (TRL format, zstd Parquet) with a pair quality report."""
    import shlex

    from icm.data.hub import check_repo_id
    from icm.data.pairs import PairsConfig, build_pairs, load_labels, report_table, split_paths, write_pairs

    try:
        config = PairsConfig(strategy=strategy, max_per_question=max_per_question, min_margin=min_margin,
                             format=fmt, test_size=test_size, seed=seed)
        if push_to_hub:
            check_repo_id(push_to_hub)
    except ValueError as error:
        fail(str(error))
    rows, metadata = load_labels(labels)
    kept, report = build_pairs(rows, config)
    if not kept:
        console.print(report_table(report))
        raise InputError(labels, "no pairs: " + ", ".join(f"{k}: {v}" for k, v in
                                                          (report["questions_skipped"] | report["dropped"]).items()))
    args = {"--strategy": strategy, "--max-per-question": max_per_question, "--min-margin": min_margin,
            "--format": fmt, "--test-size": test_size, "--seed": seed}
    command = shlex.join(["icm", "pairs", str(labels), "--output", str(output)]
                         + [str(x) for k, v in args.items() if v is not None for x in (k, v)])
    try:
        files = write_pairs(output, kept, report, config, labels_metadata=metadata, command=command, source=labels)
    except InputError:
        raise
    except ValueError as error:  # a test split that leaves one side empty
        fail(f"{labels}: {error}")
    console.print(report_table(report))
    result(f"wrote {report['pairs']} pairs: {', '.join(map(str, files.values()))}, "
           f"report {split_paths(output)['report']}")
    if push_to_hub:
        _push_or_exit(files, push_to_hub, private=private, revision=revision, license=license, source=output)


@app.command()
@cli_errors
def push(
    path: Path = typer.Argument(..., help="Labels or pairs Parquet file written by icm (a pairs file brings its "
                                "test split)."),
    repo: str = typer.Argument(..., metavar="OWNER/NAME", help=PUSH_HELP),
    private: bool = typer.Option(False, help="Create the Hub repository private."),
    revision: str | None = typer.Option(None, help="Hub branch to push to (created if needed)."),
    license: str = typer.Option("unknown", help="License in the dataset card (Hub license id)."),
) -> None:
    """Publish an existing labels or pairs file as a Hub dataset (data/train-00000-of-00001.parquet + README.md)."""
    from icm.data.hub import split_files

    _push_or_exit(split_files(path), repo, private=private, revision=revision, license=license, source=path)

# ---- icm dpo / icm eval / icm transfer (issue 5) -----------------------------------------------------


@app.command(recipe=in_directory("output_dir"))
@cli_errors
def dpo(
    pairs: str = typer.Argument(..., help="Pairs from `icm pairs` (Parquet/JSONL/JSON/CSV) or a Hub dataset id."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Policy to train. " + MODEL_HELP),
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="Where the model/adapters, tokenizer, model "
                                    "card and checkpoints go."),
    lora: bool = typer.Option(True, "--lora/--no-lora", help="LoRA adapters (reference = adapters disabled) or "
                              "full fine-tuning (reference = frozen copy)."),
    lora_r: int = typer.Option(16, help="LoRA rank."),
    lora_alpha: int = typer.Option(32, help="LoRA alpha."),
    lora_target_modules: str = typer.Option("all-linear", help="Comma-separated module names, or all-linear."),
    merge_lora: bool = typer.Option(False, help="Save the merged model instead of the adapters."),
    beta: float = typer.Option(0.1, help="DPO beta (KL strength towards the reference)."),
    learning_rate: float | None = typer.Option(None, help="Peak learning rate [default: 5e-5 LoRA, 5e-6 full]."),
    epochs: float = typer.Option(1.0, help="Epochs over the pairs (ignored with --max-steps)."),
    max_steps: int = typer.Option(-1, help="Optimizer steps (-1: use --epochs)."),
    batch_size: int = typer.Option(4, min=1, help="Pairs per device per step."),
    gradient_accumulation_steps: int = typer.Option(1, min=1, help="Batches per optimizer step."),
    max_length: int = typer.Option(512, min=8, help="Max tokens of prompt + answer."),
    loss_type: str = typer.Option("sigmoid", help=LOSS_TYPE_HELP),
    loss_weights: str | None = typer.Option(None, help=LOSS_WEIGHTS_HELP),
    label_smoothing: float = typer.Option(0.0, help=LABEL_SMOOTHING_HELP),
    precision: str = typer.Option("auto", help="auto (bf16 where supported), bf16, fp16 or fp32."),
    gradient_checkpointing: bool = typer.Option(False, help="Trade compute for memory."),
    save_steps: int = typer.Option(50, min=0, help="Checkpoint every N steps (for --resume; 0: none)."),
    eval_pairs: str | None = typer.Option(None, help="Pairs scored with the DPO loss before and after training."),
    split: str = typer.Option("train", help="Split, when PAIRS is a Hub dataset."),
    seed: int = typer.Option(0, help="Random seed."),
    resume: bool = typer.Option(False, help="Continue from the newest checkpoint in --output-dir."),
    overwrite: bool = typer.Option(False, help="Replace a trained model already in --output-dir."),
    push_to_hub: str | None = typer.Option(None, "--push-to-hub", metavar="OWNER/NAME", help="Upload the result "
                                           "to this Hub model repository."),
    private: bool = typer.Option(False, help="Create the Hub repository private."),
) -> None:
    """Train a model with DPO on preference pairs (TRL), LoRA or full; works under `accelerate launch`."""
    import shlex

    from icm.dpo.training import DPOTrainingConfig, PushError, train_dpo

    try:
        config = DPOTrainingConfig(beta=beta, learning_rate=learning_rate, num_train_epochs=epochs,
                                   max_steps=max_steps, batch_size=batch_size,
                                   gradient_accumulation_steps=gradient_accumulation_steps, max_length=max_length,
                                   lora=lora, lora_r=lora_r, lora_alpha=lora_alpha,
                                   lora_target_modules=lora_target_modules, merge_lora=merge_lora,
                                   loss_type=loss_type, loss_weights=loss_weights_option(loss_weights),
                                   label_smoothing=label_smoothing, precision=precision,
                                   gradient_checkpointing=gradient_checkpointing, save_steps=save_steps,
                                   split=split, seed=seed)
        if push_to_hub:
            from icm.data.hub import check_repo_id

            check_repo_id(push_to_hub)
    except ValueError as error:
        fail(str(error))
    try:
        summary = train_dpo(pairs, model, output_dir, config, eval_pairs=eval_pairs, resume=resume,
                            overwrite=overwrite, push_to_hub=push_to_hub, private=private,
                            command=shlex.join(["icm", *sys.argv[1:]]))
    except PushError as error:
        fail(str(error), code=1)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under `accelerate launch`, one summary line
        return
    metrics = summary["metrics"]
    console.print(summary_table("icm dpo", {
        "policy": model, "pairs": summary["num_pairs"], "steps": summary["global_step"],
        "loss": f"{metrics.get('loss', float('nan')):.4f}",
        "reward accuracy": f"{metrics.get('rewards/accuracies', float('nan')):.2f}",
        "seconds per step": f"{summary['seconds_per_step']:.2f}" if summary.get("seconds_per_step") else None,
        "saved to": output_dir}))
    result(f"trained {summary['global_step']} steps on {summary['num_pairs']} pairs: loss "
           f"{metrics.get('loss', float('nan')):.4f}, reward accuracy "
           f"{metrics.get('rewards/accuracies', float('nan')):.2f}; saved to {output_dir}")


@app.command("eval", recipe=output_sibling("output"))
@cli_errors
def eval_(
    input: str | None = typer.Argument(None, help="Questions with reference answers (JSONL/JSON/CSV/Parquet), or "
                                       "claims with gold `label` (accuracy of the model's True/False labels)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=MODEL_HELP + " Or a directory from `icm dpo`."),
    task: str | None = typer.Option(None, help="Built-in task instead of INPUT (arithmetic, sentiment)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the JSON report here (atomic)."),
    items: Path | None = typer.Option(None, help="Write per-item results (completion, answer, correct) as JSONL."),
    limit: int | None = typer.Option(None, min=1, help="Evaluate only the first N items."),
    max_new_tokens: int | None = typer.Option(None, min=1, help="Tokens generated per answer [default: the "
                                              "task's, else 256]."),
    batch_size: int = typer.Option(8, min=1, help="Questions (or claims) per batch."),
    instruction: str | None = typer.Option(None, help="Instruction before each question [default: the task's, "
                                           "else step by step ending 'The answer is N']."),
    extractor: str | None = typer.Option(None, help="Answer extractor (auto, gsm8k, boxed, answer_is, last_number, "
                                         "...) or allowed answers 'a|b' [default: the task's, else auto]."),
    num_shots: int = typer.Option(4, min=0, help="Claims: gold-labelled demonstrations before each claim."),
    chat_template: bool = typer.Option(True, "--chat-template/--no-chat-template", help="Use the chat template."),
    question_field: str = typer.Option("question", help="Question column."),
    answer_field: str = typer.Option("answer", help="Reference answer column."),
    id_field: str | None = typer.Option(None, help="Id column (default: row number)."),
    dtype: str = typer.Option("auto", help="auto, bf16, fp16 or fp32."),
    seed: int = typer.Option(0, help="Seed (claims: demonstrations drawn)."),
) -> None:
    """Accuracy of a model on held-out questions (greedy, `icm generate`'s extractors) or on labelled claims."""
    import json

    from icm.dpo.evaluation import EvalConfig, evaluate

    if (input is None) == (task is None):
        fail("give exactly one of INPUT or --task")
    instruction, extractor, max_new_tokens = task_settings(task, instruction, extractor, max_new_tokens)
    try:
        config = EvalConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, extractor=extractor,
                            instruction=instruction,
                            num_shots=num_shots, use_chat_template=chat_template, seed=seed, limit=limit)
    except ValueError as error:
        fail(str(error))
    report = evaluate(model, input, task=task, config=config, output=output, items_output=items,
                      question_field=question_field, answer_field=answer_field, id_field=id_field, dtype=dtype)
    if not console.quiet:
        print(json.dumps({k: v for k, v in report.items() if k not in ("results", "config")}, indent=2))
    result(f"accuracy {report['accuracy']:.3f} ({report['correct']}/{report['n']} {report['kind']})"
           + (f"; report: {output}" if output else ""))


@app.command(recipe=RecipeSpec(path=lambda p: Path(p["output_dir"]) / RECIPE_FILE, sections=TRANSFER_SECTIONS))
@cli_errors
def transfer(
    questions: str | None = typer.Argument(None, help="Questions with reference answers (JSONL/JSON/CSV/Parquet)."),
    labeller: str = typer.Option(..., "--labeller", help="Model that labels the candidates with ICM (the strong "
                                 "one). " + MODEL_HELP),
    policy: str = typer.Option(..., "--policy", help="Model trained with DPO (the weak one; the same as "
                               "--labeller for plain self-improvement)."),
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="Run directory; a rerun skips finished stages."),
    task: str | None = typer.Option(None, help="Built-in task instead of QUESTIONS (arithmetic, sentiment)."),
    dataset: str | None = typer.Option(None, help="Hub dataset instead of QUESTIONS (e.g. gsm8k; needs network)."),
    dataset_config: str | None = typer.Option(None, help="Hub dataset configuration (e.g. main)."),
    split: str = typer.Option("train", help="Hub dataset split."),
    limit: int | None = typer.Option(None, min=2, help="Use N questions (the built-in task defaults to 100)."),
    eval_size: float = typer.Option(0.25, help="Held-out questions: fraction (0-1) or count."),
    train_size: int | None = typer.Option(None, min=1, help="Train on at most N of the other questions (the "
                                          "held-out ones stay the same) [default: all]."),
    generator: str = typer.Option("policy", help="Who samples the candidates: policy or labeller."),
    num_candidates: int = typer.Option(4, min=1, help="Candidates sampled per training question (1 is enough "
                                        "with --enumerate-answers: the sample and its swapped answer)."),
    temperature: float = typer.Option(0.8, help="Sampling temperature of the candidates."),
    max_new_tokens: int | None = typer.Option(None, min=1, help="Tokens per candidate and per evaluation answer "
                                              "[default: the task's, else 256]."),
    instruction: str | None = typer.Option(None, help="Instruction before each question [default: the task's, "
                                           "else step by step ending 'The answer is N']."),
    extractor: str | None = typer.Option(None, help="Answer extractor, or allowed answers 'a|b' for a closed "
                                         "answer set [default: the task's, else auto]."),
    enumerate_answers: bool = typer.Option(False, help="Closed answer sets: add every allowed answer no sample "
                                           "gave as a candidate (a sample with its answer swapped)."),
    claims: str = typer.Option("candidates", help="What ICM labels: candidates (each solution), answers (one "
                               "claim per answer of a question) or pivot (one claim per two-way question)."),
    icm_iterations: int | None = typer.Option(None, min=1, help="ICM search steps per batch [default: 4 x claims]."),
    polish_iterations: int | None = typer.Option(None, min=0, help="ICM greedy steps after annealing [default: "
                                                 "batch claims / 4]."),
    icm_batch_size: int = typer.Option(256, min=1, help="Claims ICM searches together; the claims a search does not "
                                       "reach are labelled by their prediction given the searched ones."),
    alpha: float = typer.Option(50.0, help="ICM weight of mutual predictability."),
    exact_every: int | None = typer.Option(None, min=1, help="ICM: " + EXACT_EVERY_HELP),
    check_every: int | None = typer.Option(None, min=1, help="ICM: " + CHECK_EVERY_HELP),
    demo_order: str | None = typer.Option(None, help="ICM: " + DEMO_ORDER_HELP),
    pairs_strategy: str = typer.Option("all", help="Pairs: all or best-margin."),
    max_per_question: int | None = typer.Option(None, min=1, help="Pairs kept per question."),
    lora: bool = typer.Option(True, "--lora/--no-lora", help="DPO with LoRA adapters or full fine-tuning."),
    beta: float = typer.Option(0.1, help="DPO beta."),
    learning_rate: float | None = typer.Option(None, help="DPO learning rate [default: 5e-5 LoRA, 5e-6 full]."),
    epochs: float = typer.Option(1.0, help="DPO epochs (ignored with --max-steps)."),
    max_steps: int = typer.Option(-1, help="DPO optimizer steps (-1: use --epochs)."),
    batch_size: int = typer.Option(4, min=1, help="DPO pairs per step."),
    generation_batch_size: int = typer.Option(16, min=1, help="Sequences generated together (candidates and "
                                              "evaluation answers)."),
    max_length: int = typer.Option(512, min=8, help="DPO max tokens of prompt + answer."),
    loss_type: str = typer.Option("sigmoid", help=LOSS_TYPE_HELP),
    loss_weights: str | None = typer.Option(None, help=LOSS_WEIGHTS_HELP),
    label_smoothing: float = typer.Option(0.0, help=LABEL_SMOOTHING_HELP),
    dpo_seed: int | None = typer.Option(None, help="Seed of DPO training alone (data order, LoRA init), to repeat "
                                        "the training on the same labels [default: --seed]."),
    bootstrap_samples: int = typer.Option(2000, min=100, help="Resamples for the CI of the accuracy change."),
    dtype: str = typer.Option("auto", help="Generation/labelling/eval dtype: auto, bf16, fp16 or fp32."),
    seed: int = typer.Option(0, help="Seed of the split and of every stage."),
    question_field: str = typer.Option("question", help="Question column."),
    answer_field: str = typer.Option("answer", help="Reference answer column."),
    id_field: str | None = typer.Option(None, help="Id column (default: row number)."),
    stop_after: str | None = typer.Option(None, help="End after this stage (eval_before, generate, label, pairs, "
                                          "dpo); rerun the same command to continue."),
    arms: str = typer.Option("icm", help="Labels to train the policy on, one policy each, comma-separated: icm, "
                             "gold (ceiling), random (control), zero_shot (the labeller without demonstrations)."),
) -> None:
    """Weak-from-strong: generate -> label (labeller, ICM) -> pairs -> DPO (policy) -> eval before/after,
    for each arm of labels (--arms icm,gold,random,zero_shot compares them on the same candidates)."""
    import shlex

    from icm.data.candidates import GenerationConfig
    from icm.data.pairs import PairsConfig
    from icm.data.tasks import load_questions
    from icm.dpo.evaluation import EvalConfig
    from icm.dpo.training import DPOTrainingConfig
    from icm.dpo.transfer import STAGES, TransferConfig, arms_table, run_transfer
    from icm.search import ICMConfig

    if sum(map(bool, (questions, task, dataset))) != 1:
        fail("give exactly one of QUESTIONS, --task or --dataset")
    instruction, extractor, max_new_tokens = task_settings(task, instruction, extractor, max_new_tokens)
    try:
        config = TransferConfig(
            eval_size=eval_size, train_size=train_size, generator=generator, bootstrap_samples=bootstrap_samples,
            seed=seed, dtype=dtype,
            claims=claims,
            generation=GenerationConfig(num_candidates=num_candidates, temperature=temperature,
                                        max_new_tokens=max_new_tokens, batch_size=generation_batch_size, seed=seed,
                                        instruction=instruction, extractor=extractor,
                                        enumerate_answers=enumerate_answers),
            icm=ICMConfig(iterations=icm_iterations, polish_iterations=polish_iterations, batch_size=icm_batch_size,
                          alpha=alpha, seed=seed, **speed_options(exact_every, check_every, demo_order)),
            pairs=PairsConfig(strategy=pairs_strategy, max_per_question=max_per_question, seed=seed),
            dpo=DPOTrainingConfig(lora=lora, beta=beta, learning_rate=learning_rate, num_train_epochs=epochs,
                                  max_steps=max_steps, batch_size=batch_size, max_length=max_length,
                                  loss_type=loss_type, loss_weights=loss_weights_option(loss_weights),
                                  label_smoothing=label_smoothing, seed=seed if dpo_seed is None else dpo_seed),
            eval=EvalConfig(max_new_tokens=max_new_tokens, batch_size=generation_batch_size, seed=seed,
                            instruction=instruction, extractor=extractor),
            arms=tuple(a.strip() for a in arms.split(",") if a.strip()))
    except ValueError as error:
        fail(str(error))
    items = load_questions(questions, task=task, dataset=dataset, config=dataset_config, split=split, limit=limit,
                           seed=seed, question_field=question_field, answer_field=answer_field, id_field=id_field)
    if stop_after is not None and stop_after not in STAGES:
        fail(f"--stop-after must be one of {', '.join(STAGES)}")
    source = questions or (f"task:{task}" if task else f"hub:{dataset}")
    report = run_transfer(items, labeller, policy, output_dir, config, source=source,
                          command=shlex.join(["icm", *sys.argv[1:]]), stop_after=stop_after)
    if "stopped_after" in report:
        result(f"stopped after {stop_after}; continue with: icm transfer --config {output_dir / RECIPE_FILE}")
        return
    console.print(arms_table(report))
    arms_line = ", ".join(f"{arm} {r['accuracy_after']:.3f} ({r['delta']:+.3f} [{r['delta_ci']['low']:+.3f}, "
                          f"{r['delta_ci']['high']:+.3f}])" for arm, r in report["arms"].items())
    result(f"held-out accuracy {report['accuracy_before']:.3f} before; after: {arms_line}; "
           f"{output_dir / 'transfer.json'}, {output_dir / 'transfer.png'}")


@app.command()
@cli_errors
def report(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A label run directory (run.json), a pairs report "
                                   "(NAME.report.json or NAME.parquet from `icm pairs`) or a transfer directory."),
    output: Path | None = typer.Option(None, "--output", "-o", help="HTML file to write [default: RUN_DIR/report.html, "
                                       "or NAME.report.html for pairs]; its PNGs go next to it."),
) -> None:
    """Write a self-contained HTML page (plots inlined) for a label, pairs or transfer run."""
    from icm.dpo.report import write_report

    kind, page, images = write_report(run_dir, output)
    result(f"{kind} report: {page} ({len(images)} plots next to it)")


if __name__ == "__main__":
    app()
