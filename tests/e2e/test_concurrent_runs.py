"""Two runs that need the same stage output at once: the second waits for the one running it and
takes its artifact, so the stage runs once and its resume state has one writer (`pipeline.keylock`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cli import DATA_ONLY, clean_env, pipeline, stage_lines

from pipeline.keylock import held

pytestmark = pytest.mark.slow
# the data stage as a missing artifact, not a recompute (`stages=[data]` would rerun it even when cached)
UNTIL_DATA = ["until=data" if word == "stages=[data]" else word for word in DATA_ONLY]


def _roots(workdir: Path) -> list[str]:
    return [f"artifacts.root={workdir / 'artifacts'}", f"artifacts.local_root={workdir / 'local'}"]


def _lines_until(stream, needle: str, seen: list[str], found: threading.Event) -> None:
    for line in stream:
        seen.append(line)
        if needle in line:
            found.set()


def test_a_second_run_waits_for_the_first_and_takes_its_artifact(tmp_path):
    first = tmp_path / "first"
    first.mkdir()
    made = pipeline(first, "run", "conf=tiny", *UNTIL_DATA, *_roots(first), timeout=600)
    assert made.returncode == 0, made.stderr[-3000:]
    [manifest] = (first / "artifacts" / "data").glob("*/manifest.json")
    key, first_run = manifest.parent.name, json.loads(manifest.read_text())["pipeline_run"]

    # the second run finds the key's lock held, as if a run were producing the artifact right now
    second = tmp_path / "second"
    lock = second / "local" / "locks" / "data" / f"{key}.lock"
    with held(lock, {"pipeline_run": first_run, "pid": 4242}, lambda other: None):
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", "conf=tiny", *UNTIL_DATA, *_roots(second)],
            cwd=tmp_path,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        seen, waiting = [], threading.Event()
        reader = threading.Thread(target=_lines_until, args=(proc.stderr, "waiting:", seen, waiting), daemon=True)
        reader.start()
        try:
            assert waiting.wait(300), "".join(seen)[-3000:]
        except BaseException:
            proc.kill()
            raise
        assert f"run {first_run} (pid 4242) is running this stage" in "".join(seen)
        assert proc.poll() is None, "the second run went on while the lock was held"
        # the holder finishes: its artifact lands (manifest last), then it lets go
        shutil.copytree(manifest.parent, second / "artifacts" / "data" / key)
    stdout = proc.stdout.read()  # stderr: still the reader's
    proc.wait(300)
    reader.join(30)
    assert proc.returncode == 0, "".join(seen)[-3000:]
    assert stage_lines(stdout) == {"data": "cached"}
    assert f"produced by run {first_run}" in stdout
    [record] = (second / "artifacts" / "runs").glob("*.json")
    assert json.loads(record.read_text())["stages"]["data"]["status"] == "cached"
    assert not list((second / "artifacts" / "data").glob(".staging-*")), "the second run staged an output of its own"
