import json
import random
import threading

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from icm.backends import InProcessBackend
from icm.cli import app
from icm.config import ICMConfig, SourceConfig
from icm.data.claims import claims_from_records
from icm.data.io import read_parquet_metadata
from icm.label import label_file, progress_text, zero_shot_records
from icm.models import load_model
from icm.scoring import ClaimScorer
from icm.search import ICMSearch, label_claims, make_batches

runner = CliRunner()


def arithmetic_claims(n_questions: int = 4) -> list[dict]:
    rows = []
    for q in range(n_questions):
        a, b = 2 + q, 3 + 2 * q
        for d in (0, 1, 3):
            rows.append({"question": f"What is {a} + {b}?", "choice": f"The answer is {a + b + d}.",
                         "consistency_id": q, "answer": str(a + b + d), "label": d == 0})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir, dtype="fp32")


def run_search(tiny, rows, **kwargs):
    model, tokenizer = tiny
    backend = InProcessBackend(model, tokenizer)
    config = ICMConfig(iterations=kwargs.pop("iterations", 30), seed=kwargs.pop("seed", 0), **kwargs)
    return label_claims(claims_from_records(rows), backend, config, model_name="tiny")


def test_search_labels_every_claim_and_respects_consistency(tiny):
    rows = arithmetic_claims()
    results, summary = run_search(tiny, rows, iterations=60)
    assert len(results) == len(rows)
    assert all(isinstance(r["icm_label"], bool) and isinstance(r["icm_score"], float) for r in results)
    assert summary["constraints"] == 4 * 3  # three pairwise "different answers" rules per question
    assert summary["proposals"] > 0 and 0 <= summary["acceptance_rate"] <= 1
    assert summary["forward_tokens"] > 0


def test_search_never_reads_gold(tiny):
    rows = arithmetic_claims()
    shuffled = [dict(r, label=random.Random(i).random() < 0.5) for i, r in enumerate(rows)]
    without = [{k: v for k, v in r.items() if k != "label"} for r in rows]
    labels = [[r["icm_label"] for r in run_search(tiny, variant)[0]] for variant in (rows, shuffled, without)]
    assert labels[0] == labels[1] == labels[2]


def test_same_seed_same_labels_other_seed_other_search(tiny):
    rows = arithmetic_claims()
    a, b, c = (run_search(tiny, rows, seed=s)[1]["trajectories"] for s in (0, 0, 1))
    assert a == b and a != c


def test_batches_keep_groups_whole():
    claims = claims_from_records(arithmetic_claims(5))
    batches = make_batches(claims, batch_size=7, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(15))
    for batch in batches:
        assert len(batch) <= 7
        groups = {claims[i].group for i in batch}
        assert all(sum(c.group == g for c in claims) == sum(claims[i].group == g for i in batch) for g in groups)


def test_unreached_claims_get_a_prediction_and_are_marked(tiny):
    results, summary = run_search(tiny, arithmetic_claims(), iterations=3, initial_labels=2)
    searched = [r["icm_searched"] for r in results]
    assert 0 < sum(searched) < len(results) == summary["claims"]
    assert all(r["icm_label"] == (r["icm_score"] > 0) for r in results if not r["icm_searched"])


@pytest.mark.parametrize("exact_every, demo_order", [(1, "fixed"), (4, "fixed"), (4, "labelling")])
def test_resume_after_interruption_gives_identical_labels(tiny, tmp_path, exact_every, demo_order):
    model, tokenizer = tiny
    backend = InProcessBackend(model, tokenizer)
    claims = claims_from_records(arithmetic_claims(6))
    config = ICMConfig(iterations=40, batch_size=9, seed=3, exact_every=exact_every, demo_order=demo_order)
    expected, _ = label_claims(claims, backend, config, model_name="tiny")

    def interrupt(info):
        if info["batch"] == 1 and info["iteration"] == 10:  # in the middle of the second batch
            raise KeyboardInterrupt

    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        label_claims(claims, backend, config, run_dir=run_dir, model_name="tiny", progress=interrupt)
    state = json.loads((run_dir / "checkpoint.json").read_text())
    assert list(state["done"]) == ["0"] and list(state["current"]) == ["1"] and state["current"]["1"]["iteration"] == 10
    resumed, _ = label_claims(claims, backend, config, run_dir=run_dir, resume=True, model_name="tiny")
    assert resumed == expected
    other = ICMConfig(iterations=40, batch_size=9, seed=4, exact_every=exact_every, demo_order=demo_order)
    with pytest.raises(ValueError, match="other claims, model or settings"):
        label_claims(claims, backend, other, run_dir=run_dir, resume=True, model_name="tiny")


class TwoLanes(InProcessBackend):
    """The in-process model with two lanes, as two servers have: two batches searched at the same time, each lane
    with its own scorer; records the lane each batch finished on."""

    lanes = 2

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer)
        self.finished: list[int | None] = []

    def batch_done(self, lane: int | None) -> None:
        self.finished.append(lane)


def test_two_lanes_search_batches_at_the_same_time_and_give_the_sequential_labels(tiny):
    model, tokenizer = tiny
    backend = InProcessBackend(model, tokenizer)
    claims = claims_from_records(arithmetic_claims(6))
    config = ICMConfig(iterations=30, batch_size=6, seed=3)  # three batches of two questions
    expected, summary = label_claims(claims, backend, config, model_name="tiny")
    lanes, seen, both = TwoLanes(model, tokenizer), [], threading.Barrier(2)

    def record(info):  # batches 0 and 1 wait for each other after their first step: both in flight, surely
        seen.append(info)
        if info["batch"] < 2 and info["iteration"] == 1:
            both.wait(timeout=60)

    results, concurrent = label_claims(claims, lanes, config, model_name="tiny", progress=record)
    assert results == expected and concurrent["trajectories"] == summary["trajectories"]
    assert len(lanes.finished) == 3 and set(lanes.finished) == {0, 1}
    assert max(len(info["running"]) for info in seen) == 2
    assert label_claims(claims, backend, config, model_name="tiny")[0] == expected


def test_run_stopped_with_two_batches_in_flight_resumes_to_the_same_labels(tiny, tmp_path):
    model, tokenizer = tiny
    backend = InProcessBackend(model, tokenizer)
    claims = claims_from_records(arithmetic_claims(6))
    config = ICMConfig(iterations=30, batch_size=6, seed=3)
    expected, _ = label_claims(claims, backend, config, model_name="tiny")

    both = threading.Barrier(2)

    def interrupt(info):  # batches 0 and 1 both reach step 5, then Ctrl-C lands in both lanes
        if info["iteration"] == 5:
            both.wait(timeout=60)
            raise KeyboardInterrupt

    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        label_claims(claims, TwoLanes(model, tokenizer), config, run_dir=run_dir, model_name="tiny",
                     progress=interrupt)
    state = json.loads((run_dir / "checkpoint.json").read_text())
    assert state["format"] == 4 and state["done"] == {}
    assert {b: s["iteration"] for b, s in state["current"].items()} == {"0": 5, "1": 5}
    resumed, _ = label_claims(claims, TwoLanes(model, tokenizer), config, run_dir=run_dir, resume=True,
                              model_name="tiny")
    assert resumed == expected


def test_progress_shows_batches_done_and_each_running_one():
    info = {"batch": 2, "batches": 5, "iteration": 7, "iterations": 40, "utility": -1.5, "acceptance": 0.25,
            "labels": {0: True, 1: False}, "done": 1, "running": {2: (7, 40), 1: (30, 40)}}
    assert progress_text(info, [True, True]) == (
        37, 80, "batches 1/5 done, running 2 (30/40) 3 (7/40)  batch 3: U -1.50  accept 25%  gold acc 50%")
    alone = {**info, "running": {2: (7, 40)}}
    assert progress_text(alone, None) == (7, 40, "batch 3/5  U -1.50  accept 25%")


def test_polishing_only_raises_utility_and_ends_on_uncontradicted_or_rejected_labels(tiny):
    model, tokenizer = tiny
    claims = claims_from_records(arithmetic_claims(6))
    config = ICMConfig(iterations=12, polish_iterations=30, exact_every=1, seed=1)
    search = ICMSearch(ClaimScorer(model, tokenizer, claims), list(range(len(claims))), config)
    state, _ = search.run()
    polished = state.trajectory[config.iterations:]
    assert all(b >= a for a, b in zip(polished, polished[1:]))
    z, _, u = search.evaluate(state.labels)
    assert u == pytest.approx(state.trajectory[-1])
    if state.iteration < config.iterations + config.polish_iterations:  # stopped early: nothing left to try
        assert search.contradicted(state.labels, z, state.rejected) is None


def test_label_cli_writes_parquet_and_run_json(tiny_model_dir, tmp_path):
    src = write_jsonl(tmp_path / "claims.jsonl", arithmetic_claims())
    out = tmp_path / "labels.parquet"
    result = runner.invoke(app, ["label", str(src), "--output", str(out), "--model", tiny_model_dir,
                                 "--iterations", "20", "--seed", "1", "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.column_names == ["question", "choice", "consistency_id", "answer", "label",
                                  "icm_label", "icm_score", "icm_searched"]
    assert table.column("choice").to_pylist() == [r["choice"] for r in arithmetic_claims()]  # input order
    meta = read_parquet_metadata(out)
    assert meta["model"] == tiny_model_dir and meta["config"]["alpha"] == 50.0 and meta["seed"] == 1
    run = json.loads((tmp_path / "labels.run" / "run.json").read_text())
    assert 0 <= run["gold_accuracy"] <= 1 and 21 <= len(run["trajectories"][0]) <= 21 + 12 // 4  # + polishing
    assert run["template"]["claim"].startswith("Question: {question}")


def test_label_separator_option_reads_escapes_and_is_a_recipe_key(tiny_model_dir, tmp_path):
    src = write_jsonl(tmp_path / "claims.jsonl", arithmetic_claims(2))
    base = ["label", str(src), "--model", tiny_model_dir, "--iterations", "4", "--dtype", "fp32"]
    result = runner.invoke(app, [*base, "-o", str(tmp_path / "a.parquet"), "--separator", r"\n"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "a.run" / "run.json").read_text())["template"]["separator"] == "\n"
    assert "separator: \\n" in (tmp_path / "a.run" / "recipe.yaml").read_text()  # as given: reruns the same
    (tmp_path / "r.yaml").write_text("separator: '\\t'\n")  # YAML single quotes: a backslash and a t
    result = runner.invoke(app, [*base, "-o", str(tmp_path / "b.parquet"), "--config", str(tmp_path / "r.yaml")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "b.run" / "run.json").read_text())["template"]["separator"] == "\t"
    result = runner.invoke(app, [*base, "-o", str(tmp_path / "c.parquet"), "--separator", r"\x"])
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        "error: --separator: bad escape in '\\\\x' (truncated \\xXX escape)"]


def test_label_cli_exact_every_1_switches_the_approximation_off(tiny_model_dir, tmp_path):
    src = write_jsonl(tmp_path / "claims.jsonl", arithmetic_claims())
    runs = {}
    for name, flags in (("default", []), ("exact", ["--exact-every", "1"]), ("checked", ["--check-every", "1"])):
        out = tmp_path / f"labels-{name}.parquet"
        result = runner.invoke(app, ["label", str(src), "--output", str(out), "--model", tiny_model_dir,
                                     "--iterations", "40", "--dtype", "fp32", *flags])
        assert result.exit_code == 0, result.output
        runs[name] = json.loads(out.with_suffix(".run").joinpath("run.json").read_text())
    assert runs["default"]["config"]["exact_every"] == ICMConfig.exact_every > 1
    assert runs["default"]["config"]["check_every"] == ICMConfig.check_every > 1
    assert runs["exact"]["config"]["exact_every"] == 1 and runs["exact"]["approximate_checks"] == 0
    assert runs["checked"]["config"]["check_every"] == 1 and runs["checked"]["approximate_checks"] > 0


def test_label_cli_demo_order_is_recorded_and_a_bad_one_exits_2(tiny_model_dir, tmp_path):
    src = write_jsonl(tmp_path / "claims.jsonl", arithmetic_claims(2))
    base = ["label", str(src), "--model", tiny_model_dir, "--iterations", "4", "--dtype", "fp32"]
    result = runner.invoke(app, [*base, "-o", str(tmp_path / "a.parquet"), "--demo-order", "labelling"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "a.run" / "run.json").read_text())["config"]["demo_order"] == "labelling"
    result = runner.invoke(app, [*base, "-o", str(tmp_path / "b.parquet"), "--demo-order", "sideways"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:")
    assert "'--demo-order'" in lines[0] and "'sideways' is not one of 'labelling', 'fixed'" in lines[0]
    assert not (tmp_path / "b.parquet").exists()


def test_zero_shot_labels_are_the_sign_of_centered_no_demonstration_scores(tiny, tiny_model_dir, tmp_path):
    model, tokenizer = tiny
    backend = InProcessBackend(model, tokenizer)
    rows = arithmetic_claims()
    raw = ClaimScorer(model, tokenizer, claims_from_records(rows)).score(list(range(len(rows))), demos=())
    centered = raw - raw.mean()
    out, summary = zero_shot_records(rows, backend, ICMConfig())
    assert [r["icm_score"] for r in out] == pytest.approx(centered.tolist())
    assert [r["icm_label"] for r in out] == [bool(z > 0) for z in centered]
    assert not any(r["icm_searched"] for r in out) and all(r["icm_label"] in (True, False) for r in out)
    assert summary["gold_accuracy"] == pytest.approx(
        sum(r["icm_label"] == r["label"] for r in out) / len(out))
    uncentered, _ = zero_shot_records(rows, backend, ICMConfig(balance="none"))
    assert [r["icm_score"] for r in uncentered] == pytest.approx(raw.tolist())

    src = write_jsonl(tmp_path / "claims.jsonl", rows)
    run = label_file(src, tmp_path / "zs.parquet", tiny_model_dir, dtype="fp32",
                     sources=SourceConfig(method="zero_shot"))
    assert pq.read_table(tmp_path / "zs.parquet").column("icm_label").to_pylist() == [r["icm_label"] for r in out]
    assert run["method"] == "zero-shot" and run["gold_accuracy"] == pytest.approx(summary["gold_accuracy"])
    assert json.loads((tmp_path / "zs.run" / "run.json").read_text())["gold_accuracy"] == run["gold_accuracy"]
    assert read_parquet_metadata(tmp_path / "zs.parquet")["gold_accuracy"] == run["gold_accuracy"]


@pytest.mark.parametrize("content, message", [
    (None, "claims.jsonl: file not found"),
    ('{"question": "q", "choice": "c"}\n{broken\n', "claims.jsonl, row 2: malformed JSON line"),
    ('{"question": "q", "choice": "c"}\n{"choice": "c"}\n', "claims.jsonl, row 2, field 'question': missing"),
    ('{"question": "q", "choice": ""}\n', "claims.jsonl, row 1, field 'choice': missing or empty"),
    ("", "claims.jsonl: file has no rows"),
    ('{"question": "q", "choice": "c", "label": "maybe"}\n', "row 1, field 'label': not a boolean"),
])
def test_label_cli_bad_input_exits_2_and_keeps_output(tmp_path, content, message):
    src = tmp_path / "claims.jsonl"
    if content is not None:
        src.write_text(content)
    out = tmp_path / "labels.parquet"
    out.write_bytes(b"previous result")
    result = runner.invoke(app, ["label", str(src), "--output", str(out), "--model", "no-such-model-anywhere"])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert len(result.output.strip().splitlines()) == 1
    assert out.read_bytes() == b"previous result"


@pytest.mark.real_model
def test_real_smollm2_labels_a_handful_of_claims(tmp_path):
    rows = [{"question": f"What is the capital of {c}?", "choice": f"The capital of {c} is {k}.", "label": t}
            for c, k, t in [("France", "Paris", True), ("Japan", "Tokyo", True), ("Italy", "Madrid", False),
                            ("Egypt", "Lima", False), ("Spain", "Madrid", True), ("Peru", "Cairo", False)]]
    src = write_jsonl(tmp_path / "capitals.jsonl", rows)
    out = tmp_path / "labels.parquet"
    result = runner.invoke(app, ["label", str(src), "-o", str(out), "--model", "smollm2-135m", "--iterations", "12"])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out).to_pylist()
    assert len(table) == 6 and {type(r["icm_label"]) for r in table} == {bool}
    run = json.loads((tmp_path / "labels.run" / "run.json").read_text())
    assert run["model"] == "smollm2-135m" and run["claims"] == 6


def test_label_cli_generates_candidates_from_questions_first(tiny_model_dir, tmp_path):
    questions = [{"question": f"What is {a} + {b}?", "answer": f"#### {a + b}"} for a, b in [(1, 2), (3, 4), (5, 6)]]
    src = write_jsonl(tmp_path / "questions.jsonl", questions)
    out = tmp_path / "labels.parquet"
    result = runner.invoke(app, ["label", str(src), "-o", str(out), "--model", tiny_model_dir, "--dtype", "fp32",
                                 "--num-candidates", "3", "--max-new-tokens", "8", "--iterations", "10"])
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert {r["consistency_id"] for r in rows} == {0, 1, 2}
    assert all(r["choice"] and r["question"] in {q["question"] for q in questions} for r in rows)
    assert {"answer", "label", "icm_label", "icm_score", "generator"} <= set(rows[0])
    run = json.loads((tmp_path / "labels.run" / "run.json").read_text())
    assert run["generation"]["questions"] == 3


def test_utility_sums_or_averages_predictability_minus_inconsistencies(tiny):
    from icm.consistency import label_logprob
    from icm.scoring import ClaimScorer
    from icm.search import ICMSearch

    model, tokenizer = tiny
    claims = claims_from_records(arithmetic_claims(1))
    labels, z = {0: True, 1: True, 2: False}, {0: 1.0, 1: -0.5, 2: -2.0}
    fit = label_logprob(1.0, True) + label_logprob(-0.5, True) + label_logprob(-2.0, False)
    for average, expected in ((True, 50 * fit / 3 - 1), (False, 50 * fit - 1)):  # 0 and 1 both True: 1 violation
        search = ICMSearch(ClaimScorer(model, tokenizer, claims), [0, 1, 2], ICMConfig(average=average))
        assert search.utility(labels, z) == pytest.approx(expected)


def test_labels_record_how_the_candidates_were_prompted(tiny_model_dir, tmp_path):
    """icm label keeps the candidates' use_chat_template in its metadata, so the pairs train on the same prompts."""
    runner = CliRunner()
    for raw in (True, False):
        candidates, labels = tmp_path / f"c{raw}.parquet", tmp_path / f"l{raw}.parquet"
        result = runner.invoke(app, ["generate", "--task", "sentiment", "--limit", "2", "--num-candidates", "2",
                                     "-m", tiny_model_dir, "--max-new-tokens", "3", "-o", str(candidates)]
                               + (["--raw-prompt"] if raw else []))
        assert result.exit_code == 0, result.output
        result = runner.invoke(app, ["label", str(candidates), "-o", str(labels), "-m", tiny_model_dir,
                                     "--iterations", "4", "--dtype", "fp32"])
        assert result.exit_code == 0, result.output
        assert read_parquet_metadata(labels)["use_chat_template"] is (not raw)
