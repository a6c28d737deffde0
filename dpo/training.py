"""DPO training on preference pairs with TRL's ``DPOTrainer``, with LoRA (peft) or full fine-tuning; with
``loss_type`` kto, TRL's ``KTOTrainer`` on unpaired examples (``prompt``/``completion``/``label``, from
``icm pairs --format kto``) or on pairs, each split into its chosen (desirable) and rejected (undesirable) answer.

The model spec is resolved to a local directory first (``icm.models.resolve_model``), so GGUF files and
aliases train like any ``from_pretrained`` directory, and TRL reloads the reference model for full
fine-tuning from that directory. With LoRA there is no second model: the reference is the base model
with its adapters disabled; its log-probs of the pairs are computed once before training and cached for later
runs in the process (``dpo/reference.py``). Each pair's prompt goes through the model once for both answers
(``dpo/shared_prompt.py``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from icm.config import DPOTrainingConfig
from icm.data.console import console
from icm.data.io import (
    InputError,
    check_output,
    check_outputs,
    files_of,
    read_json,
    read_records,
    require_fields,
    write_json,
)
from icm.models import (
    ALIASES,
    ModelNotFoundError,
    alias_of,
    check_weights,
    default_device,
    default_dtype,
    hub_id,
    load_model,
    load_tokenizer,
    pickle_allowed,
    resolve_model,
)
from icm.sampling import build_prompt

log = logging.getLogger(__name__)

PAIR_FIELDS = ("prompt", "chosen", "rejected")
UNPAIRED_FIELDS = ("prompt", "completion", "label")
SUMMARY_FILE = "icm_dpo.json"  # written next to the model: base model spec, config, metrics
WRITTEN = (SUMMARY_FILE, "README.md", "adapter_config.json", "adapter_model.safetensors", "config.json",
           "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "chat_template.jinja", "training_args.bin", "recipe.yaml")
"""Files ``train_dpo`` (the Trainer, the card, the recipe) writes in the output directory: never an input."""
TRL_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
"""The fields of TRL's fused LM head output that ``DPOTrainer`` reads (its metrics)."""
KEY_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen",
               "logps/rejected", "kl", "grad_norm", "learning_rate")


def mixed_precision(precision: str = "auto", device: torch.device | str | None = None) -> str:
    """The autocast dtype actually used: ``bf16``, ``fp16`` or ``fp32``."""
    if precision != "auto":
        return precision
    dtype = default_dtype(device if device is not None else default_device())
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


# ---- pairs -------------------------------------------------------------------------------------------------------


def _check_message_list(path: str, row: int, name: str, value: Any) -> None:
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        raise InputError(path, "expected a string or a list of {role, content} messages", row=row, field=name)


def _read_source(source: str | Path | list[dict], split: str) -> tuple[list[dict], str]:
    if isinstance(source, list):
        return source, "<in-memory>"
    path = Path(source).expanduser()
    name = str(source)
    if path.exists() or path.suffix.lower() in (".parquet", ".jsonl", ".json", ".csv") or "/" not in name:
        return read_records(path), name
    return _load_hub_pairs(name, split), name


def load_pairs(source: str | Path | list[dict], split: str = "train") -> tuple[list[dict], str]:
    """Read preference pairs (``prompt``, ``chosen``, ``rejected``) from a local table or a Hub dataset id.

    Returns the rows (only the three pair columns) and a display name for the dataset.
    """
    return _pairs_of(*_read_source(source, split))


def _pairs_of(records: list[dict], name: str) -> tuple[list[dict], str]:
    require_fields(name, records, list(PAIR_FIELDS))
    pairs = []
    for i, record in enumerate(records, start=1):
        row = {}
        for key in PAIR_FIELDS:
            value = record[key]
            if not isinstance(value, str):
                _check_message_list(name, i, key, value)
            row[key] = value
        if row["chosen"] == row["rejected"]:
            raise InputError(name, "chosen and rejected are identical", row=i, field="rejected")
        pairs.append(row)
    kinds = {isinstance(p["prompt"], str) for p in pairs} | {isinstance(p["chosen"], str) for p in pairs}
    if len(kinds) > 1:
        raise InputError(name, "mixes string and message-list pairs; use one format", field="prompt")
    return pairs, name


def load_unpaired(source: str | Path | list[dict], split: str = "train") -> tuple[list[dict], str]:
    """Read KTO's training examples: unpaired ones (``prompt``, ``completion``, ``label`` a boolean; ``icm pairs
    --format kto``) as they are, or preference pairs (:func:`load_pairs`) split into their chosen answer (label
    True) and their rejected one (False). Returns the rows (the three unpaired columns) and the dataset's name."""
    records, name = _read_source(source, split)
    if not records or "completion" not in records[0]:
        pairs, name = _pairs_of(records, name)
        return [{"prompt": p["prompt"], "completion": p[key], "label": key == "chosen"}
                for p in pairs for key in ("chosen", "rejected")], name
    require_fields(name, records, list(UNPAIRED_FIELDS))
    rows = []
    for i, record in enumerate(records, start=1):
        for key in ("prompt", "completion"):
            if not isinstance(record[key], str):
                _check_message_list(name, i, key, record[key])
        if not isinstance(record["label"], bool):
            raise InputError(name, f"expected a boolean, got {record['label']!r}", row=i, field="label")
        rows.append({key: record[key] for key in UNPAIRED_FIELDS})
    if len({isinstance(r["prompt"], str) for r in rows} | {isinstance(r["completion"], str) for r in rows}) > 1:
        raise InputError(name, "mixes string and message-list examples; use one format", field="prompt")
    if len({r["label"] for r in rows}) < 2:
        raise InputError(name, f"every example's label is {rows[0]['label']}: KTO needs desirable (True) and "
                         "undesirable (False) ones", field="label")
    return rows, name


def load_examples(source: str | Path | list[dict], config: DPOTrainingConfig) -> tuple[list[dict], str]:
    """The training rows of ``config``'s loss: pairs (:func:`load_pairs`), or for kto :func:`load_unpaired`."""
    return (load_unpaired if config.unpaired else load_pairs)(source, split=config.split)


def _load_hub_pairs(repo_id: str, split: str) -> list[dict]:
    from datasets import load_dataset

    try:
        dataset = load_dataset(repo_id, split=split)
    except Exception as error:  # offline, missing repo, missing split: all one user-facing message
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(repo_id, f"not a local file and not loadable from the Hub ({message})") from None
    return dataset.to_list()


def uses_chat_template(pairs: list[dict], config: DPOTrainingConfig, tokenizer) -> bool:
    """Whether training sees chat-formatted pairs (message lists, or strings wrapped by ``format_pairs``)."""
    if not isinstance(pairs[0]["prompt"], str):
        return True
    return config.chat_template if config.chat_template is not None else bool(tokenizer.chat_template)


def format_pairs(pairs: list[dict], tokenizer, chat: bool) -> list[dict]:
    """String pairs as ``icm generate`` prompted the model: one user turn and one assistant turn (TRL applies
    the chat template), or without a template the raw prompt + ``\\nAnswer:`` and a space before the answer."""
    if not isinstance(pairs[0]["prompt"], str):
        return pairs
    # icm pairs ends string prompts with a newline for plain concatenation; the generator saw the message without it.
    if "completion" in pairs[0]:  # KTO's unpaired examples
        if chat:
            return [{"prompt": [{"role": "user", "content": p["prompt"].rstrip()}],
                     "completion": [{"role": "assistant", "content": p["completion"]}], "label": p["label"]}
                    for p in pairs]
        return [{"prompt": build_prompt(tokenizer, p["prompt"].rstrip(), use_chat_template=False),
                 "completion": " " + p["completion"].lstrip(), "label": p["label"]} for p in pairs]
    if chat:
        return [{"prompt": [{"role": "user", "content": p["prompt"].rstrip()}],
                 "chosen": [{"role": "assistant", "content": p["chosen"]}],
                 "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]
    return [{"prompt": build_prompt(tokenizer, p["prompt"].rstrip(), use_chat_template=False),
             "chosen": " " + p["chosen"].lstrip(), "rejected": " " + p["rejected"].lstrip()} for p in pairs]


# ---- training ----------------------------------------------------------------------------------------------------


class RichProgress(TrainerCallback):
    """A rich progress bar on stderr with the latest loss and reward accuracy (main process only)."""

    def __init__(self, description: str = "dpo"):
        self.description = description
        self.progress = None
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                                 console=console, transient=False)
        self.progress.start()
        self.task = self.progress.add_task(self.description, total=state.max_steps, completed=state.global_step,
                                           status="")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is None or not logs or "loss" not in logs:
            return
        status = f"loss {logs['loss']:.4f}"
        if "rewards/accuracies" in logs:
            status += f"  reward acc {logs['rewards/accuracies']:.2f}  margin {logs.get('rewards/margins', 0):.3f}"
        self.progress.update(self.task, status=status)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def build_dpo_config(config: DPOTrainingConfig, output_dir: str | Path, **overrides: Any):
    """The TRL ``DPOConfig`` for ``config`` (``KTOConfig`` for the kto loss): precision set for this machine, no
    external loggers."""
    from trl import DPOConfig, KTOConfig

    precision = mixed_precision(config.precision)
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        beta=config.beta,
        learning_rate=config.lr,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_length=config.max_length,
        loss_type=config.loss_types,
        loss_weights=list(config.loss_weights) if config.loss_weights else None,
        label_smoothing=config.label_smoothing,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=config.gradient_checkpointing,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.lr_scheduler_type,
        weight_decay=config.weight_decay,
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps > 0 else "no",
        save_steps=max(config.save_steps, 1),
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        use_cpu=default_device().type == "cpu",
        report_to="none",
        disable_tqdm=True,
        model_init_kwargs={"dtype": torch.float32, "trust_remote_code": config.trust_remote_code,
                           "use_safetensors": None if pickle_allowed() else True},
        trust_remote_code=config.trust_remote_code,
    )
    if config.unpaired:  # KTOConfig's own weights; its sampling stays sequential (the KL estimate needs it)
        for key in ("loss_weights", "label_smoothing"):
            del kwargs[key]
        kwargs |= {"loss_type": config.loss_types[0], "desirable_weight": config.desirable_weight or 1.0,
                   "undesirable_weight": config.undesirable_weight}
    kwargs.update(overrides)
    return (KTOConfig if config.unpaired else DPOConfig)(**kwargs)


SMOOTHING_CAP = 0.49
"""Largest label smoothing ``auto_label_smoothing`` sets (TRL's robust loss needs it below 0.5)."""


def estimated_label_error(source: str | Path | list[dict], split: str = "train") -> float:
    """The pairs' estimated label error: the mean over pairs of the chance that their labels are wrong, each
    label's from its ``icm_score`` log-odds s (a True label is wrong with probability sigmoid(-s), a False one
    with sigmoid(s)), the chosen's and the rejected's averaged; read from the ``chosen_score`` and
    ``rejected_score`` columns that ``icm pairs`` writes. Capped at :data:`SMOOTHING_CAP`."""
    import math

    records, name = _read_source(source, split)
    require_fields(name, records, ["chosen_score", "rejected_score"])
    errors = []
    for i, record in enumerate(records, start=1):
        scores = []
        for key in ("chosen_score", "rejected_score"):
            value = record[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(name, f"expected a finite number, got {value!r}", row=i, field=key)
            scores.append(float(value))
        errors.append((_sigmoid(-scores[0]) + _sigmoid(scores[1])) / 2)
    return min(sum(errors) / len(errors), SMOOTHING_CAP)


def _sigmoid(x: float) -> float:
    import math

    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def desirable_weight(rows: list[dict], config: DPOTrainingConfig) -> float:
    """KTO's weight of the desirable examples: ``config.desirable_weight``, else #undesirable / #desirable (times
    ``undesirable_weight``), so the two kinds weigh the same in total however unbalanced the labels are."""
    if config.desirable_weight is not None:
        return config.desirable_weight
    desirable = sum(bool(r["label"]) for r in rows)
    return config.undesirable_weight * (len(rows) - desirable) / max(desirable, 1)


def shuffled(rows: list[dict], seed: int) -> list[dict]:
    """``rows`` in a seeded random order: KTOTrainer reads its data in order (its KL estimate pairs neighbours),
    so an ``icm pairs`` file sorted by question would give batches of one question's candidates."""
    import random

    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order]


def build_trainer(
    pairs: list[dict],
    model: str,
    output_dir: str | Path,
    config: DPOTrainingConfig,
    *,
    eval_pairs: list[dict] | None = None,
    progress: bool = True,
    source: str = "<pairs>",
    **dpo_overrides: Any,
):
    """A ready ``DPOTrainer``: the policy and (full fine-tuning) the reference load from the resolved local path."""
    from datasets import Dataset
    from trl import DPOTrainer, KTOTrainer

    if config.unpaired:
        dpo_overrides.setdefault("desirable_weight", desirable_weight(pairs, config))
        pairs = shuffled(pairs, config.seed)
    args = build_dpo_config(config, output_dir, **dpo_overrides)
    with args.main_process_first(desc="resolving the model"):  # under accelerate, one process converts a GGUF
        model_path = resolve_model(model)
    tokenizer = load_tokenizer(model, trust_remote_code=config.trust_remote_code)
    chat = uses_chat_template(pairs, config, tokenizer)
    pairs = format_pairs(pairs, tokenizer, chat)
    eval_pairs = format_pairs(eval_pairs, tokenizer, chat) if eval_pairs else eval_pairs
    peft_config = None
    if config.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                 target_modules=config.lora_target_modules, task_type="CAUSAL_LM")
    # A path string (not a model object) lets TRL load the policy after DPOConfig set up DeepSpeed/FSDP, and
    # makes its reference model (full fine-tuning, ref_model=None) reload from the same local directory.
    trainer = (KTOTrainer if config.unpaired else DPOTrainer)(
        model=model_path,
        ref_model=None,
        args=args,
        train_dataset=Dataset.from_list(pairs),
        eval_dataset=Dataset.from_list(eval_pairs) if eval_pairs else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[RichProgress(f"{'kto' if config.unpaired else 'dpo'} {Path(output_dir).name}")] if progress
        else None,
    )
    trainer.remove_callback(PrinterCallback)  # RichProgress shows the loss; no raw dicts on stdout
    if config.share_prompt and not config.unpaired and not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        # (KTO scores unpaired completions with its own forward; sharded models keep TRL's one forward per step:
        # their layers gather weights at every call)
        from icm.dpo.shared_prompt import install_shared_prompt

        install_shared_prompt(trainer.model.get_base_model() if config.lora else trainer.model, TRL_OUTPUTS +
                              (("log_sum_sq_probs",) if trainer.use_weighting else ()))
        if trainer.ref_model is not None:
            install_shared_prompt(trainer.ref_model, ("log_probs",))
    kept = len(trainer.train_dataset)
    if kept == 0:
        raise InputError(source, f"every pair's prompt is at least max_length={config.max_length} tokens long "
                         "(after the chat template); raise max_length")
    if kept < len(pairs):
        log.warning("%d of %d pairs dropped: prompt longer than max_length=%s", len(pairs) - kept, len(pairs),
                    config.max_length)
    if config.lora and config.reuse_reference and not config.unpaired and trainer.accelerator.num_processes == 1:
        from icm.dpo.reference import attach_reference

        attach_reference(trainer, (str(model_path), mixed_precision(config.precision)), 4 * config.batch_size)
    return trainer


def _last_checkpoint(output_dir: Path) -> str | None:
    """The newest complete checkpoint in ``output_dir``. The Trainer writes ``trainer_state.json`` last, so a
    checkpoint without a readable one was cut short by a kill: it is removed (with a warning) and the one
    before it is used; training from there repeats the lost steps exactly."""
    import shutil

    if not output_dir.is_dir():
        return None
    steps = sorted((int(p.name.split("-")[1]), p) for p in output_dir.glob("checkpoint-*")
                   if p.is_dir() and p.name.split("-")[1].isdigit())
    for step, path in reversed(steps):
        try:
            if json.loads((path / "trainer_state.json").read_text())["global_step"] == step:
                return str(path)
        except (OSError, ValueError, KeyError, TypeError):
            pass
        log.warning("%s is incomplete (interrupted while saving): removed, resuming from the one before", path)
        shutil.rmtree(path)
    return None


def _finished(checkpoint: str, config: DPOTrainingConfig) -> bool:
    """Whether ``checkpoint`` is the last step of the training that ``config`` asks for."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return state["global_step"] >= state["max_steps"] and config.max_steps in (-1, state["max_steps"])


def _final_train_metrics(log_history: list[dict]) -> dict[str, float]:
    """The last logged training metrics (loss, reward accuracy and margins, ...) and the run's mean loss."""
    last = next((entry for entry in reversed(log_history) if "loss" in entry), {})
    metrics = {k: last[k] for k in KEY_METRICS if k in last}
    # The run's mean loss from the logged losses, each weighted by the steps it covers. (The Trainer's own
    # train_loss averages only the steps since the last resume, so it would differ after one.)
    total, steps, last_step = 0.0, 0, 0
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            total += entry["loss"] * (entry["step"] - last_step)
            steps, last_step = entry["step"], entry["step"]
    if steps:
        metrics["train_loss"] = total / steps
    return metrics


def _labeller(pairs: str | Path | list[dict]) -> str | None:
    """The ICM labeller recorded by ``icm pairs`` in a local Parquet file's metadata, if any."""
    from icm.data.io import read_parquet_metadata

    if isinstance(pairs, list) or Path(pairs).suffix != ".parquet" or not Path(pairs).is_file():
        return None
    return (read_parquet_metadata(pairs).get("labels") or {}).get("model")


def recorded_raw_prompts(pairs: str | Path | list[dict]) -> bool:
    """Whether a local pairs file's metadata says its candidates were sampled without the chat template
    (``icm generate --raw-prompt``): training then keeps the raw prompt too, so it sees what the responses answered."""
    from icm.data.io import read_parquet_metadata

    if isinstance(pairs, list) or Path(pairs).suffix != ".parquet" or not Path(pairs).is_file():
        return False
    return (read_parquet_metadata(pairs).get("labels") or {}).get("use_chat_template") is False


def _eval_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {k: metrics[f"eval_{k}"] for k in KEY_METRICS if f"eval_{k}" in metrics}


def train_dpo(
    pairs: str | Path | list[dict],
    model: str,
    output_dir: str | Path,
    config: DPOTrainingConfig | None = None,
    *,
    eval_pairs: str | Path | list[dict] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Train ``model`` with DPO on ``pairs`` and save it (or its LoRA adapters) to ``output_dir``.

    ``pairs`` is a local table (Parquet/JSONL/JSON/CSV), a Hub dataset id, or a list of rows. ``eval_pairs``
    (optional) are scored with the DPO loss before and after training. With ``resume`` the run continues
    from the newest checkpoint in ``output_dir``; without it (or ``overwrite``) a directory that already holds a
    trained model or checkpoints is refused rather than overwritten. The directory receives the model/adapters,
    tokenizer, a model card (README.md) and ``icm_dpo.json``; the returned summary is the latter's content.
    """
    config = config or DPOTrainingConfig()
    output_dir = Path(output_dir)
    inputs = [p for p in (pairs, eval_pairs) if isinstance(p, (str, Path))]
    check_output(output_dir, *inputs, directory=True)
    check_outputs({f"{name} in --output-dir": output_dir / name for name in WRITTEN}, inputs + files_of(model))
    for source in inputs:  # old checkpoints are deleted as new ones are saved
        if Path(source).exists() and Path(source).resolve().parent.name.startswith("checkpoint-") and \
                Path(source).resolve().parent.parent == output_dir.resolve():
            raise InputError(source, f"lies in a checkpoint of {output_dir}, which training replaces; move it out")
    if not (resume or overwrite) and output_dir.is_dir() and (
            (output_dir / SUMMARY_FILE).exists() or any(output_dir.glob("checkpoint-*"))):
        raise InputError(output_dir, "already holds a trained model or checkpoints (resume, or overwrite it)")
    if config.chat_template is None and recorded_raw_prompts(pairs):
        config = replace(config, chat_template=False)
    rows, dataset_name = load_examples(pairs, config)
    if config.auto_label_smoothing:  # the labels' own estimate of how many of these preferences are flipped
        config = replace(config, label_smoothing=estimated_label_error(pairs, config.split))
    eval_rows = load_examples(eval_pairs, config)[0] if eval_pairs is not None else None
    trainer = build_trainer(rows, model, output_dir, config, eval_pairs=eval_rows, progress=progress,
                            source=dataset_name)
    is_main = trainer.is_world_process_zero()

    eval_before = _eval_metrics(trainer.evaluate()) if eval_rows else None
    checkpoint = _last_checkpoint(output_dir) if resume else None
    if resume and checkpoint is None:
        log.info("no checkpoint in %s: starting from scratch", output_dir)
    start = time.perf_counter()
    start_step = trainer.state.global_step
    if checkpoint is not None and _finished(checkpoint, config):
        # Resumed from the checkpoint of the last step, Trainer.train would still run one more step (transformers
        # 5 checks max_steps only after a step), so the finished state is loaded instead of trained on.
        from transformers.trainer_callback import TrainerState

        trainer._load_from_checkpoint(checkpoint)
        trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
        start_step, train_metrics = trainer.state.global_step, {}
    else:
        train_metrics = trainer.train(resume_from_checkpoint=checkpoint).metrics
    seconds = time.perf_counter() - start
    steps_run = max(trainer.state.global_step - start_step, 0)
    eval_after = _eval_metrics(trainer.evaluate()) if eval_rows else None

    if config.lora and config.merge_lora:
        trainer.model = trainer.model.merge_and_unload()
    trainer.save_model(str(output_dir))
    base_id = hub_id(model)
    if is_main and base_id and (output_dir / "adapter_config.json").is_file():
        record_base_model(output_dir, base_id)
    summary = {
        "base_model": model,
        "base_model_id": base_id,
        "base_model_path": resolve_model(model),
        "dataset": dataset_name,
        "labeller": _labeller(pairs),
        "num_pairs": len(rows),  # with kto: the unpaired examples
        "trainer": "KTOTrainer" if config.unpaired else "DPOTrainer",
        "format": "conversational" if uses_chat_template(rows, config, trainer.processing_class) else "text",
        "adapter": config.lora and not config.merge_lora,
        "reference": "base model with adapters disabled" if config.lora else "frozen copy of the base model",
        "config": asdict(config) | {"learning_rate": config.lr, "precision": mixed_precision(config.precision)}
        | ({"desirable_weight": trainer.args.desirable_weight} if config.unpaired else {}),
        "global_step": trainer.state.global_step,
        "resumed_from": checkpoint,
        "metrics": _final_train_metrics(trainer.state.log_history) | {"train_runtime": train_metrics.get(
            "train_runtime")},
        "eval_before": eval_before,
        "eval_after": eval_after,
        "seconds": seconds,
        "seconds_per_step": seconds / steps_run if steps_run else None,
        "command": command,
    }
    if is_main:
        from icm.dpo.card import write_model_card

        write_model_card(output_dir, summary, repo_id=push_to_hub)
        write_json(output_dir / SUMMARY_FILE, summary)  # last: its presence says the directory is complete
        if push_to_hub:
            summary["pushed_to"] = push_model(output_dir, push_to_hub, private=private)
    return summary


def record_base_model(output_dir: Path, model_id: str) -> None:
    """Name the base model by its Hub id in ``adapter_config.json`` (peft wrote the local directory it loaded, a
    path that exists on this machine only), so the adapters load anywhere; :func:`load_trained_model` maps the
    id of a built-in alias back to the alias's local copy."""
    from icm.data.io import atomic_path

    path = output_dir / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = model_id
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _loadable_base(candidates: list[Any]) -> str | None:
    """The first base model spec of ``candidates`` that loads here: a built-in alias or its Hub id becomes the
    alias (its packaged weights, offline) when the alias is installed, else the Hub id; a local path from another
    machine is skipped."""
    for spec in candidates:
        if not spec or not isinstance(spec, str):
            continue
        alias = spec if spec in ALIASES else alias_of(spec)
        if alias:
            try:
                resolve_model(alias)
                return alias
            except ModelNotFoundError:  # the alias's package is not installed here: its Hub id
                return ALIASES[alias].hub_id
        if Path(spec).expanduser().exists() or hub_id(spec):
            return spec
    return None


class PushError(RuntimeError):
    """The upload failed; the trained model is still on disk."""


def push_model(output_dir: str | Path, repo_id: str, private: bool = False, api=None) -> str:
    """Upload the saved model directory (checkpoints excluded) to a Hub model repo; returns its URL."""
    from huggingface_hub import HfApi

    from icm.data.hub import check_repo_id, scrub

    api = api or HfApi()
    try:
        api.create_repo(check_repo_id(repo_id), repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(output_dir), repo_id=repo_id, repo_type="model",
                          ignore_patterns=["checkpoint-*/**", "runs/**", "training_args.bin"],
                          commit_message="icm dpo")
    except Exception as error:  # network, auth, permissions, bad id: the local model stays
        reason = scrub(f"{type(error).__name__}: {error}".splitlines()[0])
        raise PushError(f"upload to {repo_id} failed ({reason}); the model is kept in {output_dir}; retry with: "
                        f"hf upload {repo_id} {output_dir} --exclude 'checkpoint-*/**'") from None
    return f"https://huggingface.co/{repo_id}"


# ---- loading the result --------------------------------------------------------------------------------------------


def load_trained_model(spec: str, dtype: str | torch.dtype | None = "auto", device: str | torch.device | None = None):
    """Load ``(model, tokenizer)`` from any model spec, or from a LoRA adapter directory written by ``train_dpo``.

    Adapters are applied to their base model (the spec recorded in ``icm_dpo.json``, else peft's
    ``base_model_name_or_path``, the Hub id of a built-in alias loading the alias offline) and merged, so the
    result is a plain model for generation and scoring.
    """
    path = Path(spec).expanduser()
    if not (path / "adapter_config.json").is_file():
        return load_model(spec, dtype=dtype, device=device)
    from peft import PeftModel

    check_weights(path)
    fix = "not an adapter directory written by icm dpo or peft"
    candidates = [read_json(path / SUMMARY_FILE, fix, keys=()).get("base_model")] \
        if (path / SUMMARY_FILE).is_file() else []
    candidates.append(read_json(path / "adapter_config.json", fix, keys=()).get("base_model_name_or_path"))
    base = _loadable_base(candidates) or next((c for c in candidates if c and isinstance(c, str)), None)
    if not base:
        raise InputError(path / "adapter_config.json", "adapter has no base model", field="base_model_name_or_path")
    model, tokenizer = load_model(base, dtype=dtype, device=device)
    try:
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as error:  # a config peft cannot use
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(path / "adapter_config.json", f"not a loadable adapter ({reason})") from None
    model.eval()
    if (path / "tokenizer_config.json").is_file():  # the tokenizer saved with the adapters
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
