"""Kills the earlier kill tests do not cover: the stage's Ray actor alone, and the driver alone (SIGKILL).

The data stage runs through the real CLI on a local Ray; each kill lands while its shards are being written
(its staging directory holds a shard). Either way the run stops without a manifest for the partial output, and
the same command run again completes with exactly the artifact of an uninterrupted run (same content digest).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from cli import clean_env, pipeline

pytestmark = [pytest.mark.slow, pytest.mark.faults]

DATA = [
    "conf=tiny",
    "stages=[data]",
    "model=tiny_moe",
    "data.sources=[{name:stdlib-docs,kind:stdlib,weight:0.7},{name:arithmetic,kind:arithmetic,weight:0.3}]",
    "data.max_documents=600",
    "data.arithmetic_documents=300",
    "data.rows_per_shard=8",
    "data.window_rows=32",
]
WAIT_S = 240


def _manifests(workspace: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((workspace / "runs/artifacts/data").glob("*/manifest.json"))]


def _start(workspace: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", *DATA],
        cwd=workspace,
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the driver and the local Ray it starts: cleaned up as one group at the end
    )


def _wait_for_a_staged_shard(workspace: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if any((workspace / "runs/artifacts/data").glob(".staging-*/*/shard-*.tar")):
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it wrote a shard: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    pytest.fail("the data stage never wrote a shard")


def _stage_actor(session: int) -> psutil.Process:
    """The Ray worker process running the stage actor, in the run's own session."""
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if os.getsid(proc.pid) == session and any("StageActor" in part for part in proc.info["cmdline"] or []):
                return proc
        except (psutil.Error, ProcessLookupError):
            continue
    raise AssertionError("no StageActor process in the run's session")


def _end_session(session: int) -> None:
    try:
        os.killpg(session, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory) -> dict:
    workspace = tmp_path_factory.mktemp("undisturbed")
    result = pipeline(workspace, "run", *DATA, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (manifest,) = _manifests(workspace)
    return manifest


def test_a_killed_stage_actor_fails_the_stage_clearly_and_the_rerun_matches(undisturbed, tmp_path):
    run = _start(tmp_path)
    try:
        _wait_for_a_staged_shard(tmp_path, run)
        _stage_actor(run.pid).kill()
        _, stderr = run.communicate(timeout=WAIT_S)
    finally:
        _end_session(run.pid)
    failure = next((line for line in stderr.splitlines() if "stage data failed" in line), stderr[-500:])
    print(f"\nstage actor SIGKILLed mid-stage: exit {run.returncode}; {failure.strip()}")
    assert run.returncode == 1
    assert "stage data failed" in stderr and "resume with" in stderr.lower()
    assert _manifests(tmp_path) == []
    killed = list((tmp_path / "runs/artifacts/data").glob(".staging-*"))
    assert killed, "the killed actor could not delete its staging directory"
    result = pipeline(tmp_path, "run", *DATA, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (manifest,) = _manifests(tmp_path)
    assert manifest["content_digest"] == undisturbed["content_digest"]
    # the rerun deleted the dead actor's half-written output
    assert not list((tmp_path / "runs/artifacts/data").glob(".staging-*")), killed


def test_a_driver_killed_alone_leaves_no_artifact_and_the_rerun_matches(undisturbed, tmp_path):
    run = _start(tmp_path)
    try:
        _wait_for_a_staged_shard(tmp_path, run)
        actor = _stage_actor(run.pid)
        run.send_signal(signal.SIGKILL)  # the driver only: Ray's processes in its session live on
        run.wait(timeout=30)
        actor.wait(timeout=120)  # Ray ends the dead driver's job and its actors
    finally:
        _end_session(run.pid)
    print(f"\ndriver SIGKILLed alone mid-stage: its stage actor {actor.pid} ended after it")
    assert _manifests(tmp_path) == []
    result = pipeline(tmp_path, "run", *DATA, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (manifest,) = _manifests(tmp_path)
    assert manifest["content_digest"] == undisturbed["content_digest"]
