"""``icm dpo`` from this checkout vs another checkout (an earlier commit) vs a plain TRL script: same pairs, same
settings (the demo's: LoRA, ``sigmoid,sft`` 1,1, batch 8, 128 tokens, lr 5e-4), side by side in one run.

    .venv/bin/python -m bench.dpo_speed [--baseline /path/to/old/checkout] [--pairs FILE] [--steps 10]
                                        [--rounds 1] [--model smollm2-135m] [--no-plain-trl] [--output FILE.json]
    git worktree add --detach ../icm-base bdb3854   # a baseline checkout to compare with

Each side runs as its own process (``python -m icm dpo ...`` with the checkout as working directory), one at a time;
rounds alternate the order. Reported per side: the process's wall and CPU time (per run: loading, tokenizing,
training, saving), the training seconds per step (``icm_dpo.json``) and the final train loss; and their ratios to the
baseline. The default pairs have the demo's shape: the built-in sentiment task's reviews, gold answer chosen.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_ARGS = ["--lora", "--batch-size", "8", "--max-length", "128", "--learning-rate", "5e-4",
             "--loss-type", "sigmoid,sft", "--loss-weights", "1,1", "--save-steps", "0", "--seed", "0"]


def demo_pairs(n: int) -> list[dict]:
    """The demo's pairs on ``n`` sentiment reviews: the prompt icm generate used, gold word chosen, the other
    rejected."""
    from icm.data.tasks import TASKS
    from icm.sampling import user_message

    task = TASKS["sentiment"]
    pairs = []
    for q in task.questions(n, 0):
        other = "negative" if q.reference == "positive" else "positive"
        pairs.append({"prompt": user_message(q.question, task.instruction) + "\n", "chosen": q.reference,
                      "rejected": other})
    return pairs


def timed(command: list[str], cwd: Path, env: dict | None = None) -> tuple[float, float]:
    """Run ``command`` to its end; its wall seconds and CPU seconds (user + system, its threads and children:
    the work done, which other processes on a shared machine change less than the wall time)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


THREADS: dict[str, str] = {}
"""Environment of the timed processes: OMP_NUM_THREADS and MKL_NUM_THREADS with --threads."""


def run_icm_dpo(checkout: Path, pairs: Path, model: str, steps: int, out: Path) -> dict:
    """``icm dpo`` of ``checkout`` in its own process; wall seconds, seconds per step and final train loss."""
    command = [sys.executable, "-m", "icm", "dpo", str(pairs), "--output-dir", str(out), "--model", model,
               "--max-steps", str(steps), *DEMO_ARGS]
    wall, cpu = timed(command, checkout, os.environ | THREADS | {"PYTHONPATH": ""})
    summary = json.loads((out / "icm_dpo.json").read_text())
    metrics = summary["metrics"]
    return {"wall_seconds": wall, "cpu_seconds": cpu, "seconds_per_step": summary["seconds_per_step"],
            "train_loss": metrics["train_loss"], "final_loss": metrics.get("loss")}


def run_plain_trl(pairs: Path, model: str, steps: int, out: Path) -> dict:
    """The textbook TRL recipe with the same hyperparameters, in its own process."""
    command = [sys.executable, "-m", "bench.dpo_speed", "--plain-trl-run", str(out), "--pairs", str(pairs),
               "--model", model, "--steps", str(steps)]
    wall, cpu = timed(command, ROOT, os.environ | THREADS)
    return json.loads((out / "plain_trl.json").read_text()) | {"wall_seconds": wall, "cpu_seconds": cpu}


def plain_trl(pairs_file: Path, model: str, steps: int, out: Path) -> None:
    """Train with a plain TRL ``DPOTrainer`` (the settings of ``DEMO_ARGS``); writes ``out/plain_trl.json``."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from icm.config import DPOTrainingConfig
    from icm.data.io import read_records
    from icm.dpo.training import mixed_precision
    from icm.models import default_device, load_tokenizer, resolve_model

    config = DPOTrainingConfig()
    pairs = read_records(pairs_file)
    tokenizer = load_tokenizer(model)
    policy = AutoModelForCausalLM.from_pretrained(resolve_model(model), dtype=torch.float32)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p["prompt"].rstrip()}],
                                  "chosen": [{"role": "assistant", "content": p["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])
    precision = mixed_precision(config.precision)
    args = DPOConfig(output_dir=str(out), beta=config.beta, learning_rate=5e-4, max_steps=steps,
                     per_device_train_batch_size=8, max_length=128, loss_type=["sigmoid", "sft"],
                     loss_weights=[1.0, 1.0], bf16=precision == "bf16", fp16=precision == "fp16",
                     use_cpu=default_device().type == "cpu", logging_steps=1, save_strategy="no",
                     report_to="none", disable_tqdm=True, seed=0)
    peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                             target_modules=config.lora_target_modules, task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=policy, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    out.mkdir(parents=True, exist_ok=True)
    (out / "plain_trl.json").write_text(json.dumps({
        "seconds_per_step": seconds / trainer.state.global_step, "final_loss": losses[-1][1],
        "train_loss": statistics.fmean(loss for _, loss in losses)}))


def step_costs(pairs_file: Path, model: str, repeats: int) -> dict:
    """In this process, one thread, the same batch of 8 pairs: CPU seconds of a training step (loss and backward)
    and of the reference pass with TRL's forward and with the shared-prompt one, and how far the reference
    log-probs of each lie from TRL's in float32 (bf16: the spread autocast itself gives)."""
    import torch

    from icm.config import DPOTrainingConfig
    from icm.dpo.shared_prompt import install_shared_prompt
    from icm.dpo.training import TRL_OUTPUTS, build_trainer, load_pairs

    torch.set_num_threads(1)
    rows = load_pairs(pairs_file)[0]
    result: dict = {}
    exact = None
    for precision in ("fp32", "bf16"):
        config = DPOTrainingConfig(max_steps=1, batch_size=8, max_length=128, learning_rate=5e-4,
                                   loss_type="sigmoid,sft", loss_weights=(1.0, 1.0), save_steps=0, precision=precision,
                                   share_prompt=False, reuse_reference=False)
        with tempfile.TemporaryDirectory() as tmp:
            trainer = build_trainer(rows, model, tmp, config, progress=False)
        batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(8)]))
        trainer.model.train()
        for side in ("TRL forward", "shared prompt"):
            if side == "shared prompt":
                install_shared_prompt(trainer.model.get_base_model(), TRL_OUTPUTS)
            ref = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))
            exact = ref if exact is None else exact
            entry = {"ref_logps_max_abs_diff_vs_trl_fp32": (ref - exact).abs().max().item()}
            if precision == "bf16":
                start = time.process_time()
                for _ in range(repeats):
                    trainer.compute_ref_log_probs(trainer.model, batch)
                entry["reference_cpu_seconds"] = (time.process_time() - start) / repeats
                start = time.process_time()
                for _ in range(repeats):
                    with trainer.accelerator.autocast():
                        loss = trainer.compute_loss(trainer.model, batch)
                    loss.backward()
                    trainer.model.zero_grad()
                entry["policy_step_cpu_seconds"] = (time.process_time() - start) / repeats
                entry["loss"] = loss.item()
            result.setdefault(precision, {})[side] = entry
        result["batch_shape"] = list(batch["input_ids"].shape)
    costs = result["bf16"]
    result["speedup"] = {k: costs["TRL forward"][k] / costs["shared prompt"][k]
                         for k in ("reference_cpu_seconds", "policy_step_cpu_seconds")}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, default=None, help="Another checkout of icm (e.g. a git worktree "
                        "of an earlier commit) whose icm dpo is timed beside this one's.")
    parser.add_argument("--pairs", type=Path, default=None, help="Pairs file [default: the demo's shape, "
                        "--num-pairs sentiment reviews].")
    parser.add_argument("--num-pairs", type=int, default=200)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-plain-trl", action="store_true", help="Skip the plain TRL side.")
    parser.add_argument("--threads", type=int, default=None, help="Threads per timed process (1: its CPU seconds "
                        "are the work done even on a crowded machine, where spinning threads inflate them).")
    parser.add_argument("--output", type=Path, default=None, help="Write the results as JSON here.")
    parser.add_argument("--per-step", type=int, default=0, metavar="REPEATS", help="Instead: time one step and one "
                        "reference pass on one batch, TRL's forward vs the shared prompt, in this process (CPU seconds "
                        "of one thread, REPEATS times each).")
    parser.add_argument("--plain-trl-run", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_trl_run is not None:
        plain_trl(args.pairs, args.model, args.steps, args.plain_trl_run)
        return

    from icm.models import resolve_model

    if args.per_step:
        with tempfile.TemporaryDirectory() as tmp:
            pairs = args.pairs or Path(tmp) / "pairs.jsonl"
            if args.pairs is None:
                pairs.write_text("".join(json.dumps(p) + "\n" for p in demo_pairs(args.num_pairs)))
            result = step_costs(pairs, args.model, args.per_step)
        print(json.dumps(result, indent=2))
        if args.output:
            args.output.write_text(json.dumps(result, indent=2) + "\n")
        return
    if args.threads:
        THREADS.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))

    resolve_model(args.model)  # convert a GGUF once, outside the timings
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        pairs = args.pairs
        if pairs is None:
            pairs = Path(tmp) / "pairs.jsonl"
            pairs.write_text("".join(json.dumps(p) + "\n" for p in demo_pairs(args.num_pairs)))
        sides = {"icm dpo": lambda out: run_icm_dpo(ROOT, pairs, args.model, args.steps, out)}
        if args.baseline is not None:
            sides["baseline"] = lambda out: run_icm_dpo(args.baseline, pairs, args.model, args.steps, out)
        if not args.no_plain_trl:
            sides["plain TRL"] = lambda out: run_plain_trl(pairs, args.model, args.steps, out)
        runs: dict[str, list[dict]] = {name: [] for name in sides}
        for r in range(args.rounds):
            for i, name in enumerate(list(sides)[:: 1 if r % 2 == 0 else -1]):
                runs[name].append(sides[name](Path(tmp) / f"r{r}-{i}"))
                print(f"round {r + 1} {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in runs[name][-1].items()),
                      flush=True)
    keys = ("wall_seconds", "cpu_seconds", "seconds_per_step", "train_loss", "final_loss")
    median = {name: {k: statistics.median(run[k] for run in values) for k in keys} for name, values in runs.items()}
    reference = "baseline" if "baseline" in median else "plain TRL" if "plain TRL" in median else None
    result = {"settings": {"model": args.model, "steps": args.steps, "rounds": args.rounds,
                           "pairs": str(args.pairs or f"{args.num_pairs} demo-shaped sentiment pairs"),
                           "baseline": str(args.baseline) if args.baseline else None,
                           "icm_dpo_args": DEMO_ARGS, "cpu_threads": os.cpu_count(), "threads": args.threads,
                           "load_average_start": load_start, "load_average_end": os.getloadavg()},
              "runs": runs, "median": median}
    if reference:
        ours = median["icm dpo"]
        result["speedup_vs_" + reference.replace(" ", "_")] = {
            "per_run": median[reference]["wall_seconds"] / ours["wall_seconds"],
            "per_run_cpu": median[reference]["cpu_seconds"] / ours["cpu_seconds"],
            "per_step": median[reference]["seconds_per_step"] / ours["seconds_per_step"],
            "train_loss_ratio": ours["train_loss"] / median[reference]["train_loss"]}
    for name, values in median.items():
        print(f"{name:>10}: {values['wall_seconds']:7.1f} s per run ({values['cpu_seconds']:.1f} CPU s), "
              f"{values['seconds_per_step']:6.3f} s/step, "
              f"train loss {values['train_loss']:.4f}")
    for key, value in result.items():
        if key.startswith("speedup"):
            print(f"{key}: " + ", ".join(f"{k} {v:.2f}x" if k != "train_loss_ratio" else f"{k} {v:.3f}"
                                         for k, v in value.items()))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
