"""Label accuracy of every label source on the same candidates, no training: ICM, its zero-shot baseline, majority
vote, the model as a judge and the policy's confidence (``icm label --method``), with setting variants.

Candidates come from a file written by ``icm generate`` (or a transfer run's ``candidates.parquet``), e.g. a
validation replicate of the demo (``python -m bench.gain --replicates v1 ... -- --stop-after generate``). Each
variant is ``METHOD[:KEY=VALUE,...]`` with keys of ``SourceConfig`` (``vote_temperature``, ``vote_samples``) or of
``ICMConfig`` (``balance``, ``iterations``, ...); ICM runs with the ICM settings of ``--recipe`` (a transfer recipe,
by default the demo's). Labels are written under ``--out``; a rerun reuses them::

    python -m bench.label_sources runs/gain/v1/recipe/seed0/candidates.parquet --labeller smollm2-135m \\
        --policy smollm2-135m --variants icm majority:vote_temperature=0.7 majority:vote_temperature=1.0 judge \\
        judge:balance=none confidence --output docs/results/label-sources-v1.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields, replace
from pathlib import Path

import yaml

from icm.config import ICMConfig, PairsConfig, SourceConfig
from icm.data.answers import closed_answers
from icm.data.io import read_parquet_metadata, read_records
from icm.data.pairs import build_pairs, load_labels
from icm.label import label_file

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "sentiment-demo.yaml"


def icm_settings(recipe: Path) -> tuple[ICMConfig, str]:
    """The ICM config and claim mode of a transfer recipe (its ``label`` section)."""
    data = yaml.safe_load(recipe.read_text())
    section = {k.replace("-", "_"): v for k, v in (data.get("label") or {}).items()}
    names = {"iterations": "iterations", "polish_iterations": "polish_iterations", "batch_size": "batch_size",
             "alpha": "alpha", "exact_every": "exact_every", "check_every": "check_every", "demo_order": "demo_order"}
    config = ICMConfig(**{names[k]: v for k, v in section.items() if k in names}, seed=data.get("seed", 0))
    return config, section.get("claims", data.get("claims", "candidates"))


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    method, _, rest = text.partition(":")
    return method, dict(item.split("=", 1) for item in rest.split(",") if item)


def typed(config_type: type, key: str, value: str):
    kind = next(f.type for f in fields(config_type) if f.name == key)
    if value in ("none", "None") and "None" in str(kind):
        return None
    return float(value) if "float" in str(kind) else int(value) if "int" in str(kind) else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("candidates", type=Path)
    parser.add_argument("--labeller", default="smollm2-135m")
    parser.add_argument("--policy", default="smollm2-135m", help="the model whose confidence labels")
    parser.add_argument("--variants", nargs="+", default=["icm", "zero_shot", "majority", "judge", "confidence"])
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, default=None, help="where labels go [default: next to CANDIDATES]")
    parser.add_argument("--output", type=Path, help="write the table as JSON")
    args = parser.parse_args()

    out = args.out or args.candidates.parent / "label-sources"
    icm, claim_mode = icm_settings(args.recipe)
    answers = closed_answers(read_parquet_metadata(args.candidates).get("config", {}).get("extractor", "auto"))
    rows = {}
    for variant in args.variants:
        method, settings = parse_variant(variant)
        sources = SourceConfig(method=method, **{k: typed(SourceConfig, k, v) for k, v in settings.items()
                                                 if k in {f.name for f in fields(SourceConfig)}})
        config = replace(icm, **{k: typed(ICMConfig, k, v) for k, v in settings.items()
                                 if k in {f.name for f in fields(ICMConfig)}})
        target = out / f"{variant.replace(':', '_').replace('=', '-').replace(',', '_')}.parquet"
        if not target.exists():
            label_file(args.candidates, target, args.policy if method == "confidence" else args.labeller, config,
                       claim_mode=claim_mode, answers=answers, sources=sources, dtype=args.dtype,
                       run_dir=target.with_suffix(".run"))
        run = json.loads(target.with_suffix(".run").joinpath("run.json").read_text())
        labels, _ = load_labels(target)
        _, report = build_pairs(labels, PairsConfig())
        rows[variant] = {"label_accuracy": run.get("gold_accuracy"), "true_share": run["true_share"],
                         "pairs": report["pairs"], "pair_accuracy": (report["quality"] or {}).get("pair_correct"),
                         "seconds": run["seconds"],
                         **{k: run[k] for k in ("ties", "no_votes", "single_answer") if k in run}}
    gold = [r["label"] for r in read_records(args.candidates) if r.get("label") is not None]
    print(f"\n{args.candidates}: {len(gold)} candidates, {sum(gold) / max(len(gold), 1):.0%} correct; "
          f"labeller {args.labeller}, policy {args.policy}\n")
    print("| labels | label accuracy | True share | pairs | pair accuracy | seconds |\n|---|---|---|---|---|---|")
    for name, r in rows.items():
        acc = "-" if r["label_accuracy"] is None else f"{r['label_accuracy']:.1%}"
        pair = "-" if r["pair_accuracy"] is None else f"{r['pair_accuracy']:.1%}"
        print(f"| {name} | {acc} | {r['true_share']:.0%} | {r['pairs']} | {pair} | {r['seconds']:.0f} |")
    if args.output:
        args.output.write_text(json.dumps({"candidates": str(args.candidates), "labeller": args.labeller,
                                           "policy": args.policy, "recipe": str(args.recipe), "rows": rows},
                                          indent=2) + "\n")


if __name__ == "__main__":
    main()
