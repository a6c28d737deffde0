import json

import pytest
import torch
from typer.testing import CliRunner

import icm.iterative as iterative_module
from icm.backends import InProcessBackend
from icm.cli import app
from icm.config import ICMConfig, IterativeConfig
from icm.data.claims import claims_from_records
from icm.iterative import label_iteratively, split_batches
from icm.models import load_model
from icm.search import batch_labels

runner = CliRunner()


def rows(n_questions: int = 6) -> list[dict]:
    out = []
    for q in range(n_questions):
        for d in (0, 1):
            out.append({"question": f"What is {q} + 2?", "choice": f"The answer is {q + 2 + d}.", "consistency_id": q,
                        "answer": str(q + 2 + d), "label": d == 0})
    return out


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir, dtype="fp32")


CONFIG = ICMConfig(iterations=6, polish_iterations=2, initial_labels=2)
ITERATIVE = IterativeConfig(batches=3, steps=3, batch_size=4, learning_rate=1e-2)


def weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_split_batches_keeps_input_order_and_groups_whole():
    claims = claims_from_records([{"question": "q", "choice": f"c{i}", "consistency_id": g}
                                  for i, g in enumerate([0, 0, 1, 2, 2, 2, 3, 4, 1])])
    assert split_batches(claims, 3) == [[0, 1, 2, 8], [3, 4, 5], [6, 7]]
    assert split_batches(claims, 1) == [list(range(9))]
    assert len(split_batches(claims, 9)) == 5  # no more batches than groups


def test_the_model_tuned_after_batch_j_labels_batch_j_plus_1(tiny, monkeypatch):
    model, tokenizer = tiny
    backend = InProcessBackend(model, tokenizer)
    base = weights(model).clone()
    tuned, used, trained_on = {}, {}, {}
    real_finetune, real_label = iterative_module.finetune_labeller, iterative_module.label_claims

    def finetune(model_, tokenizer_, claims, labels, config, *, template=None, seed=0, output=None, key=""):
        result = real_finetune(model_, tokenizer_, claims, labels, config, template=template, seed=seed,
                               output=output, key=key)
        b = len(tuned) + 1
        tuned[b], trained_on[b] = result[0], dict(labels)
        return result

    def label(*args, labeller, **kwargs):
        def spy(b, done):
            used[b] = labeller(b, done)
            return used[b]
        return real_label(*args, labeller=spy, **kwargs)

    monkeypatch.setattr(iterative_module, "finetune_labeller", finetune)
    monkeypatch.setattr(iterative_module, "label_claims", label)
    claims = claims_from_records(rows())
    results, summary = label_iteratively(claims, backend, CONFIG, ITERATIVE, model_name="tiny")
    batches = split_batches(claims, 3)
    assert used[0].model is model and used[1].model is tuned[1] and used[2].model is tuned[2]
    assert not torch.equal(weights(tuned[1]), base) and not torch.equal(weights(tuned[2]), weights(tuned[1]))
    assert torch.equal(weights(model), base)  # fine-tuning works on a copy
    # the labeller of batch j+1 was trained on exactly the labels found in batches 1..j
    for b in (1, 2):
        members = [i for batch in batches[:b] for i in batch]
        assert trained_on[b] == {i: results[i]["icm_label"] for i in members}
    info = summary["iterative"]["batches"]
    assert [x["labeller"] for x in info] == ["base", "labeller-1", "labeller-2"]
    assert [x["trained_on"] for x in info[1:]] == [len(batches[0]), len(batches[0]) + len(batches[1])]
    assert [x["members"] for x in info] == batches
    assert [x["true_share"] for x in info] == [sum(results[i]["icm_label"] for i in b) / len(b) for b in batches]


def test_resume_reloads_saved_labellers_and_ends_like_an_uninterrupted_run(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    backend = InProcessBackend(model, tokenizer)
    claims = claims_from_records(rows())
    expected, _ = label_iteratively(claims, backend, CONFIG, ITERATIVE, run_dir=tmp_path / "a")

    def stop(info):
        if info["batch"] == 2 and info["iteration"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        label_iteratively(claims, backend, CONFIG, ITERATIVE, run_dir=tmp_path / "b", progress=stop)
    assert (tmp_path / "b" / "labeller-2" / iterative_module.FINETUNE_FILE).exists()
    done = json.loads((tmp_path / "b" / "checkpoint.json").read_text())["done"]
    assert sorted(done) == ["0", "1"]

    def no_training(*args, **kwargs):
        raise AssertionError("a saved labeller was trained again")

    monkeypatch.setattr(iterative_module, "finetune_labeller", no_training)
    resumed, summary = label_iteratively(claims, backend, CONFIG, ITERATIVE, run_dir=tmp_path / "b",
                                         resume=True)
    assert resumed == expected
    assert summary["iterative"]["batches"][1]["trained_on"] == len(batch_labels(done["0"]))


def test_cli_iterative_reports_accuracy_per_batch(tiny_model_dir, tmp_path):
    path = tmp_path / "claims.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    out = tmp_path / "labels.parquet"
    result = runner.invoke(app, ["label", str(path), "-o", str(out), "--model", tiny_model_dir, "--dtype", "fp32",
                                 "--iterations", "4", "--iterative", "--batches", "2", "--finetune-steps", "2"])
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "labels.run" / "run.json").read_text())
    batches = run["iterative"]["batches"]
    assert [b["labeller"] for b in batches] == ["base", "labeller-1"] and run["batches"] == 2
    assert all(0 <= b["gold_accuracy"] <= 1 for b in batches)
    assert (tmp_path / "labels.run" / "labeller-1" / "adapter_model.safetensors").exists()
