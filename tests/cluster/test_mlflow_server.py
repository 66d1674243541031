"""A shared MLflow tracking server with its artifacts on S3, as a cluster uses it (infra/mlflow): the CLI logs to
`MLFLOW_TRACKING_URI=http://...` and the server stores every artifact in the bucket (`--artifacts-destination
s3://...`, moto), so the driver needs no S3 credentials of its own for tracking."""

from __future__ import annotations

import os

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


AUTH_INI = """[mlflow]
default_permission = READ
database_uri = sqlite:///{db}
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
grant_default_workspace_access = false
"""


def test_a_server_with_basic_auth_takes_the_credentials_from_the_environment_and_refuses_a_run_without(tmp_path):
    """`mlflow server --app-name basic-auth`: the CLI logs with MLFLOW_TRACKING_USERNAME / _PASSWORD (MLflow's own
    variables); without them, or with a wrong password, it stops before any stage with one line naming the server
    and the variables; the password is never printed or logged."""
    import secrets

    from mlflow.tracking import MlflowClient

    password = "pw-" + secrets.token_hex(12)
    (tmp_path / "auth.ini").write_text(AUTH_INI.format(db=tmp_path / "auth.db"))
    env = {**clean_env(), "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth.ini"), "MLFLOW_AUTH_ADMIN_PASSWORD": password}
    env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(16)  # the auth app's CSRF protection needs one
    port, log = free_port(), tmp_path / "server.log"
    server = start_server(tmp_path / "tracking.db", port, log, "--app-name", "basic-auth", env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, server, log, timeout=180)
        workspace = tmp_path / "workspace"
        workspace.mkdir()
        for who, extra in (
            ("nobody", {}),
            ("a wrong password", {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "wrong-password"}),
        ):
            refused = pipeline(
                workspace, "run", "conf=tiny", *DATA_ONLY, env={**clean_env(), "MLFLOW_TRACKING_URI": url, **extra}
            )
            assert refused.returncode == 2, (who, refused.stdout[-2000:], refused.stderr[-3000:])
            (line,) = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
            assert url in line and "MLFLOW_TRACKING_USERNAME" in line and "HTTP 401" in line, (who, line)
            assert "Traceback" not in refused.stderr and not (workspace / "runs").exists(), who
        print(f"\nwithout credentials: {line}")

        credentials = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}
        result = pipeline(
            workspace, "run", "conf=tiny", *DATA_ONLY, env={**clean_env(), "MLFLOW_TRACKING_URI": url, **credentials}
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert password not in result.stdout + result.stderr
        os.environ.update(credentials)
        try:
            client = MlflowClient(url)
            experiment = client.get_experiment_by_name("ernie-pipeline")
            runs = client.search_runs([experiment.experiment_id])
        finally:
            for name in credentials:
                os.environ.pop(name)
        assert {r.info.status for r in runs} == {"FINISHED"} and len(runs) == 2  # the parent and the data stage
        for run in runs:
            assert password not in str(run.data.params) + str(run.data.tags)
    finally:
        stop(server)
