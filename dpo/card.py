"""The model card (README.md) written next to a DPO-trained model or adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from icm.data.io import atomic_path, scrub, without_local_paths
from icm.models import ALIASES, hub_id

CARD_HYPERPARAMETERS = ("beta", "learning_rate", "num_train_epochs", "max_steps", "batch_size",
                        "gradient_accumulation_steps", "max_length", "loss_type", "precision", "lora", "lora_r",
                        "lora_alpha", "lora_dropout", "lora_target_modules", "seed")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def _usage(location: str, adapter: bool, chat: bool) -> list[str]:
    """A snippet that loads the result from ``location`` (Hub repository or directory) and answers a question
    the way ``icm dpo`` trained it (chat template, or the plain prompt)."""
    loader = ("from peft import AutoPeftModelForCausalLM", "AutoPeftModelForCausalLM") if adapter else \
        ("from transformers import AutoModelForCausalLM", "AutoModelForCausalLM")
    lines = [loader[0], "from transformers import AutoTokenizer", "",
             f'model = {loader[1]}.from_pretrained("{location}")',
             f'tokenizer = AutoTokenizer.from_pretrained("{location}")', 'question = "What is 2 + 3?"']
    if chat:
        lines += ['inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], '
                  'add_generation_prompt=True,', '                                       return_tensors="pt", '
                  'return_dict=True)']
    else:
        lines += ['inputs = tokenizer(question + "\\nAnswer:", return_tensors="pt")']
    lines += ["output = model.generate(**inputs, max_new_tokens=64, do_sample=False)",
              'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))']
    return lines


def model_card(summary: dict[str, Any], repo_id: str | None = None, location: str | None = None) -> str:
    """Markdown with YAML front matter (``base_model`` as a Hub id, ``base_model_relation``, datasets, tags): base
    model, dataset, hyperparameters, final metrics and a usage snippet loading ``repo_id`` (else ``location``,
    the output directory). Local absolute paths are cut to their last component."""
    import peft
    import torch
    import transformers
    import trl

    config = summary["config"]
    base, dataset = summary["base_model"], summary["dataset"]
    base_id = summary.get("base_model_id") or hub_id(base)
    is_hub_data = "/" in dataset and not Path(dataset).exists()
    front = ["---"]
    if base_id:
        front += [f"base_model: {base_id}", f"base_model_relation: {'adapter' if summary['adapter'] else 'finetune'}"]
    if is_hub_data:
        front += ["datasets:", f"- {dataset}"]
    front.append(f"library_name: {'peft' if summary['adapter'] else 'transformers'}")
    front.append("pipeline_tag: text-generation")
    front += ["tags:", "- icm", "- dpo", "- trl"] + (["- lora"] if config["lora"] else [])
    front.append("---")

    name = repo_id or f"{(base_id or base).rstrip('/').rsplit('/', 1)[-1].removesuffix('.gguf')}-icm-dpo"
    kind = "LoRA adapters for" if summary["adapter"] else "A fine-tuned version of"
    shown = base_id or base
    weights = (f"the `{base}` alias: {base_id} as packaged GGUF ({', '.join(ALIASES[base].files)}), dequantized "
               "to float32" if base in ALIASES else f"`{base}`")
    labeller = summary.get("labeller")
    labeller_id = hub_id(labeller) if labeller else None
    labeller_text = f"`{labeller}`" + (f" ({labeller_id})" if labeller_id and labeller_id != labeller else "") \
        if labeller else "unknown"
    lines = [
        f"# {name}", "",
        (f"{kind} **{shown}**, trained with Direct Preference Optimization (TRL `DPOTrainer`) on "
         f"{summary['num_pairs']} preference pairs from `{dataset}`." if summary.get("trainer") != "KTOTrainer" else
         f"{kind} **{shown}**, trained with Kahneman-Tversky Optimization (TRL `KTOTrainer`) on "
         f"{summary['num_pairs']} unpaired examples from `{dataset}`.")
        + (f" The pairs were built without human labels: candidate answers labelled by Internal Coherence "
           f"Maximization with `{summary['labeller']}` (`icm label`, `icm pairs`)." if summary.get("labeller")
           else ""), "",
        "## Base model", "", f"- Hub id: {f'`{base_id}`' if base_id else 'none (a local model)'}",
        f"- trained from: {weights}", f"- reference model: {summary['reference']}", ""]
    if base in ALIASES and summary["adapter"]:
        lines += ["The adapters were trained on the dequantized GGUF weights; loaded onto the original Hub weights "
                  "(as below) they behave close to, not exactly as, where they were trained.", ""]
    lines += [
        "## Dataset", "", f"- source: `{dataset}`", f"- pairs: {summary['num_pairs']}",
        f"- ICM labeller: {labeller_text}",
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
    where = repo_id or location or "OWNER/NAME"
    lines += ["", "## Usage", "", "```python"]
    lines += _usage(where, summary["adapter"], summary.get("format") == "conversational")
    lines += ["```", "", "Evaluate it with `icm eval --model <this directory> QUESTIONS`.", ""]
    if summary.get("command"):
        lines += ["## Command", "", "```", summary["command"], "```", ""]
    lines += ["## Framework versions", "", f"- TRL {trl.__version__}", f"- Transformers {transformers.__version__}",
              f"- PEFT {peft.__version__}", f"- PyTorch {torch.__version__}", ""]
    return without_local_paths("\n".join(front + [""] + lines))


def write_model_card(output_dir: str | Path, summary: dict[str, Any], repo_id: str | None = None) -> Path:
    path = Path(output_dir) / "README.md"
    location = str(output_dir) if not Path(output_dir).is_absolute() else Path(output_dir).name
    with atomic_path(path) as tmp:
        tmp.write_text(scrub(model_card(summary, repo_id=repo_id, location=location)), encoding="utf-8")
    return path
