"""The icm command line: generate -> label -> pairs -> dpo -> eval (and transfer, push, report).

Each command parses its options and calls into data/, icm/ or dpo/; no logic lives here. An option that sets a
stage's config takes its default, help text and choices from that config's field (``icm/config.py``), so each
is written once. Bad input is reported on one line (file, row, field) with exit code 2. Every command takes
--config FILE.yaml (data/recipes.py) and -q/-v (data/console.py). Nothing heavy is imported before a command
runs, so help is instant.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Optional  # noqa: F401  (typer needs real Optional at runtime on 3.10)

import click
import typer

from icm.config import (
    SEED_MAX,
    Balance,
    ClaimMode,
    DemoOrder,
    DPOTrainingConfig,
    Dtype,
    EvalConfig,
    GenerationConfig,
    Generator,
    ICMConfig,
    IterativeConfig,
    LabelMethod,
    LabelSpace,
    PairFormat,
    PairsConfig,
    PairStrategy,
    PromptTemplate,
    RoundsFrom,
    ServerConfig,
    SourceConfig,
    Stage,
    TransferConfig,
    VLLMConfig,
    field_help,
)
from icm.data.console import console, result, version
from icm.data.console import error as print_error
from icm.data.console import summary as summary_table
from icm.data.io import InputError, OutputError, ServerError
from icm.data.recipes import RECIPE_FILE, RecipeSpec, RecipeTyper
from icm.models import ALIASES, DEFAULT_MODEL, ModelNotFoundError, check_alias

app = RecipeTyper(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0],
                  rich_markup_mode="markdown", context_settings={"help_option_names": ["-h", "--help"]})

IO, MODEL, SERVER, HUB = "Input and output", "Model", "Inference server", "Hugging Face Hub"
PANELS = {GenerationConfig: "Sampling", PromptTemplate: "ICM search", ICMConfig: "ICM search",
          SourceConfig: "Label-free alternatives",
          IterativeConfig: "Iterative ICM", PairsConfig: "Pairs", DPOTrainingConfig: "DPO training",
          EvalConfig: "Evaluation", TransferConfig: "Run", ServerConfig: SERVER, VLLMConfig: "vLLM engine"}
TRANSFER_DEFAULTS = TransferConfig()
SEED = {"min": 0, "max": SEED_MAX}  # the range of every --seed (icm/config.py checks it too)


def _field(config: type, name: str) -> tuple[type, Any]:
    """The config class that declares ``name`` ("stage.field" for a stage of ``TransferConfig``) and its default
    (a stage's default as ``TransferConfig`` sets it)."""
    if "." in name:
        stage, name = name.split(".")
        instance = getattr(TRANSFER_DEFAULTS, stage)
        return type(instance), getattr(instance, name)
    spec = next(f for f in fields(config) if f.name == name)
    return config, spec.default_factory() if spec.default is MISSING else spec.default


def option(config: type, name: str, *decls: str, as_text: bool = False, **kwargs: Any) -> Any:
    """A ``typer.Option`` for the config field ``name``: its default, help and help panel come from the config
    (``kwargs`` add to them: a range, a metavar, another help); ``as_text``: a tuple default shown comma-joined."""
    owner, default = _field(config, name)
    kwargs.setdefault("help", field_help(owner, name.rsplit(".", 1)[-1]))
    kwargs.setdefault("rich_help_panel", PANELS[owner])
    return typer.Option(",".join(default) if as_text else default, *decls, **kwargs)


def check_model(ctx: click.Context, spec: str | None) -> str | None:
    """A model option's value: a mistyped alias is a usage error before anything loads (with --base-url, processed
    first, the model is the server's name for it, not checked here)."""
    if spec and not ctx.params.get("base_url"):
        try:
            check_alias(spec)
        except ModelNotFoundError as error:
            raise typer.BadParameter(str(error)) from None
    return spec


def model_option(help: str = "", *decls: str) -> Any:
    return typer.Option(DEFAULT_MODEL, *(decls or ("--model", "-m")), rich_help_panel=MODEL, callback=check_model,
                        help=(help + " " if help else "") + MODEL_HELP)


MODEL_HELP = f"Hub id, local HF directory, .gguf file, or alias ({', '.join(ALIASES)})."


def base_url_option() -> Any:
    return typer.Option(None, "--base-url", metavar="URL", help=field_help(ServerConfig, "base_urls"),
                        rich_help_panel=SERVER, is_eager=True)  # before --model: see check_model


def dtype_option(*decls: str, help: str = "Model dtype: auto (bf16 where fast), bf16, fp16 or fp32.") -> Any:
    return typer.Option("auto", *(decls or ("--dtype",)), rich_help_panel=MODEL, help=help)


def check_device(device: str | None) -> None:
    """``--device``: a device torch knows and this machine has (before any model loads)."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError) as error:
        fail(f"--device: {str(error).splitlines()[0]}")
    if kind == "cuda" and not torch.cuda.is_available():
        fail(f"--device {device}: no CUDA device here")


def fail(message: str, code: int = 2) -> None:
    print_error(message)
    raise typer.Exit(code)


def task_settings(task: str | None, instruction: str | None, extractor: str | None,
                  max_new_tokens: int | None) -> tuple[str, str, int]:
    """Instruction, answer extractor and answer length: the command line's, else the built-in task's, else
    ``GenerationConfig``'s (open math questions)."""
    from icm.data.tasks import get_task

    spec = get_task(task) if task else None
    defaults = GenerationConfig()
    return (instruction if instruction is not None else spec.instruction if spec else defaults.instruction,
            extractor or (spec.extractor if spec else defaults.extractor),
            max_new_tokens or (spec.max_new_tokens if spec else defaults.max_new_tokens))


def server_config(base_urls: list[str] | None, model: str, tokenizer: str | None, api_key_env: str,
                  concurrency: int) -> ServerConfig | None:
    """The ``ServerConfig`` of the --base-url options, or None without them (the model runs here)."""
    if not base_urls:
        return None
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
        except (typer.Exit, typer.Abort, click.ClickException):
            raise
        except (InputError, ModelNotFoundError, FileNotFoundError) as problem:
            fail(str(problem).splitlines()[0] if str(problem) else repr(problem))
        except (OutputError, OSError, ServerError) as problem:  # a full disk, a server gone: nothing half-written
            fail(str(problem).splitlines()[0] if str(problem) else repr(problem), code=1)
        except KeyboardInterrupt:
            print_error("interrupted")
            raise typer.Exit(130) from None
        except Exception as problem:  # a bug: one line; the traceback with -v
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                raise
            reason = str(problem).splitlines()[0] if str(problem) else ""
            fail(f"unexpected {type(problem).__name__}{': ' + reason if reason else ''} (a bug; -v shows the "
                 "traceback)", code=1)

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


def recipe_next_to(output: Path) -> Path:
    return Path(f"{Path(output).with_suffix('')}.recipe.yaml")


def output_sibling(key: str) -> RecipeSpec:
    """Recipe written next to the output file ``--KEY``: ``NAME.recipe.yaml`` (nowhere without one)."""
    return RecipeSpec(path=lambda p: recipe_next_to(p[key]) if p.get(key) else None)


def in_directory(key: str) -> RecipeSpec:
    return RecipeSpec(path=lambda p: Path(p[key]) / RECIPE_FILE)


def label_run_dir(params: dict) -> Path:
    from icm.label import run_dir_for

    return run_dir_for(params["output"], params["run_dir"]) / RECIPE_FILE


def loss_weights_option(value: str | None) -> tuple[float, ...] | None:
    """``--loss-weights 1,0.5`` as floats (a one-line error when one is not a number)."""
    if value is None or not value.strip():
        return None
    try:
        return tuple(float(w) for w in value.split(","))
    except ValueError:
        fail(f"--loss-weights: expected comma-separated numbers, got '{value}'")
        return None


# transfer's options per stage in a recipe: {section: {key in the section: option}}
TRANSFER_SECTIONS = {
    "generate": {"generator": "generator", "num_candidates": "num_candidates", "temperature": "temperature",
                 "enumerate_answers": "enumerate_answers", "batch_size": "generation_batch_size"},
    "label": {"claims": "claims", "iterations": "icm_iterations", "polish_iterations": "polish_iterations",
              "batch_size": "icm_batch_size", "alpha": "alpha", "exact_every": "exact_every",
              "check_every": "check_every", "demo_order": "demo_order", "vote_samples": "vote_samples",
              "vote_temperature": "vote_temperature"},
    "pairs": {"strategy": "pairs_strategy", "max_per_question": "max_per_question", "min_margin": "min_margin",
              "margin_quantile": "margin_quantile"},
    "dpo": {"lora": "lora", "beta": "beta", "learning_rate": "learning_rate", "epochs": "epochs",
            "max_steps": "max_steps", "batch_size": "batch_size", "max_length": "max_length",
            "loss_type": "loss_type", "loss_weights": "loss_weights", "label_smoothing": "label_smoothing",
            "auto_label_smoothing": "auto_label_smoothing",
            "seed": "dpo_seed"},
}

QUESTION_FIELD_HELP = "Column holding the question."
ANSWER_FIELD_HELP = "Column holding the reference answer (optional for generate)."
ID_FIELD_HELP = "Column holding a question id [default: the row number]."
INSTRUCTION_HELP = "Instruction before each question [default: the task's, else GenerationConfig's step-by-step one]."
EXTRACTOR_HELP = field_help(GenerationConfig, "extractor") + " [default: the task's, else auto]."
MAX_NEW_TOKENS_HELP = "Most tokens per answer [default: the task's, else 256]."
TASK_HELP = "Built-in offline task instead of an input file: arithmetic, sentiment or capitals."


@app.command(recipe=output_sibling("output"),
             epilog="Example: icm generate --task arithmetic --limit 50 -o runs/candidates.parquet")
@cli_errors
def generate(
    input: Path | None = typer.Argument(None, help="Questions file (JSONL/JSON/CSV/Parquet)."),
    output: Path = typer.Option(..., "--output", "-o", help="Claims Parquet file to write.", rich_help_panel=IO),
    task: str | None = typer.Option(None, help=TASK_HELP, rich_help_panel=IO),
    dataset: str | None = typer.Option(None, help="Hub dataset instead of INPUT, e.g. gsm8k (needs network).",
                                       rich_help_panel=IO),
    dataset_config: str | None = typer.Option(None, help="Hub dataset configuration, e.g. main.", rich_help_panel=IO),
    split: str = typer.Option("train", help="Hub dataset split.", rich_help_panel=IO),
    question_field: str = typer.Option("question", help=QUESTION_FIELD_HELP, rich_help_panel=IO),
    answer_field: str = typer.Option("answer", help=ANSWER_FIELD_HELP, rich_help_panel=IO),
    id_field: str | None = typer.Option(None, help=ID_FIELD_HELP, rich_help_panel=IO),
    limit: int | None = typer.Option(None, min=1, help="Use at most this many questions.", rich_help_panel=IO),
    shuffle: bool = typer.Option(False, help="Pick the --limit questions at random (with --seed).",
                                 rich_help_panel=IO),
    resume: bool = typer.Option(False, help="Reuse questions finished in OUT.partial.jsonl by an interrupted run.",
                                rich_help_panel=IO),
    model: str = model_option(),
    dtype: Dtype = dtype_option(),
    device: str | None = typer.Option(None, help="cpu, cuda, ... [default: a GPU when present].",
                                      rich_help_panel=MODEL),
    base_url: list[str] | None = base_url_option(),
    tokenizer: str | None = option(ServerConfig, "tokenizer"),
    api_key_env: str = option(ServerConfig, "api_key_env"),
    concurrency: int = option(ServerConfig, "concurrency", min=1),
    vllm: bool = typer.Option(False, "--vllm", rich_help_panel=PANELS[VLLMConfig],
                              help="Sample in vLLM's offline engine (GPU, `pip install vllm`); give it large "
                                   "batches, e.g. --batch-size 512."),
    tensor_parallel_size: int = option(VLLMConfig, "tensor_parallel_size", min=1),
    gpu_memory_utilization: float = option(VLLMConfig, "gpu_memory_utilization", min=0.05, max=1.0),
    num_candidates: int = option(GenerationConfig, "num_candidates", min=1),
    temperature: float = option(GenerationConfig, "temperature", min=0.0),
    top_p: float = option(GenerationConfig, "top_p", min=0.0, max=1.0),
    max_new_tokens: int | None = typer.Option(None, min=1, help=MAX_NEW_TOKENS_HELP, rich_help_panel="Sampling"),
    stop: list[str] | None = typer.Option(None, help=field_help(GenerationConfig, "stop") + " Repeatable "
                                          "[default: '\\nQuestion:'].", rich_help_panel="Sampling"),
    instruction: str | None = typer.Option(None, help=INSTRUCTION_HELP, rich_help_panel="Sampling"),
    raw_prompt: bool = typer.Option(False, help="Don't use the model's chat template.", rich_help_panel="Sampling"),
    batch_size: int = option(GenerationConfig, "batch_size", min=1),
    seed: int = option(GenerationConfig, "seed", **SEED, help="Seed for sampling, --shuffle and the built-in task."),
    extractor: str | None = typer.Option(None, help=EXTRACTOR_HELP, rich_help_panel="Sampling"),
    include_reference: bool = option(GenerationConfig, "include_reference"),
    enumerate_answers: bool = option(GenerationConfig, "enumerate_answers"),
) -> None:
    """Sample candidate solutions from a model and write them as claims for `icm label`."""
    from icm.data.candidates import report_path, report_table
    from icm.data.io import check_output, check_outputs, files_of
    from icm.data.tasks import load_questions
    from icm.generate import checkpoint_path, generate_file

    if sum(map(bool, (input, task, dataset))) != 1:
        fail("give exactly one of INPUT, --task or --dataset")
    check_output(output, input)  # a directory (or an empty path) first: it has no siblings
    check_outputs({"the output": output, "its report": report_path(output), "its checkpoint": checkpoint_path(output),
                   "its recipe": recipe_next_to(output)}, [input, *files_of(model)])
    check_device(device)
    instruction, extractor, max_new_tokens = task_settings(task, instruction, extractor, max_new_tokens)
    try:
        gen_config = GenerationConfig(
            num_candidates=num_candidates, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
            stop=tuple(stop) if stop else GenerationConfig().stop, instruction=instruction,
            use_chat_template=not raw_prompt, batch_size=batch_size, seed=seed, extractor=extractor,
            include_reference=include_reference, enumerate_answers=enumerate_answers)
    except ValueError as error:
        fail(str(error))
    questions = load_questions(
        str(input) if input else None, task=task, dataset=dataset, config=dataset_config, split=split,
        question_field=question_field, answer_field=answer_field, id_field=id_field, limit=limit, seed=seed,
        shuffle=shuffle)
    server = server_config(base_url, model, tokenizer, api_key_env, concurrency)
    if vllm:
        from icm.config import VLLM_DTYPES

        if server is not None:
            fail("give --vllm or --base-url, not both")
        server = VLLMConfig(tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                            dtype=VLLM_DTYPES[dtype])
    report = generate_file(questions, output, model, gen_config, dtype=dtype, device=device, resume=resume,
                           command=" ".join(["icm", *sys.argv[1:]]), engine=server)
    console.print(report_table(report))
    result(f"wrote {report['claims']} claims to {output} (report: {report_path(output)})")


@app.command(recipe=RecipeSpec(path=label_run_dir),
             epilog="Example: icm label runs/candidates.parquet -o runs/labels.parquet -m smollm2-135m")
@cli_errors
def label(
    input: Path = typer.Argument(..., help="Claims: JSONL, JSON list, CSV or Parquet (the ICM paper's format)."),
    output: Path = typer.Option(..., "--output", "-o", help="Labels Parquet file to write.", rich_help_panel=IO),
    run_dir: Path | None = typer.Option(None, help="Run directory (run.json, checkpoint) [default: OUTPUT.run].",
                                        rich_help_panel=IO),
    resume: bool = typer.Option(False, help="Continue an interrupted search from RUN_DIR/checkpoint.json.",
                                rich_help_panel=IO),
    overwrite: bool = typer.Option(False, help="Replace labels already at --output (and their run directory).",
                                   rich_help_panel=IO),
    question_field: str = typer.Option("question", help=QUESTION_FIELD_HELP, rich_help_panel=IO),
    choice_field: str = typer.Option("choice", help="Column holding the claim / candidate solution.",
                                     rich_help_panel=IO),
    choice_2_field: str = typer.Option("choice_2", help="Column holding the second response of comparison claims.",
                                       rich_help_panel=IO),
    id_field: str = typer.Option("consistency_id", help="Column grouping claims about one question.",
                                 rich_help_panel=IO),
    key_field: str = typer.Option("consistency_key", help="Column with the asserted answer (else answer).",
                                  rich_help_panel=IO),
    label_field: str = typer.Option("label", help="Gold column, used only to report accuracy.", rich_help_panel=IO),
    model: str = model_option(),
    dtype: Dtype = dtype_option(),
    base_url: list[str] | None = base_url_option(),
    tokenizer: str | None = option(ServerConfig, "tokenizer"),
    api_key_env: str = option(ServerConfig, "api_key_env"),
    concurrency: int = option(ServerConfig, "concurrency", min=1),
    seed: int = option(ICMConfig, "seed", **SEED),
    restarts: int = option(ICMConfig, "restarts", min=1),
    iterations: int | None = option(ICMConfig, "iterations", min=0),
    polish_iterations: int | None = option(ICMConfig, "polish_iterations", min=0),
    alpha: float = option(ICMConfig, "alpha", min=0),
    initial_labels: int = option(ICMConfig, "initial_labels", min=0),
    batch_size: int = option(ICMConfig, "batch_size", min=1),
    folds: int = option(ICMConfig, "folds", min=0),
    exact_every: int = option(ICMConfig, "exact_every", min=1),
    check_every: int = option(ICMConfig, "check_every", min=1),
    demo_order: DemoOrder = option(ICMConfig, "demo_order"),
    see_group: bool = option(ICMConfig, "see_group", "--see-group/--hide-group"),
    max_context_tokens: int = option(ICMConfig, "max_context_tokens", min=64),
    balance: Balance = option(ICMConfig, "balance"),
    label_space: LabelSpace = option(PromptTemplate, "space", "--label-space"),
    separator: str = option(PromptTemplate, "separator", help=field_help(PromptTemplate, "separator")
                            + " Python escapes are read (\\n)."),
    method: LabelMethod = option(SourceConfig, "method"),
    vote_samples: int = option(SourceConfig, "vote_samples", min=1),
    vote_temperature: float | None = option(SourceConfig, "vote_temperature", min=0.0),
    claims: ClaimMode = option(TransferConfig, "claims", rich_help_panel="ICM search"),
    answers: str | None = typer.Option(None, help="Closed answer set 'a|b' for --claims answers/pivot [default: the "
                                       "extractor `icm generate` used].", rich_help_panel="ICM search"),
    num_candidates: int = option(GenerationConfig, "num_candidates", min=1,
                                 help="Questions-only input: solutions sampled per question."),
    temperature: float = option(GenerationConfig, "temperature", min=0, help="Questions-only input: sampling "
                                "temperature."),
    max_new_tokens: int = option(GenerationConfig, "max_new_tokens", min=1, help="Questions-only input: length "
                                 "limit of a solution."),
    iterative: bool = typer.Option(False, help="Iterative ICM: label --batches batches in input order, fine-tuning "
                                   "the labeller (LoRA) on the labels found so far before each next batch.",
                                   rich_help_panel=PANELS[IterativeConfig]),
    batches: int = option(IterativeConfig, "batches", min=1),
    finetune_steps: int = option(IterativeConfig, "steps", "--finetune-steps", min=0),
    finetune_lr: float = option(IterativeConfig, "learning_rate", "--finetune-lr", min=0),
    push_to_hub: str | None = typer.Option(None, "--push-to-hub", metavar="OWNER/NAME", help="Publish the labels.",
                                           rich_help_panel=HUB),
    private: bool = typer.Option(False, help="Create the Hub repository private.", rich_help_panel=HUB),
    revision: str | None = typer.Option(None, help="Hub branch to push to.", rich_help_panel=HUB),
    license: str = typer.Option("unknown", help="License in the dataset card.", rich_help_panel=HUB),
) -> None:
    """Label claims True/False with Internal Coherence Maximization (no gold label is read by the search).

    Given questions without a choice column, candidates are sampled first (as `icm generate` does)."""
    import shlex

    from icm.data.answers import closed_answers
    from icm.data.claims import ClaimFields
    from icm.data.io import check_outputs, files_of
    from icm.label import label_file, run_dir_for
    from icm.quality import quality_line
    from icm.scoring import unescape

    try:
        iterative_config = IterativeConfig(batches=batches, steps=finetune_steps, learning_rate=finetune_lr) \
            if iterative else None
        config = ICMConfig(alpha=alpha, initial_labels=initial_labels, iterations=iterations,
                           polish_iterations=polish_iterations, batch_size=batch_size, folds=folds,
                           see_group=see_group, max_context_tokens=max_context_tokens, balance=balance, seed=seed,
                           exact_every=exact_every, check_every=check_every, demo_order=demo_order,
                           restarts=restarts)
        template = PromptTemplate(space=label_space, separator=unescape(separator, "--separator"))
        generation = GenerationConfig(num_candidates=num_candidates, temperature=temperature,
                                      max_new_tokens=max_new_tokens, seed=seed)
        options = closed_answers(answers) if answers else None
        sources = SourceConfig(method=method, vote_samples=vote_samples, vote_temperature=vote_temperature)
    except ValueError as error:
        fail(str(error))
    fields_ = ClaimFields(question=question_field, choice=choice_field, choice_2=choice_2_field,
                          consistency_id=id_field, consistency_key=key_field, label=label_field)
    command = shlex.join(["icm", *sys.argv[1:]])
    check_outputs({"the output": output}, files_of(model))
    try:
        run = label_file(input, output, model, config, template=template, fields=fields_, run_dir=run_dir,
                         resume=resume, overwrite=overwrite, dtype=dtype, generation=generation, claim_mode=claims,
                         answers=options, command=command, sources=sources,
                         iterative=iterative_config,
                         engine=server_config(base_url, model, tokenizer, api_key_env, concurrency))
    except KeyboardInterrupt:
        print_error("interrupted: the search state is saved; rerun with --resume to continue")
        raise typer.Exit(130) from None
    gold, searched = run.get("gold_accuracy"), method == "icm"
    console.print(summary_table("icm label", {
        "model": run["model"], "method": method, "claims": f"{run['claims']} ({run['searched']} searched)",
        "labels": f"{run['true_share']:.0%} True", "inconsistencies": run["inconsistencies"] if searched else None,
        "acceptance": f"{run['acceptance_rate']:.0%}" if searched else None,
        "gold accuracy": f"{gold:.1%}" if gold is not None else None,
        "label quality": quality_line(run["quality"]) if run.get("quality") else None,
        "quality warnings": "; ".join(run["quality"]["warnings"]) if run.get("quality", {}).get("warnings") else None,
        "time": f"{run['seconds']:.0f} s", "labels file": output, "run directory": run_dir_for(output, run_dir)}))
    search = f", inconsistencies {run['inconsistencies']}, acceptance {run['acceptance_rate']:.0%}" if searched else ""
    result(f"labelled {run['claims']} claims by {method} ({run['searched']} searched), True share "
           f"{run['true_share']:.0%}{search}" + (f", gold accuracy {gold:.1%}" if gold is not None else "")
           + f" -> {output}")
    if push_to_hub:
        _push_or_exit({"train": output}, push_to_hub, private=private, revision=revision, license=license,
                      source=output)


LICENSE_HELP = ("License in the dataset card (Hub license id) [default: the source's: cc-by-4.0 for the built-in "
                "sentiment task, else unknown].")
PUSH_HELP = "Dataset repository OWNER/NAME on the Hugging Face Hub (token: HF_TOKEN or `hf auth login`)."


def _push_or_exit(files: dict[str, Path], repo: str, *, private: bool, revision: str | None, license: str,
                  source: Path, dry_run: bool = False, output_dir: Path | None = None) -> None:
    """Upload ``files`` with a generated card; on failure keep the local files and say which command to rerun.
    ``output_dir``: also write what is uploaded there (README.md, data/SPLIT-00000-of-00001.parquet);
    ``dry_run``: upload nothing (the card is printed when there is no ``output_dir``)."""
    import shlex

    from icm.data.card import dataset_card
    from icm.data.hub import check_repo_id, push_to_hub, scrub, write_hub_folder

    try:
        check_repo_id(repo)
    except ValueError as error:
        fail(str(error))
    card = dataset_card(files, repo_id=repo, license=license)
    if output_dir is not None:
        written = write_hub_folder(files, card, output_dir)
        result(f"wrote {', '.join(written)} to {output_dir} (load it with datasets.load_dataset('{output_dir}'))")
    if dry_run:
        if output_dir is None:
            print(card)
        result(f"dry run: nothing uploaded to {repo} ({', '.join(files)} and README.md would be)")
        return
    rerun = shlex.join(["icm", "push", str(source), repo] + (["--private"] if private else [])
                       + (["--revision", revision] if revision else []) + ["--license", license])
    try:
        url = push_to_hub(files, repo, card=card, private=private, revision=revision)
    except Exception as error:  # network, auth, permissions: the local files stay, the user reruns the push
        reason = scrub(f"{type(error).__name__}: {error}".splitlines()[0])
        fail(f"upload to {repo} failed ({reason}); local files kept; rerun: {rerun}", code=1)
    result(f"pushed {', '.join(files)} to {url}")


@app.command(recipe=output_sibling("output"),
             epilog="Example: icm pairs runs/labels.parquet -o runs/pairs.parquet --eval-size 0.2")
@cli_errors
def pairs(
    labels: Path = typer.Argument(..., help="Labels file from `icm label` (Parquet; JSONL/CSV with the same columns)."),
    output: Path = typer.Option(..., "--output", "-o", rich_help_panel=IO, help="Pairs Parquet file (the train "
                                "split with --eval-size; the test split goes to NAME.test.parquet, the report to "
                                "NAME.report.json, a dataset card naming the splits to README.md beside them unless "
                                "another README.md is there)."),
    strategy: PairStrategy = option(PairsConfig, "strategy"),
    max_per_question: int | None = option(PairsConfig, "max_per_question", min=1),
    min_margin: float | None = option(PairsConfig, "min_margin"),
    margin_quantile: float | None = option(PairsConfig, "margin_quantile", min=0.0, max=1.0),
    min_agreement: float | None = option(PairsConfig, "min_agreement", min=0.0, max=1.0),
    fmt: PairFormat = option(PairsConfig, "format", "--format"),
    test_size: float | None = option(PairsConfig, "test_size", "--eval-size", "--test-size", min=0),
    seed: int = option(PairsConfig, "seed", **SEED),
    push_to_hub: str | None = typer.Option(None, "--push-to-hub", metavar="OWNER/NAME", help=PUSH_HELP,
                                           rich_help_panel=HUB),
    private: bool = typer.Option(False, help="Create the Hub repository private.", rich_help_panel=HUB),
    revision: str | None = typer.Option(None, help="Hub branch to push to (created if needed).", rich_help_panel=HUB),
    license: str = typer.Option("unknown", help=LICENSE_HELP, rich_help_panel=HUB),
) -> None:
    """Turn ICM labels into DPO preference pairs (TRL format, zstd Parquet) with a pair quality report."""
    import shlex

    from icm.data.hub import check_repo_id
    from icm.data.io import check_output, check_outputs
    from icm.data.pairs import build_pairs, load_labels, report_table, split_paths, write_pairs

    check_output(output, labels)  # a directory (or an empty path) first: it has no siblings
    check_outputs({"the output": output, "its test split": split_paths(output)["test"],
                   "its report": split_paths(output)["report"], "its recipe": recipe_next_to(output)}, [labels])
    try:
        config = PairsConfig(strategy=strategy, max_per_question=max_per_question, min_margin=min_margin,
                             margin_quantile=margin_quantile, min_agreement=min_agreement, format=fmt,
                             test_size=test_size, seed=seed)
        if push_to_hub:
            check_repo_id(push_to_hub)
    except ValueError as error:
        fail(str(error))
    rows, metadata = load_labels(labels)
    try:
        kept, report = build_pairs(rows, config)
    except ValueError as error:  # --min-agreement on labels without restarts
        raise InputError(labels, str(error), field="icm_agreement") from None
    if not kept:  # the reasons on the one line of the error (the report table would be more lines)
        raise InputError(labels, "no pairs: " + ", ".join(f"{k}: {v}" for k, v in (
            report.get("questions_skipped", {}) | report["dropped"]).items()))
    args = {"--strategy": strategy, "--max-per-question": max_per_question, "--min-margin": min_margin,
            "--margin-quantile": margin_quantile, "--min-agreement": min_agreement,
            "--format": fmt, "--eval-size": test_size, "--seed": seed}
    command = shlex.join(["icm", "pairs", str(labels), "--output", str(output)]
                         + [str(x) for k, v in args.items() if v is not None for x in (k, v)])
    try:
        files = write_pairs(output, kept, report, config, labels_metadata=metadata, command=command, source=labels)
    except InputError:
        raise
    except ValueError as error:  # a test split that leaves one side empty
        fail(f"{labels}: {error}")
    from icm.data.card import write_folder_card

    card = write_folder_card(files, license=license)
    console.print(report_table(report))
    kept_what = f"{report['examples']} examples" if fmt == "kto" else f"{report['pairs']} pairs"
    result(f"wrote {kept_what}: {', '.join(map(str, files.values()))}, "
           f"report {split_paths(output)['report']}" + (f", card {card}" if card else ""))
    if push_to_hub:
        _push_or_exit(files, push_to_hub, private=private, revision=revision, license=license, source=output)


@app.command(epilog="Example: icm push runs/pairs.parquet me/my-pairs --dry-run --output-dir runs/hub")
@cli_errors
def push(
    path: Path = typer.Argument(..., help="Labels or pairs Parquet file written by icm (a pairs file brings its "
                                "test split)."),
    repo: str = typer.Argument(..., metavar="OWNER/NAME", help=PUSH_HELP),
    private: bool = typer.Option(False, help="Create the Hub repository private.", rich_help_panel=HUB),
    revision: str | None = typer.Option(None, help="Hub branch to push to (created if needed).", rich_help_panel=HUB),
    license: str = typer.Option("unknown", help=LICENSE_HELP, rich_help_panel=HUB),
    dry_run: bool = typer.Option(False, "--dry-run", help="Upload nothing: print the card, or write everything to "
                                 "--output-dir.", rich_help_panel=HUB),
    output_dir: Path | None = typer.Option(None, "--output-dir", "-o", help="Also write exactly what is uploaded "
                                           "here (README.md and data/SPLIT-00000-of-00001.parquet): a folder that "
                                           "datasets.load_dataset reads.", rich_help_panel=IO),
) -> None:
    """Publish an existing labels or pairs file as a Hub dataset (data/train-00000-of-00001.parquet + README.md)."""
    from icm.data.hub import split_files

    _push_or_exit(split_files(path), repo, private=private, revision=revision, license=license, source=path,
                  dry_run=dry_run, output_dir=output_dir)


@app.command(recipe=in_directory("output_dir"),
             epilog="Example: icm dpo runs/pairs.parquet -m smollm2-135m -o runs/policy --max-steps 20")
@cli_errors
def dpo(
    pairs: str = typer.Argument(..., help="Pairs from `icm pairs` (Parquet/JSONL/JSON/CSV) or a Hub dataset id."),
    output_dir: Path = typer.Option(..., "--output-dir", "-o", rich_help_panel=IO, help="Where the model or "
                                    "adapters, tokenizer, model card and checkpoints go."),
    eval_pairs: str | None = typer.Option(None, help="Pairs scored with the DPO loss before and after training.",
                                          rich_help_panel=IO),
    split: str = option(DPOTrainingConfig, "split", rich_help_panel=IO),
    resume: bool = typer.Option(False, help="Continue from the newest checkpoint in --output-dir.",
                                rich_help_panel=IO),
    overwrite: bool = typer.Option(False, help="Replace a trained model already in --output-dir.",
                                   rich_help_panel=IO),
    model: str = model_option("Policy to train."),
    precision: Dtype = option(DPOTrainingConfig, "precision", "--dtype", "--precision", rich_help_panel=MODEL),
    lora: bool = option(DPOTrainingConfig, "lora", "--lora/--no-lora"),
    lora_r: int = option(DPOTrainingConfig, "lora_r", min=1),
    lora_alpha: int = option(DPOTrainingConfig, "lora_alpha", min=1),
    lora_target_modules: str = option(DPOTrainingConfig, "lora_target_modules"),
    merge_lora: bool = option(DPOTrainingConfig, "merge_lora"),
    beta: float = option(DPOTrainingConfig, "beta", min=0),
    learning_rate: float | None = option(DPOTrainingConfig, "learning_rate", min=0),
    epochs: float = option(DPOTrainingConfig, "num_train_epochs", "--epochs", min=0),
    max_steps: int = option(DPOTrainingConfig, "max_steps", min=-1),
    batch_size: int = option(DPOTrainingConfig, "batch_size", min=1),
    gradient_accumulation_steps: int = option(DPOTrainingConfig, "gradient_accumulation_steps", min=1),
    max_length: int = option(DPOTrainingConfig, "max_length", min=8),
    loss_type: str = option(DPOTrainingConfig, "loss_type"),
    loss_weights: str | None = option(DPOTrainingConfig, "loss_weights", help="Comma-separated weight per "
                                      "--loss-type [default: 1 each]."),
    label_smoothing: float = option(DPOTrainingConfig, "label_smoothing", min=0, max=0.5),
    auto_label_smoothing: bool = option(DPOTrainingConfig, "auto_label_smoothing"),
    desirable_weight: float | None = option(DPOTrainingConfig, "desirable_weight", min=0),
    undesirable_weight: float = option(DPOTrainingConfig, "undesirable_weight", min=0),
    gradient_checkpointing: bool = option(DPOTrainingConfig, "gradient_checkpointing"),
    share_prompt: bool = option(DPOTrainingConfig, "share_prompt"),
    reuse_reference: bool = option(DPOTrainingConfig, "reuse_reference"),
    save_steps: int = option(DPOTrainingConfig, "save_steps", min=0),
    seed: int = option(DPOTrainingConfig, "seed", **SEED),
    push_to_hub: str | None = typer.Option(None, "--push-to-hub", metavar="OWNER/NAME", help="Upload the result "
                                           "to this Hub model repository.", rich_help_panel=HUB),
    private: bool = typer.Option(False, help="Create the Hub repository private.", rich_help_panel=HUB),
) -> None:
    """Train a model with DPO on preference pairs (TRL), LoRA or full; works under `accelerate launch`."""
    import shlex

    from icm.dpo.training import PushError, train_dpo

    try:
        config = DPOTrainingConfig(beta=beta, learning_rate=learning_rate, num_train_epochs=epochs,
                                   max_steps=max_steps, batch_size=batch_size,
                                   gradient_accumulation_steps=gradient_accumulation_steps, max_length=max_length,
                                   lora=lora, lora_r=lora_r, lora_alpha=lora_alpha,
                                   lora_target_modules=lora_target_modules, merge_lora=merge_lora,
                                   loss_type=loss_type, loss_weights=loss_weights_option(loss_weights),
                                   label_smoothing=label_smoothing, auto_label_smoothing=auto_label_smoothing,
                                   desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
                                   precision=precision,
                                   gradient_checkpointing=gradient_checkpointing, share_prompt=share_prompt,
                                   reuse_reference=reuse_reference, save_steps=save_steps, split=split, seed=seed)
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
    result(f"trained {summary['global_step']} steps on {summary['num_pairs']} "
           f"{'examples' if config.unpaired else 'pairs'}: loss "
           f"{metrics.get('loss', float('nan')):.4f}, reward accuracy "
           f"{metrics.get('rewards/accuracies', float('nan')):.2f}; saved to {output_dir}")


@app.command("eval", recipe=output_sibling("output"),
             epilog="Example: icm eval --task sentiment --limit 100 -m runs/policy -o runs/eval.json")
@cli_errors
def eval_(
    input: str | None = typer.Argument(None, help="Questions with reference answers (JSONL/JSON/CSV/Parquet), or "
                                       "claims with gold `label` (accuracy of the model's True/False labels)."),
    task: str | None = typer.Option(None, help=TASK_HELP, rich_help_panel=IO),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the JSON report here (atomic).",
                                       rich_help_panel=IO),
    items: Path | None = typer.Option(None, help="Write per-item results (completion, answer, correct) as JSONL.",
                                      rich_help_panel=IO),
    limit: int | None = option(EvalConfig, "limit", min=1, rich_help_panel=IO),
    question_field: str = typer.Option("question", help=QUESTION_FIELD_HELP, rich_help_panel=IO),
    answer_field: str = typer.Option("answer", help=ANSWER_FIELD_HELP, rich_help_panel=IO),
    id_field: str | None = typer.Option(None, help=ID_FIELD_HELP, rich_help_panel=IO),
    model: str = model_option("Or a directory from `icm dpo`."),
    dtype: Dtype = dtype_option(),
    max_new_tokens: int | None = typer.Option(None, min=1, help=MAX_NEW_TOKENS_HELP,
                                              rich_help_panel=PANELS[EvalConfig]),
    batch_size: int = option(EvalConfig, "batch_size", min=1),
    instruction: str | None = typer.Option(None, help=INSTRUCTION_HELP, rich_help_panel=PANELS[EvalConfig]),
    extractor: str | None = typer.Option(None, help=EXTRACTOR_HELP, rich_help_panel=PANELS[EvalConfig]),
    num_shots: int = option(EvalConfig, "num_shots", min=0),
    chat_template: bool = option(EvalConfig, "use_chat_template", "--chat-template/--no-chat-template"),
    seed: int = option(EvalConfig, "seed", **SEED),
) -> None:
    """Accuracy of a model on held-out questions (greedy, `icm generate`'s extractors) or on labelled claims."""
    import json

    from icm.data.io import check_outputs, files_of
    from icm.dpo.evaluation import evaluate

    if bool(input) == bool(task):
        fail("give exactly one of INPUT or --task")
    instruction, extractor, max_new_tokens = task_settings(task, instruction, extractor, max_new_tokens)
    try:
        config = EvalConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, extractor=extractor,
                            instruction=instruction, num_shots=num_shots, use_chat_template=chat_template, seed=seed,
                            limit=limit)
    except ValueError as error:
        fail(str(error))
    check_outputs({"the output": output, "the per-item file": items}, files_of(model))
    report = evaluate(model, input, task=task, config=config, output=output, items_output=items,
                      question_field=question_field, answer_field=answer_field, id_field=id_field, dtype=dtype)
    if not console.quiet:
        print(json.dumps({k: v for k, v in report.items() if k not in ("results", "config")}, indent=2))
    result(f"accuracy {report['accuracy']:.3f} ({report['correct']}/{report['n']} {report['kind']})"
           + (f"; report: {output}" if output else ""))


@app.command(recipe=RecipeSpec(path=lambda p: Path(p["output_dir"]) / RECIPE_FILE, sections=TRANSFER_SECTIONS),
             epilog="Example: icm transfer --config examples/sentiment-demo.yaml --output-dir runs/demo "
                    "--arms icm,gold,random")
@cli_errors
def transfer(
    questions: str | None = typer.Argument(None, help="Questions with reference answers (JSONL/JSON/CSV/Parquet)."),
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="Run directory; a rerun skips finished stages.",
                                    rich_help_panel=IO),
    task: str | None = typer.Option(None, help=TASK_HELP, rich_help_panel=IO),
    dataset: str | None = typer.Option(None, help="Hub dataset instead of QUESTIONS (e.g. gsm8k; needs network).",
                                       rich_help_panel=IO),
    dataset_config: str | None = typer.Option(None, help="Hub dataset configuration (e.g. main).",
                                              rich_help_panel=IO),
    split: str = typer.Option("train", help="Hub dataset split.", rich_help_panel=IO),
    limit: int | None = typer.Option(None, min=2, help="Use N questions [default: all; a built-in task: 100].",
                                     rich_help_panel=IO),
    question_field: str = typer.Option("question", help=QUESTION_FIELD_HELP, rich_help_panel=IO),
    answer_field: str = typer.Option("answer", help=ANSWER_FIELD_HELP, rich_help_panel=IO),
    id_field: str | None = typer.Option(None, help=ID_FIELD_HELP, rich_help_panel=IO),
    stop_after: Stage | None = typer.Option(None, help="End after this stage; rerun the same command to continue.",
                                            rich_help_panel=IO),
    labeller: str = typer.Option(..., "--labeller", rich_help_panel=MODEL, callback=check_model,
                                 help="Model that labels the candidates (the strong one). " + MODEL_HELP),
    policy: str = typer.Option(..., "--policy", rich_help_panel=MODEL, callback=check_model,
                               help="Model trained with DPO (the weak one; the same as --labeller for plain "
                               "self-improvement)."),
    dtype: Dtype = option(TransferConfig, "dtype", rich_help_panel=MODEL),
    arms: str = option(TransferConfig, "arms", as_text=True),
    rounds: int = option(TransferConfig, "rounds", min=1),
    rounds_from: RoundsFrom = option(TransferConfig, "rounds_from"),
    eval_size: float = option(TransferConfig, "eval_size", min=0),
    train_size: int | None = option(TransferConfig, "train_size", min=1),
    bootstrap_samples: int = option(TransferConfig, "bootstrap_samples", min=100),
    seed: int = option(TransferConfig, "seed", **SEED),
    generator: Generator = option(TransferConfig, "generator", rich_help_panel="Sampling"),
    num_candidates: int = option(TransferConfig, "generation.num_candidates", min=1),
    temperature: float = option(TransferConfig, "generation.temperature", min=0.0),
    max_new_tokens: int | None = typer.Option(None, min=1, rich_help_panel="Sampling", help="Tokens per candidate "
                                              "and per evaluation answer [default: the task's, else 256]."),
    instruction: str | None = typer.Option(None, help=INSTRUCTION_HELP, rich_help_panel="Sampling"),
    extractor: str | None = typer.Option(None, help=EXTRACTOR_HELP, rich_help_panel="Sampling"),
    enumerate_answers: bool = option(TransferConfig, "generation.enumerate_answers"),
    generation_batch_size: int = option(TransferConfig, "generation.batch_size", "--generation-batch-size", min=1,
                                        help="Sequences generated together (candidates and evaluation answers)."),
    claims: ClaimMode = option(TransferConfig, "claims", rich_help_panel="ICM search"),
    icm_iterations: int | None = option(TransferConfig, "icm.iterations", "--icm-iterations", min=1),
    polish_iterations: int | None = option(TransferConfig, "icm.polish_iterations", min=0),
    icm_batch_size: int = option(TransferConfig, "icm.batch_size", "--icm-batch-size", min=1),
    alpha: float = option(TransferConfig, "icm.alpha", min=0),
    exact_every: int = option(TransferConfig, "icm.exact_every", min=1),
    check_every: int = option(TransferConfig, "icm.check_every", min=1),
    demo_order: DemoOrder = option(TransferConfig, "icm.demo_order"),
    vote_samples: int = option(TransferConfig, "sources.vote_samples", min=1),
    vote_temperature: float | None = option(TransferConfig, "sources.vote_temperature", min=0.0),
    pairs_strategy: PairStrategy = option(TransferConfig, "pairs.strategy", "--pairs-strategy"),
    max_per_question: int | None = option(TransferConfig, "pairs.max_per_question", min=1),
    min_margin: float | None = option(TransferConfig, "pairs.min_margin"),
    margin_quantile: float | None = option(TransferConfig, "pairs.margin_quantile", min=0.0, max=1.0),
    lora: bool = option(TransferConfig, "dpo.lora", "--lora/--no-lora"),
    beta: float = option(TransferConfig, "dpo.beta", min=0),
    learning_rate: float | None = option(TransferConfig, "dpo.learning_rate", min=0),
    epochs: float = option(TransferConfig, "dpo.num_train_epochs", "--epochs", min=0),
    max_steps: int = option(TransferConfig, "dpo.max_steps", min=-1),
    batch_size: int = option(TransferConfig, "dpo.batch_size", min=1),
    max_length: int = option(TransferConfig, "dpo.max_length", min=8),
    loss_type: str = option(TransferConfig, "dpo.loss_type"),
    loss_weights: str | None = option(TransferConfig, "dpo.loss_weights", help="Comma-separated weight per "
                                      "--loss-type [default: 1 each]."),
    label_smoothing: float = option(TransferConfig, "dpo.label_smoothing", min=0, max=0.5),
    auto_label_smoothing: bool = option(TransferConfig, "dpo.auto_label_smoothing"),
    dpo_seed: int | None = typer.Option(None, **SEED, rich_help_panel="DPO training", help="Seed of DPO training alone "
                                        "(data order, LoRA init), to repeat the training on the same labels "
                                        "[default: --seed]."),
) -> None:
    """Weak-from-strong: generate -> label (labeller, ICM) -> pairs -> DPO (policy) -> eval before/after,
    for each arm of labels (--arms icm,gold,random,zero_shot compares them on the same candidates)."""
    import shlex

    from icm.data.tasks import load_questions
    from icm.dpo.transfer import arms_table, run_transfer

    if sum(map(bool, (questions, task, dataset))) != 1:
        fail("give exactly one of QUESTIONS, --task or --dataset")
    instruction, extractor, max_new_tokens = task_settings(task, instruction, extractor, max_new_tokens)
    try:
        config = TransferConfig(
            eval_size=eval_size, train_size=train_size, generator=generator, bootstrap_samples=bootstrap_samples,
            seed=seed, dtype=dtype, claims=claims,
            generation=GenerationConfig(num_candidates=num_candidates, temperature=temperature,
                                        max_new_tokens=max_new_tokens, batch_size=generation_batch_size, seed=seed,
                                        instruction=instruction, extractor=extractor,
                                        enumerate_answers=enumerate_answers),
            icm=ICMConfig(iterations=icm_iterations, polish_iterations=polish_iterations, batch_size=icm_batch_size,
                          alpha=alpha, seed=seed, exact_every=exact_every, check_every=check_every,
                          demo_order=demo_order),
            sources=SourceConfig(vote_samples=vote_samples, vote_temperature=vote_temperature),
            pairs=PairsConfig(strategy=pairs_strategy, max_per_question=max_per_question, min_margin=min_margin,
                              margin_quantile=margin_quantile, seed=seed),
            dpo=DPOTrainingConfig(lora=lora, beta=beta, learning_rate=learning_rate, num_train_epochs=epochs,
                                  max_steps=max_steps, batch_size=batch_size, max_length=max_length,
                                  loss_type=loss_type, loss_weights=loss_weights_option(loss_weights),
                                  label_smoothing=label_smoothing, auto_label_smoothing=auto_label_smoothing,
                                  seed=seed if dpo_seed is None else dpo_seed),
            eval=EvalConfig(max_new_tokens=max_new_tokens, batch_size=generation_batch_size, seed=seed,
                            instruction=instruction, extractor=extractor),
            arms=tuple(a.strip() for a in arms.split(",") if a.strip()), rounds=rounds, rounds_from=rounds_from)
    except ValueError as error:
        fail(str(error))
    items = load_questions(questions, task=task, dataset=dataset, config=dataset_config, split=split, limit=limit,
                           seed=seed, question_field=question_field, answer_field=answer_field, id_field=id_field)
    source = questions or (f"task:{task}" if task else f"hub:{dataset}")
    report = run_transfer(items, labeller, policy, output_dir, config, source=source,
                          command=shlex.join(["icm", *sys.argv[1:]]), stop_after=stop_after)
    if "stopped_after" in report:
        result(f"stopped after {stop_after}; continue with: icm transfer --config {output_dir / RECIPE_FILE}")
        return
    console.print(arms_table(report))
    arms_line = ", ".join(f"{arm} {r['accuracy_after']:.3f} ({r['delta']:+.3f} [{r['delta_ci']['low']:+.3f}, "
                          f"{r['delta_ci']['high']:+.3f}])" for arm, r in report["arms"].items())
    if len(report.get("rounds") or []) > 1:
        arms_line += "; icm by round: " + ", ".join(f"{r['round']}: {r['accuracy_after']:.3f}"
                                                    for r in report["rounds"])
    result(f"held-out accuracy {report['accuracy_before']:.3f} before; after: {arms_line}; "
           f"{output_dir / 'transfer.json'}, {output_dir / 'transfer.png'}")


@app.command(epilog="Example: icm report runs/labels.run")
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
