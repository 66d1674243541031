"""A shared MLflow tracking server with its artifacts on S3, as a cluster uses it (infra/mlflow): the CLI logs to
`MLFLOW_TRACKING_URI=http://...` and the server stores every artifact in the bucket (`--artifacts-destination
s3://...`, moto), so the driver needs no S3 credentials of its own for tracking."""

from __future__ import annotations

import pytest
from cli import DATA_ONLY, clean_env, free_port, pipeline
from mlflow_server import start_server, stop, wait_until_up
from s3_server import moto_s3

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

BUCKET = "mlflow-artifacts"


def test_a_run_logs_to_the_server_and_its_artifacts_land_in_the_bucket(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import PipelineTracker

    with moto_s3(BUCKET) as s3:
        env = {**clean_env(), "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
        env |= {"MLFLOW_S3_ENDPOINT_URL": s3.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
        port, log = free_port(), tmp_path / "server.log"
        destination = ("--artifacts-destination", f"s3://{BUCKET}/tracking", "--serve-artifacts")
        server = start_server(tmp_path / "tracking.db", port, log, *destination, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_up(url, server, log, timeout=180)
            workspace = tmp_path / "workspace"
            workspace.mkdir()
            client_env = {**clean_env(), "MLFLOW_TRACKING_URI": url}  # no S3 credentials: the server holds them
            result = pipeline(workspace, "run", "conf=tiny", *DATA_ONLY, env=client_env, timeout=600)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            assert not (workspace / "mlflow.db").exists(), "the run logged to the server, not a local file"

            client = MlflowClient(url)
            experiment = client.get_experiment_by_name("ernie-pipeline")
            runs = client.search_runs([experiment.experiment_id])
            parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
            data = next(r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
            assert parent.info.status == data.info.status == "FINISHED"
            assert data.data.metrics["packing_efficiency"] > 0.5
            assert data.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied by the server
            logged = {a.path for a in client.list_artifacts(data.info.run_id)}
            assert logged, "the data stage logs its figures and stats"
            stored = s3.fs.find(f"{BUCKET}/tracking")
            assert any(data.info.run_id in key for key in stored), stored[:10]
            assert any(parent.info.run_id in key and key.endswith("config.yaml") for key in stored)

            # the registry, as the pipeline registers its quantized model (served from the same server)
            tracker = PipelineTracker(url, "ernie-pipeline")
            version = tracker.register_model("tiny-model", data.info.artifact_uri, data.info.run_id)
            found = client.get_model_version("tiny-model", version)
            assert (found.version, found.run_id, found.source) == ("1", data.info.run_id, data.info.artifact_uri)
            assert found.status == "READY"
        finally:
            stop(server)
