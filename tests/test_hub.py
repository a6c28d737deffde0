"""Publishing to the Hub: the dataset card, the commit made through an autospec'd HfApi, tokens kept out of every
output, and a failed upload keeping local files with a rerun command (exit 1)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import create_autospec

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from huggingface_hub import HfApi
from typer.testing import CliRunner

from icm.cli import app
from icm.data.card import dataset_card
from icm.data.hub import push_to_hub, scrub, split_files
from icm.data.io import InputError, write_parquet

runner = CliRunner()
SECRET = "hf_secretTOKEN1234567890abcdef"
COMMIT_URL = "https://huggingface.co/datasets/me/icm-pairs/commit/0123abc"
LABELS_META = {"model": "smollm2-135m", "template": "Claim: {choice}\nI think this claim is",
               "config": {"alpha": 50.0, "iterations": 123, "initial_examples": 8}, "seed": 7,
               "command": f"icm label claims.jsonl --token {SECRET} -o labels.parquet", "gold_accuracy": 0.75}


@pytest.fixture(autouse=True)
def _token_in_env(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)


def labels_file(path: Path, n: int = 6) -> Path:
    rows = []
    for q in range(n):
        rows += [{"question": f"What is {q} + {q}?", "choice": f"It is {2 * q}.", "consistency_id": q,
                  "answer": str(2 * q), "label": True, "icm_label": True, "icm_score": 2.0, "icm_searched": True,
                  "generator": "smollm2-135m"},
                 {"question": f"What is {q} + {q}?", "choice": f"It is {2 * q + 1}.", "consistency_id": q,
                  "answer": str(2 * q + 1), "label": False, "icm_label": q == 0, "icm_score": -1.0 + q,
                  "icm_searched": True, "generator": "smollm2-135m"}]
    write_parquet(path, pa.Table.from_pylist(rows), LABELS_META)
    return path


def mock_api(fail: Exception | None = None):
    api = create_autospec(HfApi, instance=True)
    api.create_repo.return_value = "https://huggingface.co/datasets/me/icm-pairs"
    api.create_commit.return_value = SimpleNamespace(commit_url=COMMIT_URL)
    if fail is not None:
        api.create_commit.side_effect = fail
    return api


def committed(api) -> dict[str, bytes]:
    """path_in_repo -> content of the single commit the mock received."""
    (call,) = api.create_commit.call_args_list
    out = {}
    for op in call.kwargs["operations"]:
        src = op.path_or_fileobj
        out[op.path_in_repo] = src if isinstance(src, bytes) else Path(src).read_bytes()
    return out


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_scrub_hides_token_options_and_values():
    text = f"icm pairs l.parquet --token {SECRET} --hf-token=abc --x 1 'also {SECRET}'"
    out = scrub(text)
    assert SECRET not in out and "abc" not in out and "--token ***" in out and "--hf-token=***" in out
    assert "--x 1" in out and scrub("icm generate --max-new-tokens 256") == "icm generate --max-new-tokens 256"
    assert scrub("icm push a.parquet me/x") == "icm push a.parquet me/x"


def make_pairs(tmp_path, *extra) -> Path:
    labels = labels_file(tmp_path / "labels.parquet")
    out = tmp_path / "pairs.parquet"
    result = runner.invoke(app, ["pairs", str(labels), "-o", str(out), *extra])
    assert result.exit_code == 0, result.output
    return out


def test_pairs_card_front_matter_and_content(tmp_path):
    out = make_pairs(tmp_path, "--test-size", "0.34", "--format", "conversational")
    files = split_files(out)
    assert files == {"train": out, "test": tmp_path / "pairs.test.parquet"}
    card = dataset_card(files, repo_id="me/icm-pairs", license="mit")
    meta = front_matter(card)
    assert meta["license"] == "mit" and "text-generation" in meta["task_categories"]
    assert {"dpo", "icm"} <= set(meta["tags"])
    assert meta["configs"] == [{"config_name": "default", "data_files": [
        {"split": "train", "path": "data/train-*"}, {"split": "test", "path": "data/test-*"}]}]
    info = meta["dataset_info"]
    names = [f["name"] for f in info["features"]]
    assert names[:3] == ["prompt", "chosen", "rejected"] and "chosen_is_correct" in names
    assert info["features"][0]["list"] == [{"name": "role", "dtype": "string"}, {"name": "content", "dtype": "string"}]
    split_rows = {s["name"]: s["num_examples"] for s in info["splits"]}
    assert split_rows == {"train": pq.read_metadata(out).num_rows,
                          "test": pq.read_metadata(files["test"]).num_rows}
    assert sum(split_rows.values()) == 5  # question 0 has no False label
    body = card.split("---\n", 2)[2]
    assert "`smollm2-135m`" in body and "| iterations | 123 |" in body and "| alpha | 50.0 |" in body
    assert "| pairs kept | 5 |" in body and "| questions skipped: no False candidate | 1 |" in body
    assert "| label balance (True / False) | 7 / 5 |" in body
    assert "| pair correct (chosen correct and rejected wrong) | 100.0% |" in body
    assert "icm label claims.jsonl --token *** -o labels.parquet" in body
    assert "icm pairs " in body and "--eval-size 0.34" in body and 'load_dataset("me/icm-pairs")' in body
    assert "conversational preference format" in body
    assert SECRET not in card


def test_labels_card(tmp_path):
    labels = labels_file(tmp_path / "labels.parquet")
    card = dataset_card({"train": labels}, repo_id="me/icm-labels")
    meta = front_matter(card)
    assert meta["license"] == "unknown" and "text-classification" in meta["task_categories"]
    assert meta["dataset_info"]["splits"] == [{"name": "train", "num_bytes": meta["dataset_info"]["splits"][0][
        "num_bytes"], "num_examples": 12}]
    assert "6 questions, 12 claims" in card and "| label balance (True / False) | 7 / 5 |" in card
    assert "| labels' accuracy against gold | 91.7% |" in card and "`smollm2-135m`" in card
    assert SECRET not in card and "Claim: {choice}" in card


def test_push_to_hub_commits_hub_layout(tmp_path):
    out = make_pairs(tmp_path, "--test-size", "2")
    files = split_files(out)
    api = mock_api()
    url = push_to_hub(files, "me/icm-pairs", card="# card\n", private=True, revision="v1", api=api)
    assert url == COMMIT_URL
    api.create_repo.assert_called_once_with(repo_id="me/icm-pairs", repo_type="dataset", private=True, exist_ok=True)
    api.create_branch.assert_called_once_with(repo_id="me/icm-pairs", branch="v1", repo_type="dataset",
                                              exist_ok=True)
    assert api.create_commit.call_args.kwargs["revision"] == "v1"
    content = committed(api)
    assert content == {"data/train-00000-of-00001.parquet": out.read_bytes(),
                       "data/test-00000-of-00001.parquet": files["test"].read_bytes(), "README.md": b"# card\n"}
    with pytest.raises(ValueError):
        push_to_hub(files, "not-a-repo-id", card="", api=mock_api())


def test_cli_pairs_push_to_hub_keeps_token_out_of_everything(tmp_path, monkeypatch):
    api = mock_api()
    monkeypatch.setattr("icm.data.hub.HfApi", lambda: api)
    labels = labels_file(tmp_path / "labels.parquet")
    out = tmp_path / "pairs.parquet"
    result = runner.invoke(app, ["pairs", str(labels), "-o", str(out), "--push-to-hub", "me/icm-pairs"])
    assert result.exit_code == 0, result.output
    assert COMMIT_URL in result.output
    content = committed(api)
    assert set(content) == {"data/train-00000-of-00001.parquet", "README.md"}
    assert content["data/train-00000-of-00001.parquet"] == out.read_bytes()
    card = content["README.md"].decode()
    assert front_matter(card)["dataset_info"]["splits"][0]["num_examples"] == 5
    everything = [result.output, card, (tmp_path / "pairs.report.json").read_text(),
                  json.dumps(pq.read_schema(out).metadata[b"icm"].decode()), repr(api.mock_calls)]
    for text in everything:
        assert SECRET not in text
    assert "***" in card  # the labels command's --token was scrubbed, not dropped


def test_cli_failed_upload_keeps_files_and_prints_rerun(tmp_path, monkeypatch):
    api = mock_api(fail=OSError(f"503 Service Unavailable for token {SECRET}"))
    monkeypatch.setattr("icm.data.hub.HfApi", lambda: api)
    labels = labels_file(tmp_path / "labels.parquet")
    out = tmp_path / "pairs.parquet"
    result = runner.invoke(app, ["pairs", str(labels), "-o", str(out), "--push-to-hub", "me/icm-pairs",
                                 "--private", "--revision", "dev"])
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert "upload to me/icm-pairs failed" in last and "503" in last
    assert f"rerun: icm push {out} me/icm-pairs --private --revision dev --license unknown" in last
    assert SECRET not in result.output
    assert out.is_file() and pq.read_metadata(out).num_rows == 5 and (tmp_path / "pairs.report.json").is_file()
    # the printed rerun command works once the Hub is back
    api2 = mock_api()
    monkeypatch.setattr("icm.data.hub.HfApi", lambda: api2)
    result = runner.invoke(app, last.split("rerun: icm ")[1].split())
    assert result.exit_code == 0, result.output
    assert set(committed(api2)) == {"data/train-00000-of-00001.parquet", "README.md"}
    assert api2.create_repo.call_args.kwargs["private"] is True


def test_cli_push_labels_file_and_bad_inputs(tmp_path, monkeypatch):
    api = mock_api()
    monkeypatch.setattr("icm.data.hub.HfApi", lambda: api)
    labels = labels_file(tmp_path / "labels.parquet")
    result = runner.invoke(app, ["push", str(labels), "me/icm-labels", "--license", "cc-by-4.0"])
    assert result.exit_code == 0, result.output
    content = committed(api)
    assert content["data/train-00000-of-00001.parquet"] == labels.read_bytes()
    assert front_matter(content["README.md"].decode())["license"] == "cc-by-4.0"

    result = runner.invoke(app, ["push", str(tmp_path / "missing.parquet"), "me/x"])
    assert result.exit_code == 2 and "file not found" in result.output
    (tmp_path / "bad.parquet").write_text("not parquet")
    result = runner.invoke(app, ["push", str(tmp_path / "bad.parquet"), "me/x"])
    assert result.exit_code == 2 and "bad.parquet" in result.output
    out = make_pairs(tmp_path, "--test-size", "0.5")
    (tmp_path / "pairs.test.parquet").unlink()
    result = runner.invoke(app, ["push", str(out), "me/x"])
    assert result.exit_code == 2 and "test split" in result.output
    result = runner.invoke(app, ["push", str(labels), "no-slash"])
    assert result.exit_code == 2 and "OWNER/NAME" in result.output
    assert api.create_commit.call_count == 1


def test_split_files_follows_a_renamed_train_file(tmp_path):
    out = make_pairs(tmp_path, "--test-size", "0.5")
    renamed = out.rename(tmp_path / "renamed.parquet")
    assert split_files(renamed) == {"train": renamed, "test": tmp_path / "pairs.test.parquet"}
    with pytest.raises(InputError, match="train split"):  # from the test file, the train file is looked up by name
        split_files(tmp_path / "pairs.test.parquet")


def sentiment_labels(path: Path, n: int = 8) -> Path:
    """A labels file over the built-in sentiment task's questions (the prompt as `icm generate` writes it)."""
    from icm.data.tasks import TASKS, sentiment_questions
    from icm.sampling import user_message

    rows = []
    for i, q in enumerate(sentiment_questions(n)):
        for answer in ("positive", "negative"):
            right = answer == q.reference
            rows.append({"question": q.question, "prompt": user_message(q.question, TASKS["sentiment"].instruction),
                         "choice": answer, "consistency_id": q.id, "answer": answer, "label": right,
                         "icm_label": right if i % 4 else not right, "icm_score": 1.0 if right else -1.0,
                         "icm_searched": True, "generator": "smollm2-135m"})
    meta = LABELS_META | {"template": {"claim": "Question: {question}\nClaim: {choice}\nI think this claim is ",
                                       "true_word": "True", "false_word": "False", "separator": "\n\n"},
                          "command": f"icm label {path.parent.resolve()}/claims.parquet -o {path.resolve()}"}
    write_parquet(path, pa.Table.from_pylist(rows), meta)
    return path


ABSOLUTE = re.compile(r"(?<![\w:/.~-])~?/[\w.-]+/")


def test_push_dry_run_writes_what_would_be_uploaded_and_datasets_loads_it(tmp_path, monkeypatch):
    """The contract: nothing uploaded; DIR/README.md and the split files, which load_dataset reads as train and
    test; a sentiment card carries CC BY 4.0 and its attribution, models by Hub id, readable settings,
    limitations and the paper's citation, and no absolute path."""
    import datasets

    monkeypatch.setattr("icm.data.hub.HfApi", lambda: pytest.fail("a dry run must not reach the Hub"))
    labels = sentiment_labels(tmp_path / "labels.parquet")
    pairs = tmp_path / "pairs.parquet"
    assert runner.invoke(app, ["pairs", str(labels), "-o", str(pairs), "--eval-size", "0.25"]).exit_code == 0
    out = tmp_path / "hub"
    result = runner.invoke(app, ["push", str(pairs), "me/sentiment-pairs", "--dry-run", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert "nothing uploaded" in result.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "README.md", "data/test-00000-of-00001.parquet", "data/train-00000-of-00001.parquet"]
    assert (out / "data/train-00000-of-00001.parquet").read_bytes() == pairs.read_bytes()
    loaded = datasets.load_dataset(str(out))
    assert set(loaded) == {"train", "test"}
    assert (loaded["train"].num_rows, loaded["test"].num_rows) == (pq.read_metadata(pairs).num_rows, 2)
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["license"] == "cc-by-4.0"
    body = card.split("---\n", 2)[2]
    assert "Sentiment Labelled Sentences" in body and "creativecommons.org/licenses/by/4.0" in body
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in body
    assert "## Limitations" in body and "arXiv:2506.10139" in body and "Unsupervised Elicitation" in body
    assert "| true_word | `True` |" in body and "{'" not in card  # settings as a table, not a dict dump
    assert "standard preference format" in body and "icm label claims.parquet -o labels.parquet" in body
    assert str(tmp_path) not in card and not ABSOLUTE.search(card), ABSOLUTE.search(card)
    # a licence given on the command line wins
    again = runner.invoke(app, ["push", str(pairs), "me/x", "--dry-run", "--license", "mit"])
    assert again.exit_code == 0 and "license: mit" in again.output


def test_pairs_folder_loads_with_both_splits_beside_other_files(tmp_path):
    import datasets

    labels = sentiment_labels(tmp_path / "labels.parquet")  # another Parquet file in the same folder
    pairs = tmp_path / "pairs.parquet"
    assert runner.invoke(app, ["pairs", str(labels), "-o", str(pairs), "--eval-size", "2"]).exit_code == 0
    loaded = datasets.load_dataset(str(tmp_path))
    assert {k: v.num_rows for k, v in loaded.items()} == {"train": pq.read_metadata(pairs).num_rows, "test": 2}
    assert front_matter((tmp_path / "README.md").read_text())["license"] == "cc-by-4.0"
    # the old layout's names are still what split_files reads
    assert split_files(pairs) == {"train": pairs, "test": tmp_path / "pairs.test.parquet"}
    # someone else's README.md is never replaced
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "README.md").write_text("# my project\n")
    assert runner.invoke(app, ["pairs", str(labels), "-o", str(other / "pairs.parquet")]).exit_code == 0
    assert (other / "README.md").read_text() == "# my project\n"


def test_the_cards_conversion_gives_what_icm_dpo_trains_on(tmp_path, tiny_model_dir):
    """Standard pairs carry the user message; the card's snippet converts them to exactly the rows icm dpo trains
    on (chat template applied by TRL), so the published pairs train on the prompts their responses answered."""
    from icm.dpo.training import format_pairs, load_pairs
    from icm.models import load_tokenizer

    labels = sentiment_labels(tmp_path / "labels.parquet")
    pairs = tmp_path / "pairs.parquet"
    assert runner.invoke(app, ["pairs", str(labels), "-o", str(pairs)]).exit_code == 0
    card = dataset_card({"train": pairs})
    snippet = card.split("```python\n")[1].split("```")[0]
    code = snippet.split("def conversational")[1].split("\n\n")[0]
    namespace: dict = {}
    exec("def conversational" + code, namespace)
    rows = load_pairs(pairs)[0]
    assert [namespace["conversational"](r) for r in rows] == format_pairs(rows, load_tokenizer(tiny_model_dir), True)


def test_card_of_raw_prompt_pairs_says_so(tmp_path):
    labels = sentiment_labels(tmp_path / "labels.parquet")
    table = pq.read_table(labels)
    meta = json.loads(table.schema.metadata[b"icm"]) | {"use_chat_template": False}
    write_parquet(labels, table.replace_schema_metadata(None), meta)
    pairs = tmp_path / "pairs.parquet"
    assert runner.invoke(app, ["pairs", str(labels), "-o", str(pairs)]).exit_code == 0
    card = dataset_card({"train": pairs})
    assert "sampled without a chat template" in card and "def conversational" not in card
