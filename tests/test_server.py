"""Label and generate through a real OpenAI-compatible server: llama-cpp-python's server (installed by
scripts/setup.sh) started on 127.0.0.1 with the embedded SmolLM2 GGUF, the same weights the in-process backend
dequantizes. No mock stands in for the server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from icm.cli import app
from icm.data.claims import claims_from_records
from icm.models import _alias_gguf, load_model
from icm.scoring import ClaimScorer, PromptTemplate
from icm.server import ServerConfig, connect

runner = CliRunner()
MODEL = "smollm2-135m"
API_KEY = "sk-planted-server-key-0123456789abcdefghij"
COUNTRIES = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
             ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Russia", "Moscow")]
SERVER_CONTEXT = 1024  # the server's n_ctx; the label runs below pack demonstrations into 512 tokens
SCORE_TOLERANCE = 1.0
"""Largest |server - in-process| log-odds difference accepted. Measured on these claims: see
test_server_scores_match_in_process (the server's llama.cpp kernels run the Q4_1 weights with 8-bit quantized
activations, the in-process model their fp32 dequantization; and llama-cpp-python's server takes text, which it
tokenizes itself)."""


def capital_claims() -> list[dict]:
    """16 claims, two per country: the true capital and another country's (a consistency group each)."""
    rows = []
    for k, (country, city) in enumerate(COUNTRIES):
        wrong = COUNTRIES[(k + 3) % len(COUNTRIES)][1]
        for choice, label in ((city, True), (wrong, False)):
            rows.append({"question": f"What is the capital of {country}?",
                         "choice": f"The capital of {country} is {choice}.", "consistency_id": k,
                         "consistency_key": choice, "label": label})
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """llama-cpp-python's OpenAI-compatible server on a free local port, serving SmolLM2 as 'smollm2-135m'."""
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(_alias_gguf(MODEL)), "--model_alias", MODEL,
               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(SERVER_CONTEXT), "--n_threads", "1",
               "--n_threads_batch", "1", "--verbose", "False"]
    with log.open("wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 180
    try:
        while True:
            if server.poll() is not None:
                pytest.fail(f"llama_cpp.server exited ({server.returncode}): {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server did not start in 180 s: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def in_process():
    return load_model(MODEL, dtype="fp32")


def test_server_scores_match_in_process(llama_server, in_process):
    """The same claims and demonstrations, scored in-process and through the server: same sign, close values."""
    claims = claims_from_records(capital_claims(), "capitals")
    backend, tokenizer = connect(ServerConfig(base_urls=(llama_server,), model=MODEL))
    try:
        assert not backend.token_prompts  # llama-cpp-python's server takes text prompts only
        remote = backend.scorer(claims, PromptTemplate(), 512, 16)
        local = ClaimScorer(*in_process, claims, PromptTemplate(), 512, 16)
        demos = [(i, claims[i].key == COUNTRIES[i // 2][1]) for i in range(8, 16)]  # the last four countries, gold
        targets = list(range(8))
        for context in ((), demos):
            ours, theirs = local.score(targets, context), remote.score(targets, context)
            assert np.max(np.abs(ours - theirs)) <= SCORE_TOLERANCE, (ours, theirs)
            assert np.mean(np.sign(ours) == np.sign(theirs)) >= 0.85, (ours, theirs)
        report = backend.report()
        assert report["requests"] >= 16 and report["label_words_missing"] == 0
    finally:
        backend.close()


def test_label_and_generate_through_server(llama_server, tmp_path, monkeypatch):
    """`icm label` and `icm generate` with --base-url: the output schema of an in-process run, labels that agree
    with it, and the API key in no file written."""
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    src = write_jsonl(tmp_path / "capitals.jsonl", capital_claims())
    common = ["--seed", "0", "--iterations", "16", "--polish-iterations", "4", "--max-context-tokens", "512"]
    served, local = tmp_path / "served.parquet", tmp_path / "local.parquet"
    result = runner.invoke(app, ["label", str(src), "--output", str(served), "--base-url", llama_server,
                                 "--model", MODEL, "--concurrency", "4", *common])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["label", str(src), "--output", str(local), "--model", MODEL, "--dtype", "fp32",
                                 *common])
    assert result.exit_code == 0, result.output
    a, b = pq.read_table(served), pq.read_table(local)
    assert a.schema.names == b.schema.names
    agreement = np.mean([x == y for x, y in zip(a.column("icm_label").to_pylist(), b.column("icm_label").to_pylist())])
    assert agreement >= 0.75, agreement
    run = json.loads((tmp_path / "served.run" / "run.json").read_text())
    assert run["backend"]["backend"] == "server" and run["backend"]["requests"] > 0
    assert run["backend"]["servers"] == [llama_server] and run["backend"]["api_key_env"] == "OPENAI_API_KEY"

    out = tmp_path / "candidates.parquet"
    result = runner.invoke(app, ["generate", "--task", "sentiment", "--limit", "2", "--num-candidates", "2",
                                 "--temperature", "0.7", "--max-new-tokens", "12", "--output", str(out),
                                 "--base-url", llama_server, "--model", MODEL])
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert {r["question_id"] for r in rows} and all(r["generator"] == MODEL for r in rows)
    assert all(r["choice"] for r in rows)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert API_KEY.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("command", ["label", "generate"])
def test_unreachable_server_is_one_line_exit_2_and_no_output(command, tmp_path):
    src = write_jsonl(tmp_path / "capitals.jsonl", capital_claims())
    out = tmp_path / "out.parquet"
    args = [str(src)] if command == "label" else ["--task", "sentiment", "--limit", "2"]
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    result = runner.invoke(app, [command, *args, "--output", str(out), "--base-url", url, "--model", MODEL])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert url in result.output and "cannot reach" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["capitals.jsonl"]


def test_server_not_serving_the_model_says_what_it_serves(llama_server, tmp_path):
    src = write_jsonl(tmp_path / "capitals.jsonl", capital_claims())
    result = runner.invoke(app, ["label", str(src), "--output", str(tmp_path / "out.parquet"),
                                 "--base-url", llama_server, "--model", "gemma3-270m"])
    assert result.exit_code == 2, result.output
    assert "serves smollm2-135m" in " ".join(result.output.split())
    assert not (tmp_path / "out.parquet").exists() and not (tmp_path / "out.run").exists()
