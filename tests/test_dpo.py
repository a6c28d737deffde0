"""icm dpo: DPO training with TRL (LoRA and full), the model card, resuming, loading the result, bad input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from typer.testing import CliRunner

from icm.cli import app
from icm.config import DPOTrainingConfig
from icm.data.io import InputError, write_parquet
from icm.dpo.training import PushError, build_trainer, load_pairs, load_trained_model, push_model, train_dpo
from icm.models import load_model, resolve_model

PAIRS = [
    {"prompt": "What is 2 + 3?", "chosen": "The answer is 5.", "rejected": "The answer is 7."},
    {"prompt": "Is the sky green?", "chosen": "No it is not.", "rejected": "Yes it is."},
    {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "The answer is 42."},
]



def tiny_config(**overrides) -> DPOTrainingConfig:
    base = dict(max_steps=24, batch_size=3, max_length=64, save_steps=0, learning_rate=1e-2, precision="fp32")
    return DPOTrainingConfig(**(base | overrides))


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_overfitting_a_few_pairs_lowers_the_dpo_loss(tiny_model_dir, tmp_path, lora):
    config = tiny_config(lora=lora, learning_rate=1e-2 if lora else 2e-3)
    summary = train_dpo(PAIRS, tiny_model_dir, tmp_path / "out", config, eval_pairs=PAIRS, progress=False)
    before, after = summary["eval_before"], summary["eval_after"]
    assert before["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the start
    assert after["loss"] < before["loss"] - 0.1
    assert after["rewards/accuracies"] == 1.0 and after["rewards/margins"] > 0
    assert summary["global_step"] == 24
    out = tmp_path / "out"
    assert (out / ("adapter_model.safetensors" if lora else "model.safetensors")).is_file()
    assert (out / "tokenizer_config.json").is_file() and (out / "README.md").is_file()
    assert json.loads((out / "icm_dpo.json").read_text())["eval_after"]["loss"] == after["loss"]

    # The saved result loads back (adapters merged onto the base) and scores the chosen answer higher than before.
    trained, tokenizer = load_trained_model(str(out), dtype="fp32")
    base, _ = load_model(tiny_model_dir, dtype="fp32")

    def margin(model) -> float:
        def logp(answer: str) -> float:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": PAIRS[0]["prompt"]}],
                                                   tokenize=False, add_generation_prompt=True)
            ids = tokenizer(prompt + answer, return_tensors="pt").input_ids
            n = len(tokenizer(prompt).input_ids)
            with torch.no_grad():
                logits = model(ids).logits.log_softmax(-1)
            return logits[0, n - 1:-1].gather(-1, ids[0, n:, None]).sum().item()

        return logp(PAIRS[0]["chosen"]) - logp(PAIRS[0]["rejected"])

    assert margin(trained) > margin(base) + 0.1


def test_model_card_names_base_dataset_hyperparameters_and_metrics(tiny_model_dir, tmp_path):
    pairs_path = tmp_path / "pairs.parquet"
    write_parquet(pairs_path, pa.Table.from_pylist(PAIRS))
    summary = train_dpo(pairs_path, tiny_model_dir, tmp_path / "out", tiny_config(max_steps=2, beta=0.25),
                        progress=False, command="icm dpo pairs.parquet")
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"**{Path(tiny_model_dir).name}**" in card and "base_model:" not in card  # a local model: no Hub id
    assert "source: `pairs.parquet`" in card and "pairs: 3" in card and str(tmp_path) not in card
    assert "| beta | 0.25 |" in card and "| learning_rate | 0.01 |" in card and "| lora_r | 16 |" in card
    assert f"| loss | {summary['metrics']['loss']:.6g} |" in card
    assert "library_name: peft" in card and "icm dpo pairs.parquet" in card


class FakeHubApi:
    """Records what would be uploaded; ``fail`` makes the upload raise like a network error."""

    def __init__(self, fail: bool = False):
        self.fail, self.calls = fail, []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        if self.fail:
            raise ConnectionError("hub unreachable (token hf_abcdefghijklmnopqrstuvwxyz)")
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))


def test_push_uploads_the_model_folder_without_checkpoints(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    train_dpo(PAIRS, tiny_model_dir, out, tiny_config(max_steps=2, save_steps=1), progress=False)
    assert (out / "checkpoint-2").is_dir()
    api = FakeHubApi()
    assert push_model(out, "me/tiny-dpo", private=True, api=api) == "https://huggingface.co/me/tiny-dpo"
    (_, repo, create), (_, _, upload) = api.calls
    assert repo == "me/tiny-dpo" and create["private"] and create["repo_type"] == "model"
    assert upload["folder_path"] == str(out) and "checkpoint-*/**" in upload["ignore_patterns"]
    with pytest.raises(PushError, match="kept in .*out") as error:
        push_model(out, "me/tiny-dpo", api=FakeHubApi(fail=True))
    assert "hf_abcdefghijklmnopqrstuvwxyz" not in str(error.value)
    with pytest.raises(PushError, match="OWNER/NAME"):
        push_model(out, "not a repo", api=FakeHubApi())


def test_resume_continues_from_the_last_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    first = train_dpo(PAIRS, tiny_model_dir, out, tiny_config(max_steps=2, save_steps=2), progress=False)
    assert first["global_step"] == 2 and (out / "checkpoint-2").is_dir()
    second = train_dpo(PAIRS, tiny_model_dir, out, tiny_config(max_steps=4, save_steps=2), resume=True,
                       progress=False)
    assert second["resumed_from"].endswith("checkpoint-2")
    assert second["global_step"] == 4


def test_pairs_errors_name_file_row_and_field(tmp_path, tiny_model_dir):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in [PAIRS[0], {"prompt": "q", "chosen": "a"}]) + "\n")
    with pytest.raises(InputError, match=r"row 2, field 'rejected'"):
        load_pairs(bad)
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}) + "\n")
    with pytest.raises(InputError, match="row 1.*identical"):
        load_pairs(same)

    result = CliRunner().invoke(app, ["dpo", str(bad), "--model", tiny_model_dir, "--output-dir",
                                      str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "row 2, field 'rejected'" in result.output
    assert not (tmp_path / "out").exists()


def test_pairs_from_a_hub_dataset_id(monkeypatch):
    """An OWNER/NAME that is no local file goes to datasets.load_dataset (faked: no network here)."""
    import datasets

    calls = []

    def fake_load_dataset(repo_id, split):
        calls.append((repo_id, split))
        if repo_id == "me/pairs":
            return datasets.Dataset.from_list([p | {"margin": 1.0} for p in PAIRS])
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows, name = load_pairs("me/pairs", split="test")
    assert rows == PAIRS and name == "me/pairs" and calls == [("me/pairs", "test")]
    with pytest.raises(InputError, match="not a local file and not loadable from the Hub"):
        load_pairs("no-such-org/no-such-dataset")


def test_cli_dpo_trains_and_saves(tiny_model_dir, tmp_path):
    pairs_path = tmp_path / "pairs.jsonl"
    pairs_path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    out = tmp_path / "policy"
    result = CliRunner().invoke(app, ["dpo", str(pairs_path), "--model", tiny_model_dir, "--output-dir", str(out),
                                      "--no-lora", "--beta", "0.2", "--learning-rate", "1e-3", "--max-steps", "2",
                                      "--batch-size", "2", "--max-length", "64", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "icm_dpo.json").read_text())
    assert summary["global_step"] == 2 and summary["config"]["beta"] == 0.2 and not summary["adapter"]
    assert summary["config"]["learning_rate"] == 1e-3
    weights = (out / "model.safetensors").read_bytes()
    again = CliRunner().invoke(app, ["dpo", str(pairs_path), "--model", tiny_model_dir, "--output-dir", str(out)])
    assert again.exit_code == 2 and "already holds a trained model" in again.output
    assert (out / "model.safetensors").read_bytes() == weights


def chosen_logp(model, tokenizer, pair: dict) -> float:
    """log P(chosen | prompt) under the chat template, as DPO and the evaluation see it."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": pair["prompt"]}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt + pair["chosen"], return_tensors="pt").input_ids
    n = len(tokenizer(prompt).input_ids)
    with torch.no_grad():
        logits = model(ids).logits.log_softmax(-1)
    return logits[0, n - 1:-1].gather(-1, ids[0, n:, None]).sum().item()


def test_several_losses_reach_trl_with_their_weights(tmp_path):
    from icm.dpo.training import build_dpo_config

    config = DPOTrainingConfig(loss_type="sigmoid, sft", loss_weights=(1, 0.5), precision="fp32")
    args = build_dpo_config(config, tmp_path)
    assert args.loss_type == ["sigmoid", "sft"] and args.loss_weights == [1.0, 0.5]
    assert build_dpo_config(DPOTrainingConfig(precision="fp32"), tmp_path).loss_weights is None
    robust = build_dpo_config(DPOTrainingConfig(loss_type="robust", label_smoothing=0.2, precision="fp32"), tmp_path)
    assert robust.loss_type == ["robust"] and robust.label_smoothing == 0.2
    with pytest.raises(ValueError, match="one weight per loss type"):
        DPOTrainingConfig(loss_type="sigmoid,sft", loss_weights=(1.0,))
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOTrainingConfig(label_smoothing=0.5)


def test_the_sft_term_keeps_the_chosen_answers_likely(tiny_model_dir, tmp_path):
    """RPO (``sigmoid,sft``): the same pairs and steps, with the weight on the chosen answers' NLL or without it;
    the weighted run leaves the chosen answers more likely than plain DPO does."""
    base, tokenizer = load_model(tiny_model_dir, dtype="fp32")
    before = [chosen_logp(base, tokenizer, p) for p in PAIRS]
    gains = {}
    for name, weights in (("dpo", (1.0, 0.0)), ("rpo", (1.0, 1.0))):
        out = tmp_path / name
        train_dpo(PAIRS, tiny_model_dir, out, tiny_config(max_steps=8, loss_type="sigmoid,sft", loss_weights=weights),
                  progress=False)
        trained, _ = load_trained_model(str(out), dtype="fp32")
        gains[name] = sum(chosen_logp(trained, tokenizer, p) - b for p, b in zip(PAIRS, before))
        assert json.loads((out / "icm_dpo.json").read_text())["config"]["loss_weights"] == list(weights)
    assert gains["rpo"] > gains["dpo"] + 1.0, gains


def test_cli_loss_weights_must_be_numbers(tmp_path):
    pairs_path = tmp_path / "pairs.jsonl"
    pairs_path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    for weights, message in (("1,x", "--loss-weights: expected comma-separated numbers"),
                             ("1", "one weight per loss type")):
        result = CliRunner().invoke(app, ["dpo", str(pairs_path), "--output-dir", str(tmp_path / "out"),
                                          "--loss-type", "sigmoid,sft", "--loss-weights", weights])
        assert result.exit_code == 2 and message in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def write_tiny_gguf(model_dir: str, path: Path) -> Path:
    """The tiny fixture as an F32 GGUF file (llama architecture, GPT-2 style BPE tokenizer with its chat template)."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    src = Path(model_dir)
    cfg = json.loads((src / "config.json").read_text())
    tok = json.loads((src / "tokenizer.json").read_text())
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    vocab = tok["model"]["vocab"] | {a["content"]: a["id"] for a in tok["added_tokens"]}
    tokens = sorted(vocab, key=vocab.get)
    special = {a["content"] for a in tok["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control token
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])
    writer.add_pad_token_id(cfg["pad_token_id"])
    writer.add_chat_template((src / "chat_template.jinja").read_text())
    layer_names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                   "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                   "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down"}
    top_names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for name, tensor in load_file(src / "model.safetensors").items():
        if name.startswith("model.layers."):
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            name = f"blk.{layer}.{layer_names[rest.removesuffix('.weight')]}.weight"
        else:
            name = top_names[name]
        writer.add_tensor(name, tensor.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_file_trains_full_with_the_reference_reloaded_from_the_converted_directory(tiny_model_dir, tmp_path):
    """Full fine-tuning makes TRL reload the reference model from the policy's path: for a GGUF source that must
    be the converted safetensors directory, not the .gguf file."""
    gguf_path = write_tiny_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    config = tiny_config(lora=False, learning_rate=2e-3, max_steps=6)
    trainer = build_trainer(PAIRS, str(gguf_path), tmp_path / "probe", config, progress=False)
    converted = resolve_model(str(gguf_path))
    assert Path(converted).is_dir() and converted != str(gguf_path)
    assert trainer.ref_model.config._name_or_path == converted
    assert trainer.ref_model is not trainer.model
    del trainer

    out = tmp_path / "out"
    summary = train_dpo(PAIRS, str(gguf_path), out, config, eval_pairs=PAIRS, progress=False)
    assert summary["base_model_path"] == converted and summary["reference"] == "frozen copy of the base model"
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"] - 0.01
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert "**tiny.gguf**" in (out / "README.md").read_text()


def test_accelerate_launch_two_processes_shares_the_epoch(tiny_model_dir, tmp_path):
    """`accelerate launch` runs the same command data-parallel (2 CPU processes here, gloo): an epoch of 8 pairs
    at 2 pairs per process is 2 optimizer steps instead of 4, and one process writes the result."""
    pairs_path = tmp_path / "pairs.jsonl"
    pairs_path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS + PAIRS + PAIRS[:2]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    launcher = Path(sys.executable).with_name("accelerate")
    result = subprocess.run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
                             "-m", "icm", "dpo", str(pairs_path), "--model", tiny_model_dir, "--output-dir", str(out),
                             "--batch-size", "2", "--max-length", "64", "--precision", "fp32", "--save-steps", "0"],
                            capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1],
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "icm_dpo.json").read_text())
    assert summary["num_pairs"] == 8 and summary["global_step"] == 2
    assert (out / "adapter_model.safetensors").is_file()
    assert result.stderr.count("trained 2 steps on 8 pairs") == 1


@pytest.mark.real_model
def test_gguf_alias_trains_and_saves_adapters(tmp_path):
    """smollm2-135m ships as GGUF: it trains from the converted directory and its adapters load back onto it."""
    out = tmp_path / "out"
    config = DPOTrainingConfig(max_steps=1, batch_size=1, max_length=96, save_steps=0, learning_rate=1e-4)
    summary = train_dpo(PAIRS[:1], "smollm2-135m", out, config, progress=False)
    assert summary["global_step"] == 1 and summary["reference"] == "base model with adapters disabled"
    assert Path(summary["base_model_path"]).is_dir() and summary["base_model"] == "smollm2-135m"
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    assert "**HuggingFaceTB/SmolLM2-135M-Instruct**" in (out / "README.md").read_text()
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    model, _ = load_trained_model(str(out), dtype="fp32")
    assert model.config.model_type == "llama" and not hasattr(model, "peft_config")


def test_adapters_of_an_alias_name_its_hub_id_and_load_back_offline(tiny_model_dir, tmp_path, monkeypatch):
    """An alias trains from its packaged GGUF, but the adapters and the card name the alias's Hub id (a path of this
    machine would load for nobody else); loading them here maps the id back to the alias, offline."""
    from icm import models

    package = tmp_path / "packages" / "tiny_alias_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    write_tiny_gguf(tiny_model_dir, package / "tiny.gguf")
    monkeypatch.syspath_prepend(str(package.parent))
    monkeypatch.setitem(models.ALIASES, "tiny-alias", models.Alias(
        packages=("tiny_alias_pkg",), files=("tiny.gguf",), install="pip install tiny", hub_id="me/tiny-model"))
    out = tmp_path / "out"
    train_dpo(PAIRS, "tiny-alias", out, tiny_config(max_steps=2), progress=False)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "me/tiny-model"
    card = (out / "README.md").read_text()
    front = card.split("---\n")[1]
    assert "base_model: me/tiny-model\n" in front and "base_model_relation: adapter" in front
    assert str(tmp_path) not in card and models.cache_dir().name not in card
    (out / "icm_dpo.json").unlink()  # as downloaded from the Hub without icm's summary: peft's config only
    model, _ = load_trained_model(str(out), dtype="fp32")
    assert model.config.model_type == "llama" and not hasattr(model, "peft_config")


def test_model_card_usage_snippet_runs(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "policy"
    train_dpo(PAIRS, tiny_model_dir, out, tiny_config(max_steps=1), progress=False)
    card = (out / "README.md").read_text()
    snippet = card.split("## Usage\n\n```python\n")[1].split("```")[0]
    assert 'from_pretrained("policy")' in snippet and "apply_chat_template" in snippet
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet.replace('max_new_tokens=64', 'max_new_tokens=3'), "card", "exec"), namespace)
    assert isinstance(namespace["output"], torch.Tensor) and namespace["output"].shape[1] > 1


def test_a_mistyped_alias_is_answered_at_once_with_the_closest(tmp_path, tiny_model_dir):
    result = CliRunner().invoke(app, ["dpo", str(tmp_path / "p.jsonl"), "-m", "smollm2-135", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "did you mean smollm2-135m" in result.output
    # with --base-url the model is the server's name for it (here close to an alias): not refused as a typo
    (tmp_path / "c.jsonl").write_text(json.dumps({"question": "q", "choice": "a", "consistency_id": 0}) + "\n")
    for order in (["-m", "smollm2-f32", "--base-url", "http://127.0.0.1:9/v1"],
                  ["--base-url", "http://127.0.0.1:9/v1", "-m", "smollm2-f32"]):
        result = CliRunner().invoke(app, ["label", str(tmp_path / "c.jsonl"), "-o", str(tmp_path / "l.parquet"),
                                          *order, "--tokenizer", tiny_model_dir])
        assert "did you mean" not in result.output and "cannot reach" in result.output, result.output


@pytest.mark.parametrize("recorded", [False, True, None], ids=["raw", "chat", "unrecorded"])
def test_pairs_train_on_the_prompt_format_their_candidates_were_sampled_with(tiny_model_dir, tmp_path, recorded):
    """Candidates sampled with --raw-prompt (recorded by icm label in the labels', hence the pairs', metadata) train
    on the raw prompt; otherwise the chat template applies as before."""
    labels_meta = {"model": "x"} | ({} if recorded is None else {"use_chat_template": recorded})
    pairs_path = tmp_path / "pairs.parquet"
    write_parquet(pairs_path, pa.Table.from_pylist(PAIRS), {"labels": labels_meta})
    summary = train_dpo(pairs_path, tiny_model_dir, tmp_path / "out", tiny_config(max_steps=1), progress=False)
    assert summary["format"] == ("text" if recorded is False else "conversational")
    assert summary["config"]["chat_template"] is (False if recorded is False else None)


def test_the_base_of_downloaded_adapters_is_found_on_another_machine(tmp_path, monkeypatch):
    """icm_dpo.json names the alias or a path of the machine that trained; where neither loads, the Hub id does."""
    from icm import models
    from icm.dpo.training import _loadable_base

    monkeypatch.setitem(models.ALIASES, "absent-alias", models.Alias(
        packages=("no_such_package_for_icm_tests",), files=("x.gguf",), install="pip install x", hub_id="me/absent"))
    assert _loadable_base(["absent-alias", "me/absent"]) == "me/absent"  # alias not installed here: its Hub id
    assert _loadable_base(["/machine/that/trained/model", "me/absent"]) == "me/absent"
    assert _loadable_base([str(tmp_path), "me/absent"]) == str(tmp_path)  # a local base that is here
    assert _loadable_base([None, "org/model"]) == "org/model"


UNPAIRED = [{"prompt": p["prompt"], "completion": p[key], "label": key == "chosen"}
            for p in PAIRS for key in ("chosen", "rejected")] + [
    {"prompt": "What is 1 + 1?", "completion": "The answer is 3.", "label": False}]


def test_kto_loss_trains_unpaired_examples_with_ktotrainer(tiny_model_dir, tmp_path):
    from icm.dpo.training import build_dpo_config, desirable_weight

    config = tiny_config(loss_type="kto", max_steps=12, batch_size=2)
    args = build_dpo_config(config, tmp_path)
    assert type(args).__name__ == "KTOConfig" and args.loss_type == "kto" and args.train_sampling_strategy == \
        "sequential"
    assert desirable_weight(UNPAIRED, config) == pytest.approx(4 / 3)  # 4 undesirable, 3 desirable
    assert desirable_weight(UNPAIRED, tiny_config(loss_type="kto", desirable_weight=0.7)) == 0.7
    summary = train_dpo(UNPAIRED, tiny_model_dir, tmp_path / "out", config, eval_pairs=UNPAIRED, progress=False)
    assert summary["trainer"] == "KTOTrainer" and summary["num_pairs"] == 7 and summary["global_step"] == 12
    assert summary["config"]["desirable_weight"] == pytest.approx(4 / 3)
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    assert "KTOTrainer" in (tmp_path / "out" / "README.md").read_text()
    # pairs train with KTO too: each split into its chosen (desirable) and rejected (undesirable) answer
    paired = train_dpo(PAIRS, tiny_model_dir, tmp_path / "pairs", tiny_config(loss_type="kto", max_steps=1,
                                                                              batch_size=2), progress=False)
    assert paired["num_pairs"] == 6 and paired["config"]["desirable_weight"] == 1.0


def test_kto_config_and_bad_unpaired_input(tmp_path):
    from icm.dpo.training import load_unpaired

    with pytest.raises(ValueError, match="batch_size >= 2"):
        DPOTrainingConfig(loss_type="kto", batch_size=1)
    with pytest.raises(ValueError, match="alone"):
        DPOTrainingConfig(loss_type="kto,sft")
    with pytest.raises(InputError, match="row 2, field 'label'"):
        load_unpaired([UNPAIRED[0], UNPAIRED[1] | {"label": "yes"}])
    with pytest.raises(InputError, match="desirable"):
        load_unpaired([r for r in UNPAIRED if not r["label"]])
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in UNPAIRED[:2]))
    result = CliRunner().invoke(app, ["dpo", str(path), "--model", "nowhere", "-o", str(tmp_path / "o"),
                                      "--loss-type", "kto", "--batch-size", "1"])
    assert result.exit_code == 2 and "batch_size >= 2" in result.output


def test_auto_label_smoothing_is_the_pairs_estimated_label_error(tiny_model_dir, tmp_path):
    import math

    from icm.dpo.training import estimated_label_error

    pairs = [p | {"chosen_score": s, "rejected_score": r} for p, (s, r) in zip(PAIRS, [(2.0, -2.0), (0.0, 0.0),
                                                                                   (1.0, 3.0)])]

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))
    expected = ((sigmoid(-2) + sigmoid(-2)) / 2 + 0.5 + (sigmoid(-1) + sigmoid(3)) / 2) / 3
    assert estimated_label_error(pairs) == pytest.approx(expected)
    assert estimated_label_error([pairs[2]]) == 0.49  # capped below TRL's 0.5
    with pytest.raises(InputError, match="chosen_score"):
        estimated_label_error(PAIRS)
    with pytest.raises(ValueError, match="robust"):
        DPOTrainingConfig(loss_type="ipo", auto_label_smoothing=True)
    summary = train_dpo(pairs, tiny_model_dir, tmp_path / "out", tiny_config(
        loss_type="robust", auto_label_smoothing=True, max_steps=1), progress=False)
    assert summary["config"]["label_smoothing"] == pytest.approx(expected)
