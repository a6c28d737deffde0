"""icm transfer: generate -> label -> pairs -> dpo -> eval before/after on the tiny fixture, resumable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import build_tiny_model
from rich.console import Console
from test_report import check_transfer_report
from typer.testing import CliRunner

from icm.cli import app
from icm.config import ARMS, DPOTrainingConfig, EvalConfig, GenerationConfig, ICMConfig, PairsConfig, TransferConfig
from icm.data.io import read_parquet_metadata, read_records, write_parquet
from icm.data.tasks import arithmetic_questions, load_questions
from icm.dpo.transfer import arms_table, random_labels, run_transfer, split_questions

ARGS = ["--task", "arithmetic", "--limit", "5", "--eval-size", "2", "--num-candidates", "3", "--temperature", "1.0",
        "--max-new-tokens", "10", "--icm-iterations", "6", "--max-steps", "2", "--batch-size", "2",
        "--max-length", "384", "--bootstrap-samples", "200", "--dtype", "fp32"]


def tiny_config(**kwargs) -> TransferConfig:
    """ARGS as a config; the reference solutions join the candidates, so every question has a right answer."""
    return TransferConfig(
        eval_size=2, bootstrap_samples=200, dtype="fp32", **kwargs,
        generation=GenerationConfig(num_candidates=3, temperature=1.0, max_new_tokens=10, batch_size=2,
                                    include_reference=True),
        icm=ICMConfig(iterations=6), dpo=DPOTrainingConfig(max_steps=2, batch_size=2, max_length=384),
        eval=EvalConfig(max_new_tokens=10, batch_size=2))


@pytest.fixture(scope="module")
def strong_model_dir(tmp_path_factory) -> str:
    """A second tiny model (other weights) playing the labeller."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-labeller"), seed=1))


def test_transfer_end_to_end_resumes_and_skips_finished_stages(tiny_model_dir, strong_model_dir, tmp_path):
    run = tmp_path / "run"
    argv = ["transfer", "--labeller", strong_model_dir, "--policy", tiny_model_dir, "--output-dir", str(run), *ARGS]
    partial = CliRunner().invoke(app, [*argv, "--stop-after", "pairs"])
    assert partial.exit_code == 0, partial.output
    assert (run / "pairs.parquet").exists() and not (run / "policy").exists() and not (run / "transfer.json").exists()
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    for name in ("split.json", "candidates.parquet", "labels.parquet", "pairs.parquet", "policy/icm_dpo.json",
                 "policy/adapter_model.safetensors", "eval_before.json", "eval_after.json", "transfer.json"):
        assert (run / name).exists(), name
    assert (run / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report = json.loads((run / "transfer.json").read_text())
    assert report["mode"] == "weak-from-strong" and report["labeller"] == strong_model_dir
    assert report["questions"] == {"source": "task:arithmetic", "train": 3, "heldout": 2}
    before = json.loads((run / "eval_before.json").read_text())
    after = json.loads((run / "eval_after.json").read_text())
    assert report["accuracy_before"] == before["accuracy"] and report["accuracy_after"] == after["accuracy"]
    assert report["delta"] == pytest.approx(after["accuracy"] - before["accuracy"])
    assert report["delta_ci"]["low"] <= report["delta"] <= report["delta_ci"]["high"]
    assert after["model"] == str(run / "policy") and before["model"] == tiny_model_dir
    pairs = read_records(run / "pairs.parquet")
    assert report["pairs"]["pairs"] == len(pairs) > 0
    assert report["pairs"]["quality"]["pairs_with_gold"] == len(pairs)  # arithmetic has gold answers
    labels = read_records(run / "labels.parquet")
    assert {"icm_label", "icm_score", "icm_searched"} <= set(labels[0])
    assert read_parquet_metadata(run / "labels.parquet")["model"] == strong_model_dir
    assert report["labels"]["true_share"] == pytest.approx(sum(r["icm_label"] for r in labels) / len(labels))
    assert report["labels"]["gold_accuracy"] == pytest.approx(
        sum(r["icm_label"] == r["label"] for r in labels) / len(labels))
    candidates = read_records(run / "candidates.parquet")
    assert {c["generator"] for c in candidates} == {tiny_model_dir}  # the policy samples the candidates
    heldout = set(json.loads((run / "split.json").read_text())["heldout"])
    assert heldout == {r["id"] for r in before["results"]} and not heldout & {c["question_id"] for c in candidates}
    assert report["dpo"]["global_step"] == 2
    card = (run / "policy" / "README.md").read_text()
    assert f"ICM labeller: `{Path(strong_model_dir).name}`" in card and strong_model_dir not in card  # no local path
    assert set(report["timings"]) == {"generate", "label", "pairs", "dpo", "eval_before", "eval_after"}
    assert all(v > 0 for v in report["timings"].values())
    assert report["skipped_this_run"] == ["eval_before", "generate", "label", "pairs"]

    mtime = (run / "policy" / "icm_dpo.json").stat().st_mtime
    again = CliRunner().invoke(app, argv)
    assert again.exit_code == 0, again.output
    rerun = json.loads((run / "transfer.json").read_text())
    assert len(rerun["skipped_this_run"]) == 6 and rerun["timings"] == report["timings"]
    assert rerun["accuracy_after"] == report["accuracy_after"]
    assert (run / "policy" / "icm_dpo.json").stat().st_mtime == mtime
    check_transfer_report(run, tmp_path)  # icm report on this run (tests/test_report.py)


def test_transfer_refuses_a_run_directory_made_for_other_questions(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "split.json").write_text(json.dumps({"source": "other", "train": [], "heldout": [], "questions": {}}))
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question": q.question, "answer": q.solution}) + "\n"
                                 for q in arithmetic_questions(4, seed=3)))
    result = CliRunner().invoke(app, ["transfer", "--labeller", tiny_model_dir, "--policy", tiny_model_dir,
                                      str(questions), "--output-dir", str(run)])
    assert result.exit_code == 2 and "split.json" in result.output and "new --output-dir" in result.output
    assert json.loads((run / "split.json").read_text())["source"] == "other"  # left as it was


def test_split_questions_is_seeded_and_disjoint():
    questions = arithmetic_questions(10, seed=0)
    train, held = split_questions(questions, 0.3, seed=4)
    assert len(held) == 3 and len(train) == 7 and not {q.id for q in train} & {q.id for q in held}
    assert [q.id for q in split_questions(questions, 0.3, seed=4)[1]] == [q.id for q in held]
    with pytest.raises(ValueError):
        split_questions(questions[:2], 2, seed=0)


def test_train_size_keeps_the_held_out_questions():
    questions = arithmetic_questions(10, seed=0)
    train, held = split_questions(questions, 0.3, seed=4)
    fewer, same = split_questions(questions, 0.3, seed=4, train_size=4)
    assert [q.id for q in same] == [q.id for q in held] and [q.id for q in fewer] == [q.id for q in train[:4]]
    with pytest.raises(ValueError, match="train_size"):
        TransferConfig(train_size=0)


@pytest.fixture(scope="module")
def arms_run(tiny_model_dir, strong_model_dir, tmp_path_factory):
    """A gold-only run, then all four arms in the same directory (the gold arm is finished by then), then a rerun."""
    run = tmp_path_factory.mktemp("arms") / "run"
    questions = load_questions(None, task="arithmetic", limit=5, seed=0)
    reports = [run_transfer(questions, strong_model_dir, tiny_model_dir, run, tiny_config(arms=arms), progress=False)
               for arms in (("gold",), ARMS, ARMS)]
    return run, reports


def test_each_arm_trains_the_policy_on_the_labels_it_names(arms_run):
    run, (_, report, _) = arms_run
    candidates = read_records(run / "candidates.parquet")
    assert any(c["label"] for c in candidates) and not all(c["label"] for c in candidates)
    labels = {arm: read_records(run / ("" if arm == "icm" else f"arms/{arm}") / "labels.parquet") for arm in ARMS}
    for arm, rows in labels.items():
        assert [r["choice"] for r in rows] == [c["choice"] for c in candidates], arm
        base = run if arm == "icm" else run / "arms" / arm
        if not report["arms"][arm]["pairs"]:  # the tiny labeller's zero-shot labels can be constant per question
            assert not (base / "policy").exists() and "no preference pairs" in report["arms"][arm]["note"]
            continue
        dpo = json.loads((base / "policy" / "icm_dpo.json").read_text())
        assert dpo["dataset"] == str(base / "pairs.parquet") and dpo["global_step"] == 2, arm
        eval_after = json.loads((base / "eval_after.json").read_text())
        assert eval_after["model"] == str(base / "policy") and report["arms"][arm]["accuracy_after"] == \
            eval_after["accuracy"]
    assert [r["icm_label"] for r in labels["gold"]] == [c["label"] for c in candidates]
    assert [r["icm_label"] for r in labels["random"]] == random_labels(candidates, seed=0)
    assert [r["icm_score"] for r in labels["random"]] == [1.0 if r["icm_label"] else -1.0 for r in labels["random"]]
    assert not any(r["icm_searched"] for r in labels["zero_shot"])
    assert json.loads((run / "arms" / "zero_shot" / "icm" / "run.json").read_text())["method"] == "zero-shot"
    for arm in ("majority", "judge", "confidence"):  # the label-free alternatives: one True answer per question
        assert json.loads((run / "arms" / arm / "icm" / "run.json").read_text())["method"] == arm
        true_answers: dict = {}
        for r in labels[arm]:
            true_answers.setdefault(r["consistency_id"], set()).update([r["answer"]] if r["icm_label"] else [])
        assert all(len(a) <= 1 for a in true_answers.values()), arm
        assert not any(r["icm_searched"] for r in labels[arm])
    stated = {r["consistency_id"] for r in labels["confidence"] if r["answer"]}
    assert all(len(true_answers.get(q, ())) == 1 for q in stated)  # confidence: always its most confident answer
    gold_pairs = read_records(run / "arms" / "gold" / "pairs.parquet")
    assert gold_pairs and all(p["chosen_is_correct"] and not p["rejected_is_correct"] for p in gold_pairs)
    assert report["arms"]["gold"]["label_accuracy"] == report["arms"]["gold"]["pair_accuracy"] == 1.0


def shared_stages(run, other):
    """A new run directory starting from ``run``'s finished shared stages (split, eval_before, candidates)."""
    other.mkdir()
    for name in ("split.json", "eval_before.json", "candidates.parquet"):
        shutil.copy(run / name, other / name)
    return other


def test_icm_arm_never_reads_the_gold_column(arms_run, tiny_model_dir, strong_model_dir, tmp_path):
    run, _ = arms_run
    other = shared_stages(run, tmp_path / "run")
    rows = read_records(run / "candidates.parquet")
    flipped = [r | {"label": not r["label"]} for r in rows]
    write_parquet(other / "candidates.parquet", pa.Table.from_pylist(flipped),
                  read_parquet_metadata(run / "candidates.parquet"))
    questions = load_questions(None, task="arithmetic", limit=5, seed=0)
    run_transfer(questions, strong_model_dir, tiny_model_dir, other, tiny_config(), stop_after="label",
                 progress=False)
    ours, theirs = (read_records(d / "labels.parquet") for d in (run, other))
    assert [r["icm_label"] for r in ours] == [r["icm_label"] for r in theirs]
    assert [r["label"] for r in theirs] == [not r["label"] for r in ours]


def test_transfer_report_table_and_plot_cover_every_arm(arms_run):
    run, (_, report, _) = arms_run
    assert json.loads((run / "transfer.json").read_text())["arms"] == report["arms"]
    assert list(report["arms"]) == list(ARMS) and report["held_out"] == 2
    before = json.loads((run / "eval_before.json").read_text())
    for arm, r in report["arms"].items():
        pairs = json.loads((run / ("" if arm == "icm" else f"arms/{arm}") / "pairs.report.json").read_text())
        assert r["pairs"] == pairs["pairs"] and r["label_accuracy"] == pairs["labels_gold_accuracy"]
        assert r["pair_accuracy"] == (pairs["quality"] or {}).get("pair_correct")
        assert r["delta"] == pytest.approx(r["accuracy_after"] - before["accuracy"])
        assert r["delta_ci"]["low"] <= r["delta"] <= r["delta_ci"]["high"]
        if arm != "icm":  # ICM against this arm, on the same held-out questions
            gap = r["icm_advantage"]
            assert gap["delta"] == pytest.approx(report["arms"]["icm"]["accuracy_after"] - r["accuracy_after"])
            assert gap["low"] <= gap["delta"] <= gap["high"]
        assert all(0 <= r[k] <= 1 for k in ("accuracy_after", "label_accuracy", "true_share"))
        assert r["pair_accuracy"] is None if not r["pairs"] else 0 <= r["pair_accuracy"] <= 1
        # the evaluation's answers, per question: unanswered share and accuracy per reference answer
        evaluation = run / ("" if arm == "icm" else f"arms/{arm}") / "eval_after.items.jsonl"
        items = [json.loads(line) for line in evaluation.read_text().splitlines()] if r["pairs"] else None
        if items:
            assert r["unanswered"] == sum(not it["answer"] for it in items) / len(items)
            refs = {it["reference"] for it in items}
            assert r["by_reference"] == {ref: sum(it["correct"] for it in items if it["reference"] == ref)
                                         / sum(it["reference"] == ref for it in items) for ref in refs}
    assert set(report["before"]) == {"unanswered", "by_reference"}
    assert report["arms"]["gold"]["pairs"] and report["arms"]["random"]["pairs"]
    icm = report["arms"]["icm"]
    assert report["accuracy_after"] == icm["accuracy_after"] and report["delta_ci"]["low"] == icm["delta_ci"]["low"]
    assert (run / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    console = Console(record=True, width=150)
    console.print(arms_table(report))
    text = console.export_text()
    for arm in ARMS:
        assert arm in text
    assert "delta [95% CI]" in text and f"{report['arms']['gold']['pairs']}" in text
    gap = report["arms"]["gold"]["icm_advantage"]
    assert "ICM - arm [95% CI]" in text and f"{gap['delta']:+.3f} [{gap['low']:+.3f}, {gap['high']:+.3f}]" in text


def test_rerun_skips_finished_arms(arms_run):
    run, (gold_only, report, rerun) = arms_run

    def names(arm):
        return [s if arm == "icm" else f"{arm}/{s}" for s in ("label", "pairs", "dpo", "eval_after")]
    untrained = [n for arm in ARMS if not report["arms"][arm]["pairs"] for n in names(arm)[2:]]  # no pairs
    assert set(gold_only["timings"]) == {"eval_before", "generate", *names("gold")} and list(gold_only["arms"]) == \
        ["gold"]
    assert gold_only["accuracy_after"] is None and gold_only["dpo"] is None  # no ICM arm in that run
    assert set(report["skipped_this_run"]) == {"eval_before", "generate", *names("gold"), *untrained}
    assert list(report["timings"]) == ["eval_before", "generate"] + [n for s in range(4) for n in
                                                                     (names(a)[s] for a in ARMS)]
    assert all((v is None) == (k in untrained) and (v is None or v > 0) for k, v in report["timings"].items())
    assert set(rerun["skipped_this_run"]) == set(report["timings"]) and rerun["timings"] == report["timings"]
    assert rerun["arms"] == report["arms"]


def test_an_arm_without_pairs_keeps_the_policy_and_the_comparison_goes_on(arms_run, tiny_model_dir, tmp_path):
    run = shared_stages(arms_run[0], tmp_path / "run")
    questions = load_questions(None, task="arithmetic", limit=5, seed=0)
    config = tiny_config(arms=("gold", "random"), pairs=PairsConfig(min_margin=5.0))  # +1/-1 scores: margin 2
    report = run_transfer(questions, tiny_model_dir, tiny_model_dir, run, config, progress=False)
    for arm in ("gold", "random"):
        r = report["arms"][arm]
        assert r["pairs"] == 0 and r["accuracy_after"] == report["accuracy_before"] and r["delta"] == 0
        assert "no preference pairs" in r["note"] and not (run / "arms" / arm / "policy").exists()
    assert report["timings"]["gold/dpo"] is None and "gold/dpo" in report["skipped_this_run"]
    assert (run / "transfer.png").exists()


def test_random_labels_pick_one_answer_per_question_seeded():
    rows = [{"consistency_id": q, "answer": a} for q in range(30) for a in ("1", "2", "2", "", None, "3")]
    labels = random_labels(rows, seed=0)
    assert labels == random_labels(rows, seed=0) and labels != random_labels(rows, seed=1)
    picks = []
    for q in range(30):
        group = [(r, y) for r, y in zip(rows, labels) if r["consistency_id"] == q]
        true = [r for r, y in group if y]
        # one of the 5 answers ("1", "2", "3" and the two empty ones, each an answer of its own)
        assert len(true) == (2 if true[0]["answer"] == "2" else 1)
        assert len({r["answer"] or id(r) for r in true}) == 1
        picks.append(true[0]["answer"] or "")
    assert {"1", "2", "3", ""} <= set(picks)


def test_arms_are_validated(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="arms"):
        TransferConfig(arms=("icm", "oracle"))
    with pytest.raises(ValueError, match="arms"):
        TransferConfig(arms=("gold", "gold"))
    result = CliRunner().invoke(app, ["transfer", "--labeller", tiny_model_dir, "--policy", tiny_model_dir,
                                      "--task", "arithmetic", "--output-dir", str(tmp_path), "--arms", "icm,best"])
    assert result.exit_code == 2 and "arms" in result.output and not (tmp_path / "split.json").exists()


@pytest.fixture(scope="module")
def rounds_run(tiny_model_dir, strong_model_dir, tmp_path_factory):
    """Weak-from-strong: one round, then two in the same directory (round 1 is finished), then a rerun."""
    run = tmp_path_factory.mktemp("rounds") / "run"
    questions = load_questions(None, task="arithmetic", limit=5, seed=0)
    reports = [run_transfer(questions, strong_model_dir, tiny_model_dir, run, tiny_config(rounds=rounds),
                            progress=False) for rounds in (1, 2, 2)]
    return run, reports


ROUND_KEYS = {"round", "accuracy_after", "delta", "delta_ci", "label_accuracy", "pairs", "candidate_accuracy",
              "generator", "labeller", "trained_from"}


def test_two_rounds_give_two_objects_against_the_base_policy(rounds_run, tiny_model_dir, strong_model_dir):
    run, (one, two, _) = rounds_run
    assert len(one["rounds"]) == 1 and one["rounds"][0]["accuracy_after"] == one["accuracy_after"]
    assert [r["round"] for r in two["rounds"]] == [1, 2]
    first, second = two["rounds"]
    assert ROUND_KEYS <= set(first) and ROUND_KEYS | {"vs_previous"} <= set(second)
    assert first == one["rounds"][0] == {"round": 1, **two["arms"]["icm"], **{k: first[k] for k in (
        "candidate_accuracy", "generator", "labeller", "trained_from")}}
    assert first["pairs"] > 0 and second["pairs"] == json.loads((run / "round-2" / "pairs.report.json").read_text())[
        "pairs"] > 0
    before = json.loads((run / "eval_before.json").read_text())
    after = {r: json.loads((run / d / "eval_after.json").read_text()) for r, d in ((1, "."), (2, "round-2"))}
    assert after[2]["model"] == str(run / "round-2" / "policy")
    assert [x["id"] for x in after[2]["results"]] == [x["id"] for x in before["results"]]  # the same held-out set
    for r, entry in zip((1, 2), two["rounds"]):
        assert entry["accuracy_after"] == after[r]["accuracy"]
        assert entry["delta"] == pytest.approx(after[r]["accuracy"] - before["accuracy"])
        assert entry["delta_ci"]["low"] <= entry["delta"] <= entry["delta_ci"]["high"]
    assert second["vs_previous"]["delta"] == pytest.approx(after[2]["accuracy"] - after[1]["accuracy"])
    assert second["vs_previous"]["low"] <= second["vs_previous"]["delta"] <= second["vs_previous"]["high"]
    labels = read_records(run / "round-2" / "labels.parquet")
    assert second["label_accuracy"] == pytest.approx(sum(x["icm_label"] == x["label"] for x in labels) / len(labels))
    # weak-from-strong: the fixed strong labeller labels every round; round 2 trains on the merged round-1 policy
    assert read_parquet_metadata(run / "round-2" / "labels.parquet")["model"] == strong_model_dir == second["labeller"]
    dpo = json.loads((run / "round-2" / "policy" / "icm_dpo.json").read_text())
    assert dpo["base_model"] == str(run / "round-2" / "start") == second["trained_from"]
    assert dpo["dataset"] == str(run / "round-2" / "pairs.parquet")
    assert (run / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    console = Console(record=True, width=150)
    console.print(arms_table(two))
    assert "icm round 2" in console.export_text()


def test_round_two_samples_from_the_round_one_policy(rounds_run, tiny_model_dir):
    import torch

    from icm.dpo.training import load_trained_model
    from icm.models import load_model

    run, (_, two, _) = rounds_run
    start = run / "round-2" / "start"
    candidates = read_records(run / "round-2" / "candidates.parquet")
    sampled = {c["generator"] for c in candidates} - {"reference"}  # tiny_config adds the reference solutions
    assert sampled == {str(start)} == {two["rounds"][1]["generator"]}
    split = json.loads((run / "split.json").read_text())
    assert {c["question_id"] for c in candidates} == set(split["train"])  # fresh candidates, training questions
    merged = load_model(str(start), dtype="fp32", device="cpu")[0].state_dict()
    trained = load_trained_model(str(run / "policy"), dtype="fp32", device="cpu")[0].state_dict()
    base = load_model(tiny_model_dir, dtype="fp32", device="cpu")[0].state_dict()
    assert merged.keys() == trained.keys()
    assert all(torch.equal(merged[k], trained[k]) for k in merged)  # round 1's adapters merged in ...
    assert not all(torch.equal(merged[k], base[k]) for k in merged)  # ... which changed the base policy


def test_rerun_of_two_rounds_skips_every_stage(rounds_run):
    run, (one, two, rerun) = rounds_run
    round_two = [f"round-2/{s}" for s in ("merge", "generate", "label", "pairs", "dpo", "eval_after")]
    assert list(two["timings"]) == list(one["timings"]) + round_two
    assert set(two["skipped_this_run"]) == set(one["timings"])  # round 1 was finished: only round 2 ran
    assert all(two["timings"][name] > 0 for name in round_two)
    assert set(rerun["skipped_this_run"]) == set(two["timings"]) and rerun["timings"] == two["timings"]
    assert rerun["rounds"] == two["rounds"]


def test_self_improvement_round_two_is_labelled_by_the_improved_policy(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    questions = load_questions(None, task="arithmetic", limit=5, seed=0)
    report = run_transfer(questions, tiny_model_dir, tiny_model_dir, run, tiny_config(rounds=2, rounds_from="base"),
                          progress=False)
    second = report["rounds"][1]
    start = str(run / "round-2" / "start")
    assert report["mode"] == "self-improvement" and second["labeller"] == second["generator"] == start
    assert read_parquet_metadata(run / "round-2" / "labels.parquet")["model"] == start
    assert second["pairs"] > 0  # rounds_from base: round 2's pairs train the base policy
    assert json.loads((run / "round-2" / "policy" / "icm_dpo.json").read_text())["base_model"] == tiny_model_dir
    assert second["trained_from"] == tiny_model_dir


def test_rounds_are_validated(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="rounds"):
        TransferConfig(rounds=0)
    with pytest.raises(ValueError, match="icm"):
        TransferConfig(rounds=2, arms=("gold",))
    with pytest.raises(ValueError, match="generator"):
        TransferConfig(rounds=2, generator="labeller")
    with pytest.raises(ValueError, match="rounds_from"):
        TransferConfig(rounds_from="last")
    result = CliRunner().invoke(app, ["transfer", "--labeller", tiny_model_dir, "--policy", tiny_model_dir,
                                      "--task", "arithmetic", "--output-dir", str(tmp_path), "--arms", "gold",
                                      "--rounds", "2"])
    assert result.exit_code == 2 and "icm" in result.output and not (tmp_path / "split.json").exists()
