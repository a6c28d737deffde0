"""`icm generate --vllm`: what the backend asks of vLLM's offline engine and what it does with the answers.

vLLM needs a GPU, so these tests put a stand-in ``vllm`` module in ``sys.modules`` that records every call and
answers deterministically from each request's seed; they pin the contract with vLLM's API (``LLM(...)``,
``get_tokenizer``, ``generate(prompts, sampling_params, use_tqdm)``, ``SamplingParams(...)``, outputs'
``.outputs[0].text`` / ``.token_ids``), not vLLM itself.
"""

from __future__ import annotations

import sys
import types

import pytest
from typer.testing import CliRunner

from icm.cli import app
from icm.config import GenerationConfig, VLLMConfig
from icm.data.io import InputError, read_records
from icm.data.tasks import arithmetic_questions
from icm.engines import load_backend
from icm.generate import checkpoint_path, generate_file
from icm.sampling import build_prompt
from icm.vllm_engine import VLLMBackend


class FakeLLM:
    instances: list[FakeLLM] = []

    def __init__(self, model: str, **kwargs):
        from transformers import AutoTokenizer

        self.model, self.kwargs, self.calls = model, kwargs, []
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.fail_on_call: int | None = None
        FakeLLM.instances.append(self)

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, sampling_params, use_tqdm=True):
        assert len(prompts) == len(sampling_params) and use_tqdm is False
        self.calls.append((prompts, sampling_params))
        if self.fail_on_call == len(self.calls):
            raise KeyboardInterrupt
        outputs = []
        for prompt, params in zip(prompts, sampling_params, strict=True):
            answer = 5 if params.temperature == 0 else params.seed % 10
            text = f" The answer is {answer}.\nQuestion: more text"  # the engine got stop=None here: cut by us
            out = types.SimpleNamespace(text=text, token_ids=list(range(len(prompt["prompt_token_ids"]) % 7 + 3)))
            outputs.append(types.SimpleNamespace(outputs=[out]))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = lambda **kwargs: types.SimpleNamespace(**kwargs)
    FakeLLM.instances = []
    monkeypatch.setitem(sys.modules, "vllm", module)
    return FakeLLM


def test_samples_are_seeded_per_sample_whatever_the_batching(tiny_model_dir, fake_vllm):
    config = VLLMConfig(tensor_parallel_size=2, gpu_memory_utilization=0.5, dtype="bfloat16")
    backend = load_backend(tiny_model_dir, config)
    tokenizer = backend.tokenizer
    assert isinstance(backend, VLLMBackend) and backend.report()["backend"] == "vllm"
    llm = fake_vllm.instances[0]
    assert llm.model == tiny_model_dir
    assert llm.kwargs == {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.5, "max_model_len": None,
                          "dtype": "bfloat16"}
    prompts = ["What is 2 + 3?", "Is the sky green?", "What is 9 + 1?"]
    kwargs = dict(num_samples=3, temperature=1.0, top_p=0.9, max_new_tokens=12, stop=["\nQuestion:"], seed=5,
                  progress=False)
    small = backend.sample_completions(prompts, batch_size=2, **kwargs)
    assert len(llm.calls) == 5  # 9 samples in batches of 2
    large = backend.sample_completions(prompts, batch_size=7, **kwargs)
    assert [[(c.text, c.num_tokens) for c in g] for g in small] == [[(c.text, c.num_tokens) for c in g] for g in large]
    # sample k of the flat list (prompt i, sample j: k = 3 i + j) is seeded 5 + k and cut at the stop string
    assert [[c.text for c in g] for g in small] == [[f"The answer is {(5 + 3 * i + j) % 10}." for j in range(3)]
                                                    for i in range(3)]
    sent = [p["prompt_token_ids"] for prompts_, _ in llm.calls[:5] for p in prompts_]
    expected = [tokenizer(build_prompt(tokenizer, p, True), add_special_tokens=False).input_ids for p in prompts]
    assert sent == [expected[i] for i in range(3) for _ in range(3)]  # chat template applied here, no second BOS
    params = llm.calls[0][1][0]
    assert (params.n, params.temperature, params.top_p, params.max_tokens, params.stop) == (1, 1.0, 0.9, 12,
                                                                                            ["\nQuestion:"])
    greedy = backend.sample_completions(prompts[:1], temperature=0.0, top_p=0.9, stop=["\nQuestion:"], progress=False)
    assert greedy[0][0].text == "The answer is 5." and llm.calls[-1][1][0].top_p == 1.0


def test_generate_file_resumes_with_the_uninterrupted_samples(tiny_model_dir, fake_vllm, tmp_path):
    questions = arithmetic_questions(4)
    config = GenerationConfig(num_candidates=2, max_new_tokens=8, batch_size=2, temperature=1.0)
    whole = tmp_path / "whole.parquet"
    generate_file(questions, whole, tiny_model_dir, config, progress=False, engine=VLLMConfig())
    records = read_records(whole)
    assert {r["consistency_id"] for r in records} == set(range(4))

    cut = tmp_path / "cut.parquet"
    original = FakeLLM.generate

    def third_call_interrupted(self, prompts, sampling_params, use_tqdm=True):
        self.fail_on_call = 3
        return original(self, prompts, sampling_params, use_tqdm)

    FakeLLM.generate = third_call_interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            generate_file(questions, cut, tiny_model_dir, config, progress=False, engine=VLLMConfig())
    finally:
        FakeLLM.generate = original
    assert not cut.exists() and len(checkpoint_path(cut).read_text().splitlines()) == 4  # two batches kept
    with pytest.raises(InputError, match="other questions, model or settings"):  # samples of another engine
        generate_file(questions, cut, tiny_model_dir, config, progress=False, resume=True)
    generate_file(questions, cut, tiny_model_dir, config, progress=False, resume=True, engine=VLLMConfig())
    assert len(fake_vllm.instances[-1].calls) == 2  # only the two unfinished batches were sampled
    assert read_records(cut) == records and not checkpoint_path(cut).exists()


def test_cli_generate_vllm(tiny_model_dir, fake_vllm, tmp_path):
    out = tmp_path / "claims.parquet"
    result = CliRunner().invoke(app, ["generate", "--task", "arithmetic", "--limit", "3", "--model", tiny_model_dir,
                                      "--vllm", "--tensor-parallel-size", "4", "--dtype", "bf16", "--output", str(out),
                                      "--num-candidates", "2", "--temperature", "1.0", "--batch-size", "512"])
    assert result.exit_code == 0, result.output
    assert len(fake_vllm.instances[0].calls) == 1  # one engine call for all 6 samples
    assert fake_vllm.instances[0].kwargs["tensor_parallel_size"] == 4
    assert fake_vllm.instances[0].kwargs["dtype"] == "bfloat16"
    assert {r["consistency_id"] for r in read_records(out)} == {0, 1, 2}


@pytest.mark.parametrize("extra, message", [([], "pip install vllm"),
                                            (["--base-url", "http://127.0.0.1:9/v1"], "not both")])
def test_cli_vllm_errors_in_one_line(tiny_model_dir, tmp_path, monkeypatch, extra, message):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    out = tmp_path / "claims.parquet"
    result = CliRunner().invoke(app, ["generate", "--task", "arithmetic", "--limit", "2", "--model", tiny_model_dir,
                                      "--vllm", "--output", str(out), *extra])
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not out.exists() and not checkpoint_path(out).exists()
