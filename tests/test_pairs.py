"""icm pairs: pairing rules and report counts, file schema/metadata through `datasets`, TRL's DPOTrainer on the
output, the train/test split, and bad input through the CLI."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from icm.cli import app
from icm.config import PairsConfig
from icm.data.io import InputError, read_parquet_metadata, write_parquet
from icm.data.pairs import (
    BELOW_AGREEMENT,
    BELOW_MARGIN,
    CONTRADICTORY,
    DUPLICATE,
    IDENTICAL,
    NO_FALSE,
    NO_TRUE,
    NOT_BEST,
    OVER_MAX,
    build_pairs,
    load_labels,
    split_pairs,
    write_pairs,
)

runner = CliRunner()
LABELS_META = {"model": "smollm2-135m", "template": "Claim: {choice}\nI think this claim is",
               "config": {"alpha": 50.0, "iterations": 200}, "seed": 3, "command": "icm label claims.jsonl",
               "gold_accuracy": 0.75}


def claim(qid, choice, icm_label, score, gold=None, question=None, **extra):
    return {"question": question or f"Question {qid}?", "choice": choice, "consistency_id": qid,
            "answer": choice[-1], "icm_label": icm_label, "icm_score": score, "label": gold, **extra}


def pairs_of(pairs):
    return [(p["question_id"], p["chosen"], p["rejected"]) for p in pairs]


def assert_accounted(report):
    assert report["candidate_pairs"] == report["pairs"] + sum(report["dropped"].values())


def test_all_strategy_pairs_every_true_with_every_false_and_reports_skipped_groups():
    rows = [claim(1, "sol a1", True, 2.0), claim(1, "sol a2", False, -1.0), claim(1, "sol a3", True, 0.5),
            claim(1, "sol a4", False, -3.0),
            claim(2, "sol b1", True, 1.0), claim(2, "sol b2", True, 0.3),  # no False
            claim(3, "sol c1", False, -1.0),  # no True
            claim(4, "sol d1", False, -2.0), claim(4, "sol d2", False, -0.1)]
    pairs, report = build_pairs(rows, PairsConfig())
    # highest margin first
    assert pairs_of(pairs) == [("1", "sol a1", "sol a4"), ("1", "sol a3", "sol a4"), ("1", "sol a1", "sol a2"),
                               ("1", "sol a3", "sol a2")]
    assert [p["margin"] for p in pairs] == [5.0, 3.5, 3.0, 1.5]
    assert pairs[0]["chosen_score"] == 2.0 and pairs[0]["rejected_score"] == -3.0
    assert pairs[0]["chosen_answer"] == "1" and pairs[0]["rejected_answer"] == "4"
    assert report["questions_skipped"] == {NO_FALSE: 1, NO_TRUE: 2}
    assert report["questions"] == 4 and report["questions_with_pairs"] == 1
    assert report["label_balance"] == {"true": 4, "false": 5}
    assert report["dropped"] == {} and report["pairs"] == 4
    assert report["pairs_per_question"] == {"mean": 4.0, "min": 4, "max": 4}
    assert report["quality"] is None and "chosen_is_correct" not in pairs[0]
    assert pairs[0]["prompt"] == "Question 1?\n"  # standard format: TRL concatenates prompt + chosen
    assert_accounted(report)


def test_ties_keep_row_order_and_max_per_question_counts_the_rest():
    rows = [claim(1, "A", True, 1.0), claim(1, "B", True, 1.0), claim(1, "X", False, -1.0),
            claim(2, "C", True, 1.0), claim(2, "Y", False, -1.0), claim(2, "Z", False, -1.0)]
    pairs, report = build_pairs(rows, PairsConfig(max_per_question=1))
    assert pairs_of(pairs) == [("1", "A", "X"), ("2", "C", "Y")]
    assert report["dropped"] == {OVER_MAX: 2}
    assert_accounted(report)


def test_duplicates_and_identical_texts_are_counted_not_kept():
    rows = [claim(1, "A", True, 2.0), claim(1, "A", True, 1.0),  # same text twice
            claim(1, "X", False, -1.0), claim(1, "B", True, 0.5), claim(1, "B", False, -0.5)]  # B both ways
    pairs, report = build_pairs(rows, PairsConfig())
    assert pairs_of(pairs) == [("1", "A", "X"), ("1", "A", "B"), ("1", "B", "X")]
    assert pairs[0]["chosen_score"] == 2.0  # the most confident copy is the one kept
    # A-X (dup), A-B (dup of the kept A-B), B-B (identical)
    assert report["dropped"] == {DUPLICATE: 2, IDENTICAL: 1}
    assert report["candidate_pairs"] == 6
    assert_accounted(report)


def test_best_margin_takes_most_confident_true_against_most_confident_false():
    rows = [claim(1, "A", True, 0.5), claim(1, "B", True, 2.0), claim(1, "C", True, 1.0),
            claim(1, "X", False, -0.2), claim(1, "Y", False, -3.0)]
    pairs, report = build_pairs(rows, PairsConfig(strategy="best-margin"))
    assert pairs_of(pairs) == [("1", "B", "Y")] and pairs[0]["margin"] == 5.0
    assert report["dropped"] == {NOT_BEST: 5}
    # more per question: the next most confident ones, each response used once
    pairs, report = build_pairs(rows, PairsConfig(strategy="best-margin", max_per_question=2))
    assert pairs_of(pairs) == [("1", "B", "Y"), ("1", "C", "X")]
    assert report["dropped"] == {NOT_BEST: 4}
    assert_accounted(report)


def test_min_margin_filters_and_counts():
    rows = [claim(1, "A", True, 1.0), claim(1, "X", False, 0.5), claim(1, "Y", False, -2.0),
            claim(2, "B", True, 0.1), claim(2, "Z", False, 0.0)]
    pairs, report = build_pairs(rows, PairsConfig(min_margin=1.0))
    assert pairs_of(pairs) == [("1", "A", "Y")]
    assert report["dropped"] == {BELOW_MARGIN: 2}
    assert report["questions_with_pairs"] == 1
    assert_accounted(report)


def test_margin_quantile_drops_the_least_confident_pairs_whatever_the_scale():
    rows = [claim(1, "A", True, 1.0), claim(1, "X", False, 0.5), claim(1, "Y", False, -2.0),
            claim(2, "B", True, 0.1), claim(2, "Z", False, 0.0)]  # margins 3.0, 0.5, 0.1
    for scale in (1.0, 100.0):
        scaled = [r | {"icm_score": r["icm_score"] * scale} for r in rows]
        pairs, report = build_pairs(scaled, PairsConfig(margin_quantile=0.5))
        assert pairs_of(pairs) == [("1", "A", "Y"), ("1", "A", "X")] and report["dropped"] == {BELOW_MARGIN: 1}
        assert_accounted(report)
    pairs, _ = build_pairs(rows, PairsConfig(margin_quantile=0.5, min_margin=1.0))  # the higher floor wins
    assert pairs_of(pairs) == [("1", "A", "Y")]
    with pytest.raises(ValueError, match="margin_quantile"):
        PairsConfig(margin_quantile=1.0)


def test_comparison_claims_follow_the_accepted_ordering():
    rows = [claim(1, "resp A", True, 2.0, gold=True, choice_2="resp B"),
            claim(1, "resp B", False, -1.0, gold=False, choice_2="resp A"),  # the reverse claim: merged
            claim(2, "resp C", False, -0.5, gold=True, choice_2="resp D"),  # False: D preferred, gold says C
            claim(3, "resp E", True, 1.0, choice_2="resp F"), claim(3, "resp F", True, 0.4, choice_2="resp E"),
            claim(4, "resp G", True, 1.0, choice_2="resp H"), claim(4, "resp G", True, 0.9, choice_2="resp H")]
    pairs, report = build_pairs(rows, PairsConfig())
    assert pairs_of(pairs) == [("1", "resp A", "resp B"), ("2", "resp D", "resp C"), ("4", "resp G", "resp H")]
    a, d, g = pairs
    assert (a["chosen_score"], a["rejected_score"], a["margin"]) == (2.0, -1.0, 3.0)
    assert (d["chosen_score"], d["rejected_score"], d["margin"]) == (0.5, -0.5, 1.0)
    assert g["margin"] == 2.0
    assert (a["chosen_is_correct"], a["rejected_is_correct"]) == (True, False)
    assert (d["chosen_is_correct"], d["rejected_is_correct"]) == (False, True)
    assert g["chosen_is_correct"] is None
    assert report["dropped"] == {CONTRADICTORY: 1, DUPLICATE: 1}
    assert report["merged_reverse_claims"] == 1
    assert report["quality"]["pairs_with_gold"] == 2 and report["quality"]["pair_correct"] == 0.5
    assert report["quality"]["pair_inverted"] == 0.5


def test_gold_quality_figures():
    rows = [claim(1, "A", True, 2.0, gold=True), claim(1, "B", True, 1.0, gold=False),
            claim(1, "X", False, -1.0, gold=False), claim(1, "Y", False, -2.0, gold=True)]
    pairs, report = build_pairs(rows, PairsConfig())
    assert [(p["chosen_is_correct"], p["rejected_is_correct"]) for p in pairs] == [
        (True, True), (True, False), (False, True), (False, False)]
    q = report["quality"]
    assert (q["chosen_correct"], q["rejected_wrong"], q["pair_correct"], q["pair_inverted"]) == (0.5, 0.5, .25, .25)
    assert report["labels_gold_accuracy"] == 0.5


def test_conversational_format_is_trl_messages():
    pairs, _ = build_pairs([claim(1, "A", True, 1.0, prompt="Solve: 1+1"), claim(1, "X", False, -1.0)],
                           PairsConfig(format="conversational"))
    assert pairs[0]["prompt"] == [{"role": "user", "content": "Solve: 1+1"}]  # the claims' prompt wins over question
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "A"}]
    assert pairs[0]["rejected"] == [{"role": "assistant", "content": "X"}]


def test_config_rejects_bad_values():
    for bad in ({"strategy": "random"}, {"format": "chatml"}, {"max_per_question": 0}, {"test_size": 1.5},
                {"test_size": 0}):
        with pytest.raises(ValueError):
            PairsConfig(**bad)


def many_questions(n=10, gold=True):
    rows = []
    for q in range(n):
        rows += [claim(q, f"right {q}", True, 1.0 + q, gold=True if gold else None),
                 claim(q, f"wrong {q}", False, -1.0, gold=False if gold else None),
                 claim(q, f"wrong2 {q}", False, -0.5, gold=True if gold else None)]
    return rows


def test_split_is_by_question_seeded_and_keeps_equal_prompts_together():
    rows = many_questions(10)
    rows += [claim(99, "right 99", True, 1.0, question="Question 3?"), claim(99, "wrong 99", False, -1.0)]
    pairs, _ = build_pairs(rows, PairsConfig())
    splits = split_pairs(pairs, 0.3, seed=1)
    assert len(splits["train"]) + len(splits["test"]) == len(pairs)
    train_q = {p["question_id"] for p in splits["train"]}
    test_q = {p["question_id"] for p in splits["test"]}
    assert not train_q & test_q
    assert not {p["prompt"] for p in splits["train"]} & {p["prompt"] for p in splits["test"]}
    assert ("3" in test_q) == ("99" in test_q)  # same prompt, different id: same split
    assert len(test_q) in (3, 4)  # ceil(0.3 * 10 units); 3 and 99 count as one unit
    assert split_pairs(pairs, 0.3, seed=1) == splits
    assert any(split_pairs(pairs, 0.3, seed=s)["test"] != splits["test"] for s in range(2, 6))
    assert len({p["question_id"] for p in split_pairs(pairs, 2, seed=0)["test"]}) in (2, 3)
    with pytest.raises(ValueError):
        split_pairs(pairs[:1], 0.5)


def write_labels(path, rows, metadata=LABELS_META):
    write_parquet(path, pa.Table.from_pylist(rows), metadata)
    return path


def test_write_pairs_round_trips_through_datasets(tmp_path):
    from datasets import List, Value, load_dataset

    labels = write_labels(tmp_path / "labels.parquet", many_questions(6))
    rows, metadata = load_labels(labels)
    assert metadata == LABELS_META
    for fmt in ("standard", "conversational"):
        config = PairsConfig(format=fmt, test_size=0.5, seed=0)
        pairs, report = build_pairs(rows, config)
        out = tmp_path / fmt / "pairs.parquet"
        files = write_pairs(out, pairs, report, config, labels_metadata=metadata,
                            command="icm pairs labels.parquet --token hf_abcdef123456", source=labels)
        assert files == {"train": out, "test": out.with_name("pairs.test.parquet")}
        ds = load_dataset("parquet", data_files={k: str(v) for k, v in files.items()}, cache_dir=str(tmp_path / "c"))
        assert ds["train"].num_rows + ds["test"].num_rows == len(pairs) == 12
        assert not set(ds["train"]["question_id"]) & set(ds["test"]["question_id"])
        text = Value("string") if fmt == "standard" else List({"role": Value("string"), "content": Value("string")})
        features = ds["train"].features
        for column in ("prompt", "chosen", "rejected"):
            assert features[column] == text
        assert features["margin"] == Value("float64") and features["chosen_is_correct"] == Value("bool")
        assert features["question_id"] == Value("string")
        meta = read_parquet_metadata(out)
        assert meta["labels"] == LABELS_META and meta["pairs"]["format"] == fmt and meta["split"] == "train"
        assert meta["splits"] == {"train": "pairs.parquet", "test": "pairs.test.parquet"}
        assert meta["report"]["splits"]["train"]["pairs"] == ds["train"].num_rows
        assert "hf_abcdef123456" not in meta["command"] and "--token ***" in meta["command"]
        saved = json.loads(out.with_name("pairs.report.json").read_text())
        assert saved["pairs"] == 12 and saved["splits"]["test"]["pairs"] == ds["test"].num_rows
        assert saved["quality"]["pair_correct"] == pytest.approx(0.5)


@pytest.mark.parametrize("fmt", ["standard", "conversational"])
def test_dpo_trainer_accepts_the_file_unchanged(tmp_path, tiny_model_dir, fmt):
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    labels = write_labels(tmp_path / "labels.parquet", many_questions(2))
    result = runner.invoke(app, ["pairs", str(labels), "-o", str(tmp_path / "pairs.parquet"), "--format", fmt])
    assert result.exit_code == 0, result.output
    ds = load_dataset("parquet", data_files=str(tmp_path / "pairs.parquet"), split="train",
                      cache_dir=str(tmp_path / "cache"))
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), bf16=False, report_to=[], max_steps=1,
                     per_device_train_batch_size=2, max_length=64, save_strategy="no", logging_steps=1,
                     dataloader_pin_memory=False)
    trainer = DPOTrainer(model=tiny_model_dir, args=args, train_dataset=ds,
                         processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    first = trainer.train_dataset[0]
    assert len(first["chosen_ids"]) > 0 and len(first["rejected_ids"]) > 0 and len(first["prompt_ids"]) > 0
    out = trainer.train()
    assert out.global_step == 1 and math.isfinite(out.training_loss)


def test_cli_pairs_writes_files_report_and_metadata(tmp_path):
    labels = write_labels(tmp_path / "labels.parquet", many_questions(4))
    out = tmp_path / "pairs.parquet"
    result = runner.invoke(app, ["pairs", str(labels), "--output", str(out), "--strategy", "best-margin",
                                 "--min-margin", "1.6"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "pairs.report.json").read_text())
    # best pair per question: margin 2 + q; the other pair (margin 1.5 + q) is below 1.6 for q = 0 only
    assert report["pairs"] == 4 and report["dropped"] == {NOT_BEST: 3, BELOW_MARGIN: 1}
    assert "pair correct" in result.output and "100.0%" in result.output
    meta = read_parquet_metadata(out)
    assert meta["command"].startswith("icm pairs") and "--strategy best-margin" in meta["command"]
    assert meta["labels"]["model"] == "smollm2-135m" and meta["pairs"]["min_margin"] == 1.6


def test_cli_reads_jsonl_labels_with_int_gold(tmp_path):
    path = tmp_path / "labels.jsonl"
    rows = [claim(1, "A", True, 1.0), claim(1, "X", False, -1.0)]
    rows[0]["label"], rows[1]["label"] = 1, 0
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = runner.invoke(app, ["pairs", str(path), "-o", str(tmp_path / "p.parquet")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "p.report.json").read_text())["quality"]["pair_correct"] == 1.0


@pytest.mark.parametrize("mutate, expected", [
    (lambda rows: [r.pop("icm_label") for r in rows], "row 1, field 'icm_label'"),
    (lambda rows: rows[1].update(icm_label="maybe"), "row 2, field 'icm_label'"),
    (lambda rows: [r.pop("consistency_id") for r in rows], "row 1, field 'consistency_id'"),
    (lambda rows: rows[2].update(choice=""), "row 3, field 'choice'"),
    (lambda rows: rows[1].update(icm_score="high"), "row 2, field 'icm_score'"),
    (lambda rows: rows[0].update(label="yes"), "row 1, field 'label'"),
])
def test_cli_bad_labels_exit_2_naming_row_and_field_without_overwriting(tmp_path, mutate, expected):
    rows = many_questions(2)
    mutate(rows)
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "pairs.parquet"
    out.write_bytes(b"previous")
    result = runner.invoke(app, ["pairs", str(labels), "-o", str(out)])
    assert result.exit_code == 2
    line = result.output.strip()
    assert "\n" not in line and str(labels) in line and expected in line
    assert out.read_bytes() == b"previous" and not (tmp_path / "pairs.report.json").exists()


def test_cli_missing_file_bad_options_and_no_pairs(tmp_path):
    result = runner.invoke(app, ["pairs", str(tmp_path / "nope.parquet"), "-o", str(tmp_path / "p.parquet")])
    assert result.exit_code == 2 and "file not found" in result.output
    labels = write_labels(tmp_path / "labels.parquet", [claim(1, "A", True, 1.0), claim(2, "B", True, 1.0)])
    result = runner.invoke(app, ["pairs", str(labels), "-o", str(tmp_path / "p.parquet")])
    assert result.exit_code == 2 and f"{NO_FALSE}: 2" in result.output and not (tmp_path / "p.parquet").exists()
    result = runner.invoke(app, ["pairs", str(labels), "-o", str(tmp_path / "p.parquet"), "--strategy", "random"])
    assert result.exit_code == 2 and "strategy" in result.output
    labels = write_labels(tmp_path / "one.parquet", [claim(1, "A", True, 1.0), claim(1, "X", False, 0.0)])
    result = runner.invoke(app, ["pairs", str(labels), "-o", str(tmp_path / "p.parquet"), "--test-size", "0.5"])
    assert result.exit_code == 2 and "test" in result.output and not (tmp_path / "p.parquet").exists()


def test_load_labels_rejects_missing_choice_column(tmp_path):
    labels = write_labels(tmp_path / "labels.parquet", [{"question": "q", "consistency_id": 1, "icm_label": True,
                                                         "icm_score": 1.0}])
    with pytest.raises(InputError, match=r"row 1, field 'choice'"):
        load_labels(labels)


def test_min_agreement_leaves_out_claims_the_restarts_disagree_on(tmp_path):
    rows = [claim(1, "A", True, 1.0, icm_agreement=1.0), claim(1, "X", False, -1.0, icm_agreement=2 / 3),
            claim(1, "Y", False, -2.0, icm_agreement=1.0),
            claim(2, "B", True, 0.5, icm_agreement=2 / 3), claim(2, "Z", False, -0.5, icm_agreement=1.0)]
    everything, _ = build_pairs(rows, PairsConfig())
    assert len(everything) == 3
    pairs, report = build_pairs(rows, PairsConfig(min_agreement=1.0))
    assert pairs_of(pairs) == [("1", "A", "Y")]
    assert report["dropped"] == {BELOW_AGREEMENT: 2} and report["questions_with_pairs"] == 1
    assert_accounted(report)
    assert len(build_pairs(rows, PairsConfig(min_agreement=0.5))[0]) == 3
    with pytest.raises(ValueError, match="icm_agreement"):
        build_pairs([{k: v for k, v in r.items() if k != "icm_agreement"} for r in rows], PairsConfig(min_agreement=1))
    with pytest.raises(ValueError, match="min_agreement"):
        PairsConfig(min_agreement=1.5)
    labels = write_labels(tmp_path / "labels.parquet", rows)
    out = tmp_path / "pairs.parquet"
    result = runner.invoke(app, ["pairs", str(labels), "-o", str(out), "--min-agreement", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "pairs.report.json").read_text())["pairs"] == 1
    assert "--min-agreement 1.0" in read_parquet_metadata(out)["command"]
    plain = write_labels(tmp_path / "plain.parquet", [claim(1, "A", True, 1.0), claim(1, "X", False, -1.0)])
    result = runner.invoke(app, ["pairs", str(plain), "-o", str(tmp_path / "p.parquet"), "--min-agreement", "1"])
    assert result.exit_code == 2 and "icm_agreement" in result.output
    bad = write_labels(tmp_path / "bad.parquet", [claim(1, "A", True, 1.0, icm_agreement=1.5),
                                                  claim(1, "X", False, -1.0, icm_agreement=1.0)])
    result = runner.invoke(app, ["pairs", str(bad), "-o", str(tmp_path / "b.parquet")])
    assert result.exit_code == 2 and "row 1, field 'icm_agreement'" in result.output


def test_kto_format_keeps_every_labelled_candidate_including_one_sided_questions():
    rows = many_questions(2) + [claim(7, "all true A", True, 0.5, gold=True), claim(7, "all true B", True, 0.2,
                                                                                       gold=False),
                                claim(8, "all false", False, -0.3, gold=False),
                                claim(8, "all false", False, -0.3, gold=False)]  # an exact duplicate
    paired, _ = build_pairs(rows, PairsConfig())
    assert {p["question_id"] for p in paired} == {"0", "1"}  # DPO drops questions 7 and 8
    examples, report = build_pairs(rows, PairsConfig(format="kto"))
    assert [(e["question_id"], e["completion"], e["label"]) for e in examples] == [
        (str(r["consistency_id"]), r["choice"], r["icm_label"]) for r in rows[:-1]]
    assert all(set(e) == {"prompt", "completion", "label", "question_id", "score", "answer", "is_correct"}
               for e in examples)
    assert examples[0]["prompt"] == "Question 0?\n" and examples[0]["score"] == 1.0
    assert report["examples"] == 9 and (report["desirable"], report["undesirable"]) == (4, 5)
    assert report["questions_by_labels"] == {"all_true": 1, "all_false": 1, "mixed": 2}
    assert report["dropped"] == {DUPLICATE: 1}
    # gold: the True-labelled right 0/right 1/all true A are correct, all true B is not; of the False ones, wrong2 0
    # and wrong2 1 are really correct
    assert report["quality"]["desirable_correct"] == pytest.approx(3 / 4)
    assert report["quality"]["undesirable_wrong"] == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="kto"):
        PairsConfig(format="kto", strategy="best-margin")
    with pytest.raises(ValueError, match="kto"):
        PairsConfig(format="kto", min_margin=1.0)


def test_cli_pairs_kto_writes_trl_unpaired_files_that_kto_trainer_takes(tmp_path, tiny_model_dir):
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    labels = write_labels(tmp_path / "labels.parquet", many_questions(4) + [claim(9, "only", False, -1.0)])
    out = tmp_path / "kto.parquet"
    result = runner.invoke(app, ["pairs", str(labels), "-o", str(out), "--format", "kto", "--eval-size", "1"])
    assert result.exit_code == 0, result.output
    assert "wrote 13 examples" in result.output.replace("\n", " ") and "desirable really correct" in result.output
    report = json.loads((tmp_path / "kto.report.json").read_text())
    assert report["splits"]["train"]["examples"] + report["splits"]["test"]["examples"] == 13
    ds = load_dataset("parquet", data_files=str(out), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.features["label"].dtype == "bool" and ds.features["completion"].dtype == "string"
    assert read_parquet_metadata(out)["pairs"]["format"] == "kto"
    args = KTOConfig(output_dir=str(tmp_path / "kto"), bf16=False, report_to=[], max_steps=1,
                     per_device_train_batch_size=2, max_length=64, save_strategy="no", logging_steps=1,
                     dataloader_pin_memory=False, gradient_checkpointing=False)
    trainer = KTOTrainer(model=tiny_model_dir, args=args, train_dataset=ds,
                         processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    out = trainer.train()
    assert out.global_step == 1 and math.isfinite(out.training_loss)
