"""Seconds per DPO step: ``icm dpo`` (``dpo.training.train_dpo``) vs a plain TRL script, same settings, one run.

    .venv/bin/python -m bench.dpo_speed [--model smollm2-135m] [--steps 4] [--batch-size 2] [--max-length 128]
                                        [--no-lora] [--precision auto] [--rounds 1] [--threads N]

Both sides time ``trainer.train()`` only (model loading excluded) and divide by the steps; with ``--rounds`` > 1
they alternate which goes first and the median is reported, which evens out noise from other processes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from icm.config import DPOTrainingConfig
from icm.data.tasks import arithmetic_questions
from icm.dpo.training import mixed_precision, train_dpo
from icm.models import DEFAULT_MODEL, default_device, load_tokenizer, resolve_model


def make_pairs(n: int) -> list[dict]:
    """Right vs wrong worked answers to arithmetic questions."""
    pairs = []
    for q in arithmetic_questions(n, seed=0):
        wrong = int(q.reference) + 1
        pairs.append({"prompt": q.question, "chosen": f"{q.solution}",
                      "rejected": f"{q.solution.rsplit('The answer is', 1)[0]}The answer is {wrong}."})
    return pairs


def plain_trl(model: str, pairs: list[dict], config: DPOTrainingConfig, output_dir: str) -> float:
    """The textbook TRL recipe with the same hyperparameters; returns seconds per step."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    path = resolve_model(model)
    tokenizer = load_tokenizer(model)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p["prompt"]}],
                                  "chosen": [{"role": "assistant", "content": p["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])
    precision = mixed_precision(config.precision)
    args = DPOConfig(output_dir=output_dir, beta=config.beta, learning_rate=config.lr, max_steps=config.max_steps,
                     per_device_train_batch_size=config.batch_size, max_length=config.max_length,
                     bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=default_device().type == "cpu",
                     gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to="none",
                     disable_tqdm=True, seed=config.seed)
    peft_config = (LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                              target_modules=config.lora_target_modules, task_type="CAUSAL_LM")
                   if config.lora else None)
    trainer = DPOTrainer(model=policy, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    trainer.remove_callback(PrinterCallback)  # as icm dpo does: no log dicts on stdout
    start = time.perf_counter()
    trainer.train()
    return (time.perf_counter() - start) / trainer.state.global_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--no-lora", action="store_true")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = DPOTrainingConfig(lora=not args.no_lora, max_steps=args.steps, batch_size=args.batch_size,
                               max_length=args.max_length, precision=args.precision, save_steps=0)
    pairs = make_pairs(args.steps * args.batch_size)
    resolve_model(args.model)  # convert a GGUF once, outside the timings
    times: dict[str, list[float]] = {"icm dpo": [], "plain TRL": []}
    runners = {"icm dpo": lambda tmp: train_dpo(pairs, args.model, f"{tmp}/icm", config,
                                               progress=False)["seconds_per_step"],
               "plain TRL": lambda tmp: plain_trl(args.model, pairs, config, f"{tmp}/trl")}
    for r in range(args.rounds):
        for name in list(runners)[:: 1 if r % 2 == 0 else -1]:  # alternate which side goes first
            with tempfile.TemporaryDirectory() as tmp:
                times[name].append(runners[name](tmp))
        print(f"round {r + 1}: " + ", ".join(f"{name} {values[-1]:.3f} s/step" for name, values in times.items()),
              flush=True)
    ours, trl = (statistics.median(v) for v in times.values())
    for name, value in (("icm dpo", ours), ("plain TRL", trl)):
        print(f"{name:>10}: {value:7.3f} s/step")
    print(f"{'ratio':>10}: {ours / trl:.2f}x (icm dpo / plain TRL; {args.model}, {'LoRA' if config.lora else 'full'}, "
          f"{args.steps} steps, batch {args.batch_size}, max_length {args.max_length}, "
          f"{mixed_precision(args.precision)}, {torch.get_num_threads()} thread(s), {args.rounds} round(s))")


if __name__ == "__main__":
    main()
