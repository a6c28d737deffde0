"""The model card (README.md) written next to a DPO-trained model or adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from icm.data.io import atomic_path, scrub

CARD_HYPERPARAMETERS = ("beta", "learning_rate", "num_train_epochs", "max_steps", "batch_size",
                        "gradient_accumulation_steps", "max_length", "loss_type", "precision", "lora", "lora_r",
                        "lora_alpha", "lora_dropout", "lora_target_modules", "seed")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def model_card(summary: dict[str, Any], repo_id: str | None = None) -> str:
    """Markdown with YAML front matter: base model, dataset, hyperparameters and final metrics."""
    import peft
    import torch
    import transformers
    import trl

    config = summary["config"]
    base, dataset = summary["base_model"], summary["dataset"]
    is_hub_base = "/" in base and not Path(base).exists()
    is_hub_data = "/" in dataset and not Path(dataset).exists()
    front = ["---"]
    if is_hub_base:
        front.append(f"base_model: {base}")
    if is_hub_data:
        front += ["datasets:", f"- {dataset}"]
    front.append(f"library_name: {'peft' if summary['adapter'] else 'transformers'}")
    front += ["tags:", "- icm", "- dpo", "- trl"] + (["- lora"] if config["lora"] else [])
    front.append("---")

    name = repo_id or f"{Path(base).name}-icm-dpo"
    kind = "LoRA adapters for" if summary["adapter"] else "A fine-tuned version of"
    lines = [
        f"# {name}", "",
        (f"{kind} **{base}**, trained with Direct Preference Optimization (TRL `DPOTrainer`) on "
         f"{summary['num_pairs']} preference pairs from `{dataset}`." if summary.get("trainer") != "KTOTrainer" else
         f"{kind} **{base}**, trained with Kahneman-Tversky Optimization (TRL `KTOTrainer`) on "
         f"{summary['num_pairs']} unpaired examples from `{dataset}`.")
        + (f" The pairs were built without human labels: candidate answers labelled by Internal Coherence "
           f"Maximization with `{summary['labeller']}` (`icm label`, `icm pairs`)." if summary.get("labeller")
           else ""), "",
        "## Base model", "", f"- spec: `{base}`", f"- loaded from: `{summary.get('base_model_path', base)}`",
        f"- reference model: {summary['reference']}", "",
        "## Dataset", "", f"- source: `{dataset}`", f"- pairs: {summary['num_pairs']}",
        f"- ICM labeller: `{summary.get('labeller') or 'unknown'}`",
        f"- format: {summary.get('format', 'text')}", "",
        "## Hyperparameters", "", "| name | value |", "|---|---|",
    ]
    lines += [f"| {key} | {_fmt(config[key])} |" for key in CARD_HYPERPARAMETERS
              if key in config and (config["lora"] or not key.startswith("lora_"))]
    lines += ["", "## Final metrics", "", f"Optimizer steps: {summary['global_step']}.", "",
              "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {_fmt(value)} |" for key, value in summary["metrics"].items() if value is not None]
    for label in ("eval_before", "eval_after"):
        if summary.get(label):
            lines += [f"| {label}/{k} | {_fmt(v)} |" for k, v in summary[label].items()
                      if k in ("loss", "rewards/accuracies", "rewards/margins")]
    load = (f'from peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained("{name}")'
            if summary["adapter"] else
            f'from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained("{name}")')
    lines += ["", "## Usage", "", "```python", load, "```", "",
              "Evaluate it with `icm eval --model <this directory> QUESTIONS`.", ""]
    if summary.get("command"):
        lines += ["## Command", "", "```", summary["command"], "```", ""]
    lines += ["## Framework versions", "", f"- TRL {trl.__version__}", f"- Transformers {transformers.__version__}",
              f"- PEFT {peft.__version__}", f"- PyTorch {torch.__version__}", ""]
    return "\n".join(front + [""] + lines)


def write_model_card(output_dir: str | Path, summary: dict[str, Any], repo_id: str | None = None) -> Path:
    path = Path(output_dir) / "README.md"
    with atomic_path(path) as tmp:
        tmp.write_text(scrub(model_card(summary, repo_id=repo_id)), encoding="utf-8")
    return path
