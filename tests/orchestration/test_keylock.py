"""`pipeline.keylock`: a second process waits for the holder of a cache key's lock, is told who holds
it, and gets the lock once the holder lets go or dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pipeline.keylock import held

ROOT = Path(__file__).resolve().parents[2]
HOLDER = """
import sys
from pathlib import Path
from pipeline.keylock import held
with held(Path(sys.argv[1]), {"pipeline_run": "first", "pid": 1234}, lambda other: None):
    print("held", flush=True)
    sys.stdin.readline()
"""


def _holder(lock: Path) -> subprocess.Popen:
    """A process that holds `lock` until a line arrives on its stdin."""
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert child.stdout.readline().strip() == "held"
    return child


def _take(lock: Path, holder: dict, told: list) -> tuple[threading.Thread, threading.Event]:
    """A thread that takes `lock` (recording what it is told while it waits) and sets the event inside."""
    entered = threading.Event()

    def take():
        with held(lock, holder, told.append):
            entered.set()

    thread = threading.Thread(target=take)
    thread.start()
    return thread, entered


def _release(child: subprocess.Popen) -> None:
    child.stdin.write("\n")
    child.stdin.flush()
    child.wait(30)


def test_a_second_run_waits_for_the_holder_and_is_told_who_it_is(tmp_path):
    lock = tmp_path / "locks" / "data" / "k.lock"
    child = _holder(lock)
    told = []
    thread, entered = _take(lock, {"pipeline_run": "second"}, told)
    try:
        assert not entered.wait(1.0), "the lock was taken while its holder still held it"
        assert told == [{"pipeline_run": "first", "pid": 1234}]
    finally:
        _release(child)
    assert entered.wait(30), "the lock was not taken once its holder let it go"
    thread.join(30)
    assert json.loads(lock.read_text()) == {"pipeline_run": "second"}


def test_a_killed_holder_leaves_the_lock_free(tmp_path):
    lock = tmp_path / "k.lock"
    child = _holder(lock)
    child.send_signal(signal.SIGKILL)
    child.wait(30)
    told = []
    start = time.monotonic()
    with held(lock, {"pipeline_run": "next"}, told.append):
        pass
    assert told == [] and time.monotonic() - start < 5


def test_an_unreadable_holder_record_still_waits(tmp_path):
    """The holder may be rewriting its record this instant: the waiter is told nothing, and still waits."""
    lock = tmp_path / "k.lock"
    child = _holder(lock)
    lock.write_text("{not json")
    told = []
    thread, entered = _take(lock, {}, told)
    try:
        assert not entered.wait(0.5)
        assert told == [{}]
    finally:
        _release(child)
    thread.join(30)
    assert entered.is_set()
