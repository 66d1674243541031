"""Runs whose driver died (`pipeline.driver`): told from running ones by the driver's host, pid and start time,
marked killed by the next run, and their MLflow runs ended as KILLED."""

from __future__ import annotations

import socket
import subprocess
import sys

from pipeline import driver
from pipeline.store import ArtifactStore
from pipeline.tracking import PipelineTracker


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def record(run_id: str, who: dict | None, status: str = "running", **more) -> dict:
    base = {"run_id": run_id, "conf": "tiny", "status": status, "started_at": "2026-12-02T10:00:00", "stages": {}}
    return {**base, **({"driver": who} if who is not None else {}), **more}


def test_a_running_record_is_killed_only_when_its_driver_on_this_host_is_gone():
    me = driver.identity()
    host = socket.gethostname()
    assert not driver.gone(record("alive", me))
    assert driver.gone(record("dead", {"host": host, "pid": dead_pid(), "started": me["started"]}))
    assert driver.gone(record("reused", {**me, "started": me["started"] - 3600}))  # the pid is another process now
    assert not driver.gone(record("elsewhere", {"host": host + "-other", "pid": dead_pid(), "started": 0.0}))
    assert not driver.gone(record("done", {"host": host, "pid": dead_pid(), "started": 0.0}, status="finished"))
    assert not driver.gone(record("old", None))  # a record from before drivers were recorded
    assert not driver.gone(record("odd", {"host": host, "pid": "x", "started": None}))
    assert driver.shown_status(record("dead", {"host": host, "pid": dead_pid(), "started": 0.0})) == "killed"


def test_the_next_run_marks_the_record_killed_and_ends_its_open_mlflow_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's SQLite store keeps run artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = PipelineTracker(uri, "driver-test")
    tracker.start("killed-run", {"conf": "tiny"}, "")
    parent = tracker.parent_id
    finished, open_stage = tracker.stage("data", {}, {}), tracker.stage("pretrain", {}, {})
    tracker.finish(finished.run_id, True)
    store = ArtifactStore(str(tmp_path / "artifacts"), tmp_path / "local")
    gone = {"host": socket.gethostname(), "pid": dead_pid(), "started": 0.0}
    store.save_run(record("r-killed", gone, mlflow_run_id=parent, mlflow_uri=uri))
    store.save_run(record("r-alive", driver.identity()))
    store.save_run(record("r-other-store", gone, mlflow_run_id="0" * 32, mlflow_uri="sqlite:///elsewhere.db"))

    marked = driver.end_killed_runs(store, PipelineTracker(uri, "another-experiment"), uri, "r-next")
    assert sorted(marked) == ["r-killed", "r-other-store"]
    runs = {r["run_id"]: r for r in store.runs()}
    assert runs["r-killed"]["status"] == "killed" and "marked by run r-next" in runs["r-killed"]["ended_by"]
    assert runs["r-alive"]["status"] == "running"
    status = {run_id: tracker.client.get_run(run_id).info.status for run_id in (parent, finished.run_id)}
    assert status == {parent: "KILLED", finished.run_id: "FINISHED"}
    assert tracker.client.get_run(open_stage.run_id).info.status == "KILLED"
    assert driver.end_killed_runs(store, tracker, uri, "r-later") == []  # once only
