"""The short crash test (``bench/chaos.py`` is the long one): `icm label` and `icm generate` are killed with
SIGKILL while they work, resumed, and must end with exactly the outputs of an uninterrupted run.

The kills wait for progress on disk (a checkpoint of the search, a finished batch of samples) so that they land
in the middle of the work, not while Python imports; the uninterrupted run and the final resume run in-process."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.chaos import _start, environment, stages, write_inputs
from icm.cli import app


def kill_when(stage, d: Path, env: dict[str, str], ready, timeout: float = 120.0) -> str:
    """Start the stage's command in ``d``, SIGKILL it as soon as ``ready(progress)`` holds; return the progress."""
    proc = _start(stage, d, env)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        progress = stage.progress(d)
        if ready(progress):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return progress
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"{stage.name} ended (exit {proc.returncode}) before the awaited progress: {stage.progress(d)}")


def run_in_process(stage, d: Path, monkeypatch) -> None:
    d.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(d)
    result = CliRunner().invoke(app, stage.args)
    assert result.exit_code == 0, result.output


@pytest.fixture
def chaos_env(tiny_model_dir, tmp_path, monkeypatch):
    write_inputs(tmp_path / "inputs")
    env = environment(tmp_path)
    monkeypatch.setenv("ICM_CHECKPOINT_SECONDS", "0")  # the in-process runs checkpoint every step too
    return stages(tiny_model_dir, tmp_path / "inputs", "test"), env


def test_label_killed_mid_search_resumes_to_the_same_labels(chaos_env, tmp_path, monkeypatch):
    """The contract of issue 13: `icm label ... --resume` after a SIGKILL gives exactly the uninterrupted labels."""
    table, env = chaos_env
    stage = table["label"]
    run_in_process(stage, tmp_path / "ref", monkeypatch)
    d = tmp_path / "chaos"
    killed = kill_when(stage, d, env, lambda p: p.startswith("1 batches done, batch") and "step 0" not in p)
    assert "step" in killed  # in the middle of the second batch's search
    run_in_process(stage, d, monkeypatch)
    assert stage.result(d) == stage.result(tmp_path / "ref")


def test_generate_killed_after_a_batch_resumes_to_the_same_candidates(chaos_env, tmp_path, monkeypatch):
    table, env = chaos_env
    stage = table["generate"]
    run_in_process(stage, tmp_path / "ref", monkeypatch)
    d = tmp_path / "chaos"
    kill_when(stage, d, env, lambda p: p[0].isdigit() and 4 <= int(p.split()[0]) < 32)
    run_in_process(stage, d, monkeypatch)
    assert stage.result(d) == stage.result(tmp_path / "ref")
