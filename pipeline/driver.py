"""Runs whose driver died: a run record names the process that drives it, so a record left `running` by a
driver that was killed (SIGKILL, OOM, a closed laptop) can be told from one still running.

A record holds its driver's host, pid and process start time (a pid alone may be reused). `ls` and `show` call
a `running` record whose driver was on this host and is gone `killed`; the next `pipeline run` on the host
writes that into the record and ends its MLflow runs (the parent and any stage run still open) as KILLED. A
record from another host stays `running` until a run on its host looks at it.
"""

from __future__ import annotations

import os
import socket
import time

import psutil

KILLED = "killed"


def identity() -> dict:
    """This process as a run record's `driver`."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}


def gone(record: dict) -> bool:
    """A `running` record whose driver ran on this host and is no longer alive (or its pid is another process's)."""
    driver = record.get("driver")
    if record.get("status") != "running" or not isinstance(driver, dict) or driver.get("host") != socket.gethostname():
        return False
    try:
        pid, started = int(driver["pid"]), float(driver["started"])
    except (KeyError, TypeError, ValueError):
        return False  # a record it cannot read: not this module's to judge
    try:
        return abs(psutil.Process(pid).create_time() - started) > 1.0
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False  # alive but not ours to inspect


def shown_status(record: dict) -> str:
    return KILLED if gone(record) else record["status"]


def end_killed_runs(store, tracker, current_uri: str, by_run: str) -> list[str]:
    """Mark every record of `store` whose driver is gone as killed, and end its MLflow runs when they are in the
    tracking store this run uses (`current_uri`, as records keep it: redacted). Returns the run ids marked."""
    from .redact import redact_text

    marked = []
    for record in store.runs():
        if not gone(record):
            continue
        record["status"] = KILLED
        record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        record["ended_by"] = f"its driver process ended without finishing the run; marked by run {by_run}"
        if record.get("mlflow_run_id") and record.get("mlflow_uri") == redact_text(current_uri):
            tracker.end_killed(record["mlflow_run_id"])
        store.save_run(record)
        marked.append(record["run_id"])
    return marked
