"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

The default store is `sqlite:///<cwd>/mlflow.db`; `MLFLOW_TRACKING_URI` (or
`tracking.uri`) points anywhere else. Only the driver talks to it: a stage's process logs into a
`RelayLogger`, which the driver drains while it watches the stage and replays into the stage's
run (`MlflowLogger.replay`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from .contract import UserError, contained
from .redact import redact_params, redact_text


def tracking_uri(configured: str) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if is_dataclass(value):
        value = asdict(value)
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): value}


class MlflowLogger:
    """`StageLogger` bound to one MLflow run."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id
        self._client = None

    def __getstate__(self):
        return {"uri": self.uri, "run_id": self.run_id, "_client": None}

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.uri)
        return self._client

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        import time

        self.replay([("metrics", {k: float(v) for k, v in values.items()}, step, int(time.time() * 1000))])

    def params(self, values: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = redact_params(flatten(values))  # a config value or a stage's param may hold a secret
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def artifact(self, path, subdir: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), subdir)
        else:
            self.client.log_artifact(self.run_id, str(path), subdir)

    def figure(self, figure, name: str) -> None:
        self.client.log_figure(self.run_id, figure, name)

    def text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def replay(self, events: list[tuple]) -> None:
        """Write what a stage's `RelayLogger` queued: metrics in batches (MLflow takes up to 1,000 a call), at the
        time and step the stage logged them, then params and files in order."""
        import tempfile

        from mlflow.entities import Metric

        batch = [
            Metric(k, v, when, step or 0)
            for kind, *event in events
            if kind == "metrics"
            for values, step, when in [event]
            for k, v in values.items()
            if v == v  # drop NaN
        ]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])
        for kind, *event in events:
            if kind == "params":
                self.params(event[0])
            elif kind == "files":
                files, subdir = event
                with tempfile.TemporaryDirectory() as scratch:
                    for name, data in files:
                        path = contained(scratch, name, "a file the stage logged")
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_bytes(data)
                        where = "/".join(p for p in (subdir, Path(name).parent.as_posix()) if p and p != ".")
                        self.client.log_artifact(self.run_id, str(path), where or None)


class PipelineTracker:
    """Creates the parent run and the stage runs; finishes them with the right status."""

    def __init__(self, uri: str, experiment: str) -> None:
        import mlflow
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.uri = uri
        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(uri)
        try:
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        except MlflowException as err:
            status, where = _http_status(err), redact_text(uri)
            if status == 401:
                raise UserError(
                    f"the MLflow tracking server at {where} refused the request (HTTP 401: not authenticated). Set "
                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (basic auth) or MLFLOW_TRACKING_TOKEN to "
                    "credentials it accepts."
                ) from None
            if status == 403:
                raise UserError(
                    f"the MLflow tracking server at {where} refused the request (HTTP 403: permission denied). The "
                    "user of MLFLOW_TRACKING_USERNAME needs permission to read and create experiments and runs there."
                ) from None
            raise
        self.parent_id: str | None = None

    def start(self, run_name: str, tags: dict[str, str], config_yaml: str) -> MlflowLogger:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=redact_params(tags))
        self.parent_id = run.info.run_id
        self._system_metrics = _start_system_metrics(self.parent_id, self.uri)
        logger = MlflowLogger(self.uri, self.parent_id)
        logger.text(redact_text(config_yaml), "config.yaml")
        return logger

    def stage(self, name: str, params: Any, tags: dict[str, str], prefix: str = "") -> MlflowLogger:
        """A nested run; params are flattened under `prefix` (the config path, e.g. posttrain.sft)."""
        run = self.client.create_run(
            self.experiment_id, run_name=name, tags={"mlflow.parentRunId": self.parent_id, "stage": name, **tags}
        )
        logger = MlflowLogger(self.uri, run.info.run_id)
        logger.params(flatten(params, f"{prefix}." if prefix else ""))
        return logger

    def finish(self, run_id: str, ok: bool) -> None:
        if run_id == self.parent_id and getattr(self, "_system_metrics", None) is not None:
            self._system_metrics.finish()
            self._system_metrics = None
        self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")

    def end_killed(self, parent_run_id: str) -> None:
        """End a killed driver's pipeline run as KILLED: the parent run and its stage runs still RUNNING. A run this
        tracking store does not hold is left alone."""
        from mlflow.exceptions import MlflowException

        try:
            parent = self.client.get_run(parent_run_id)
        except MlflowException:
            return
        children = self.client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'",
        )
        for run in [*children, parent]:
            if run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, "KILLED")

    def register_model(self, name: str, source: str, run_id: str) -> str:
        """Register `source` (an artifact URI) as a new version of model `name`."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException:
            pass  # already registered
        version = self.client.create_model_version(name, source=source, run_id=run_id)
        return version.version

    def run_url(self, run_id: str) -> str:
        return f"{redact_text(self.uri)} experiment {self.experiment_id} run {run_id}"


def _http_status(err) -> int:
    """The HTTP status behind an MLflow client error (a plain-text reply, such as the basic-auth app's 401, shows
    up only in the message)."""
    import re

    found = re.search(r"error code (\d{3})", str(err))
    return int(found.group(1)) if found else err.get_http_status_code()


def _start_system_metrics(run_id: str, uri: str):
    """CPU / memory / GPU of the driver's machine on the parent run, sampled every 5 s."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=5, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception:  # noqa: BLE001 - system metrics are a nice-to-have, never a reason to fail a run
        return None
