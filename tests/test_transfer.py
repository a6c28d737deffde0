"""icm transfer: generate -> label -> pairs -> dpo -> eval before/after on the tiny fixture, resumable."""

from __future__ import annotations

import json

import pytest
from conftest import build_tiny_model
from typer.testing import CliRunner

from cli import app
from data.io import read_parquet_metadata, read_records
from data.tasks import arithmetic_questions
from dpo.transfer import split_questions

ARGS = ["--task", "arithmetic", "--limit", "5", "--eval-size", "2", "--num-candidates", "3", "--temperature", "1.0",
        "--max-new-tokens", "10", "--icm-iterations", "6", "--max-steps", "2", "--batch-size", "2",
        "--max-length", "384", "--bootstrap-samples", "200", "--dtype", "fp32"]



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
    assert f"ICM labeller: `{strong_model_dir}`" in (run / "policy" / "README.md").read_text()
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
