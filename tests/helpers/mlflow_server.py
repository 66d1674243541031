"""An MLflow tracking server on loopback for tests: started in its own session, stopped with its workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from cli import clean_env


def start_server(db: Path, port: int, log: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """`mlflow server` on `db` (SQLite) at 127.0.0.1:`port`; `extra`: more server flags (artifact stores)."""
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "mlflow", "server"),
            *("--backend-store-uri", f"sqlite:///{db}"),
            *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
            *extra,
        ],
        cwd=db.parent,
        env=env or clean_env(),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the server starts uvicorn and a job runner: stopped together below
    )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)
    except ProcessLookupError:
        pass


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail(f"the MLflow server never answered at {url}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
