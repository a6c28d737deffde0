"""The demo's comparison on validation replicates: data that holds none of the demo's held-out reviews.

Choosing a recipe by its held-out result would make that result meaningless, so recipes are compared here, on
replicates of the demo's shape (``--train`` training reviews, ``--eval`` scored ones) drawn from the built-in
sentiment task without any review of the demo's 200 held-out ones (``examples/sentiment-demo.yaml``):

    v1: the demo's 400 training reviews (its own 200 training reviews and 200 it leaves unused)
    v2: the 400 reviews the demo never draws (the built-in task has 1,000)

Each replicate runs ``icm transfer --config examples/sentiment-demo.yaml`` once; every further DPO seed (or
recipe variant given after ``--``) reuses its candidates, labels and pairs and reruns only DPO and the
evaluation. The table gives each arm's change of accuracy per replicate and seed, and the mean::

    python -m bench.gain --replicates v1 v2 --seeds 0 1 2
    python -m bench.gain --replicates v1 --name plain-dpo -- --loss-type sigmoid --loss-weights ''
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

import yaml

from icm.data.tasks import sentiment_questions
from icm.dpo.transfer import split_questions

ROOT = Path(__file__).resolve().parents[1]

RECIPE = ROOT / "examples" / "sentiment-demo.yaml"
# Outputs of the stages before DPO: a seed or variant copies them from the replicate's first run.
SHARED = ("split.json", "eval_before.json", "eval_before.items.jsonl", "candidates.parquet",
          "candidates.report.json", "labels.parquet", "pairs.parquet", "pairs.report.json", "stages.json", "icm")
ARM_SHARED = ("labels.parquet", "pairs.parquet", "pairs.report.json", "icm")


def replicate_questions(name: str) -> list[dict[str, str]]:
    """The replicate's 400 reviews as question rows (the demo's draw and split, recomputed from its recipe)."""
    recipe = yaml.safe_load(RECIPE.read_text())
    every = sentiment_questions(1000, recipe.get("seed", 0))
    drawn = every[:recipe["limit"]]
    _, held = split_questions(drawn, recipe["eval_size"], recipe.get("seed", 0))
    held_ids = {q.id for q in held}
    pool = {"v1": [q for q in drawn if q.id not in held_ids], "v2": every[recipe["limit"]:]}[name]
    assert not held_ids & {q.id for q in pool}
    return [{"id": q.id, "question": q.question, "answer": q.reference} for q in pool]


def run(replicate: Path, out: Path, seed: int, args: argparse.Namespace, extra: list[str]) -> dict:
    if not (out / "transfer.json").exists() and out != args.first:
        for name in SHARED:
            src = args.first / name
            if src.is_dir():
                shutil.copytree(src, out / name, dirs_exist_ok=True)
            elif src.exists():
                out.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, out / name)
        for arm_dir in (args.first / "arms").glob("*"):
            for name in ARM_SHARED:
                src = arm_dir / name
                dst = out / "arms" / arm_dir.name / name
                dst.parent.mkdir(parents=True, exist_ok=True)
                if src.is_dir():
                    shutil.copytree(src, dst, dirs_exist_ok=True)
                elif src.exists():
                    shutil.copy2(src, dst)
    command = [str(ROOT / ".venv" / "bin" / "icm"), "-q", "transfer", "--config", str(RECIPE), str(replicate),
               "--task", "", "--extractor", "positive|negative", "--max-new-tokens", "16",
               "--instruction", "Answer with one word: positive or negative.", "--eval-size", str(args.eval),
               "--train-size", str(args.train), "--labeller", args.labeller, "--arms", args.arms,
               "--dpo-seed", str(seed), "--output-dir", str(out), *extra]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return json.loads((out / "transfer.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", nargs="+", default=["v1", "v2"], choices=["v1", "v2"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="DPO seeds")
    parser.add_argument("--arms", default="icm,gold,random")
    parser.add_argument("--labeller", default="smollm2-135m")
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--name", default="recipe", help="name of this variant (its runs go to OUT/REPLICATE/NAME)")
    parser.add_argument("--base", default=None, help="variant whose candidates and labels to reuse (default: NAME)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gain")
    parser.add_argument("extra", nargs="*", help="after --: more icm transfer flags (the variant)")
    args = parser.parse_args()

    rows = []
    for name in args.replicates:
        replicate = args.out / f"{name}.jsonl"
        replicate.parent.mkdir(parents=True, exist_ok=True)
        replicate.write_text("".join(json.dumps(r) + "\n" for r in replicate_questions(name)))
        base = args.out / name / (args.base or args.name) / f"seed{args.seeds[0]}"
        args.first = base
        for seed in args.seeds:
            out = args.out / name / args.name / f"seed{seed}"
            report = run(replicate, out, seed, args, args.extra)
            rows.append((name, seed, report))

    arms = list(rows[0][2]["arms"])
    print(f"\n{args.name}: change of accuracy on {args.eval} scored reviews per replicate and DPO seed "
          f"(labeller {args.labeller}; 95% paired-bootstrap CI)\n")
    print("| replicate | seed | before | " + " | ".join(f"{a} (labels right)" for a in arms) + " |")
    print("|---|---|---|" + "---|" * len(arms))
    for name, seed, report in rows:
        cells = []
        for arm in arms:
            r = report["arms"][arm]
            ci = r["delta_ci"]
            cells.append(f"{r['delta']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}] ({r['label_accuracy']:.0%})")
        print(f"| {name} | {seed} | {report['accuracy_before']:.3f} | " + " | ".join(cells) + " |")
    means = [sum(r[2]["arms"][a]["delta"] for r in rows) / len(rows) for a in arms]
    print("| mean | | | " + " | ".join(f"{m:+.3f}" for m in means) + " |")


if __name__ == "__main__":
    main()
