"""Secrets never reach MLflow params, config.yaml, printed lines or error messages.

The MLflow checks run a real tracking store (SQLite in tmp_path) through `PipelineTracker`, as a
pipeline run does, and read back what it recorded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.redact import MASK, is_secret_key, redact_params, redact_text

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY"
TOKEN = "hf_kLmNoPqRsTuVwXyZ0123456789"
PASSWORD = "hunter2-correct-horse"


@pytest.mark.parametrize(
    "key",
    [
        "aws_secret_access_key",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ACCESS_KEY_ID",
        "AWS_SESSION_TOKEN",
        "storage.secret",
        "hf_token",
        "HF_TOKEN",
        "apiKey",
        "api_key",
        "MLFLOW_TRACKING_PASSWORD",
        "db.password",
        "X-Amz-Signature",
        "X-Amz-Credential",
        "client_credentials",
    ],
)
def test_secret_looking_keys(key):
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key",
    [
        "model.pad_token_id",
        "model.image_start_token_id",
        "serve.max_tokens",
        "posttrain.rlvr.max_new_tokens",
        "data.tokenizer",
        "model.loss.token_balanced",
        "quantize.min_expert_tokens",
        "cache_key",
        "AWS_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_CA_BUNDLE",
        "AWS_SHARED_CREDENTIALS_FILE",
        "token_path",
        "PWD",
        "OLDPWD",
        "artifacts.root",
    ],
)
def test_ordinary_keys_are_left_alone(key):
    assert not is_secret_key(key)


def test_text_loses_url_passwords_signatures_assignments_and_environment_secrets():
    env = {"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1", "HOME": "/root"}
    text = (
        f"cannot write s3://bkt/x ({SECRET}) in us-east-1; tracking https://bob:{PASSWORD}@mlflow.example.com/api "
        f"https://bkt.s3.amazonaws.com/a.tar?X-Amz-Credential=AKIA1&X-Amz-Signature=f00d&part=2 "
        f"+tracking.token={TOKEN} 'password': '{PASSWORD}' secret_key: abc model.moe.top_k=99 pad_token_id=0"
    )
    out = redact_text(text, env)
    for secret in (SECRET, PASSWORD, TOKEN, "f00d", "AKIA1", "abc"):
        assert secret not in out
    for kept in ("us-east-1", "bob:***@mlflow.example.com", "part=2", "model.moe.top_k=99", "pad_token_id=0"):
        assert kept in out


def test_paths_of_the_environment_stay_readable():
    """The working directory and the CA bundle are not secrets: a run under /tmp/x must show its paths."""
    env = {
        "PWD": "/tmp/relrun",
        "AWS_CA_BUNDLE": "/etc/ssl/certs/ca.crt",
        "AWS_RETRY_MODE": "standard",
        "AWS_SESSION_TOKEN": TOKEN,
    }
    text = f"sqlite:////tmp/relrun/mlflow.db /etc/ssl/certs/ca.crt standard {TOKEN}"
    assert redact_text(text, env) == "sqlite:////tmp/relrun/mlflow.db /etc/ssl/certs/ca.crt standard ***"


def test_params_mask_secret_keys_and_keep_the_rest():
    params = {"s.aws_secret_access_key": SECRET, "model.pad_token_id": 0, "s.region": "eu", "s.token": ""}
    assert redact_params(params, {}) == {
        "s.aws_secret_access_key": MASK,
        "model.pad_token_id": 0,
        "s.region": "eu",
        "s.token": "",
    }


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("HF_TOKEN", TOKEN)


def test_mlflow_params_tags_and_config_yaml_hold_no_secret(tmp_path, secret_env):
    from mlflow.tracking import MlflowClient

    from pipeline import config
    from pipeline.tracking import PipelineTracker

    cfg = config.load("tiny", [f"tracking.uri=https://bob:{PASSWORD}@mlflow.example.com/x"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = PipelineTracker(uri, "reliability")
    tracker.start("run", {"conf": "tiny", "note": f"token={TOKEN}"}, config.to_yaml(cfg))
    stage_params = {
        "sources": [{"name": "web", "path": f"https://bkt.s3.amazonaws.com/a.jsonl?X-Amz-Signature={SECRET}"}],
        "storage": {"aws_secret_access_key": SECRET, "region": "eu-west-1"},
        "steps": 3,
    }
    logger = tracker.stage("data", stage_params, {"cache": "miss"}, "data")
    logger.params({"hf_token": TOKEN, "model.pad_token_id": 0})  # what a stage may log itself
    for run_id in (tracker.parent_id, logger.run_id):
        tracker.finish(run_id, True)

    client = MlflowClient(uri)
    params = client.get_run(logger.run_id).data.params
    assert params["data.storage.aws_secret_access_key"] == MASK and params["hf_token"] == MASK
    assert params["data.storage.region"] == "eu-west-1" and params["data.steps"] == "3"
    assert params["model.pad_token_id"] == "0"
    assert "X-Amz-Signature=***" in params["data.sources"]
    parent = client.get_run(tracker.parent_id).data
    config_yaml = Path(client.download_artifacts(tracker.parent_id, "config.yaml", str(tmp_path))).read_text()
    assert "bob:***@mlflow.example.com" in config_yaml
    recorded = json.dumps([params, parent.params, parent.tags, config_yaml])
    for secret in (SECRET, TOKEN, PASSWORD):
        assert secret not in recorded


def test_show_and_errors_print_no_secret(tmp_path, capsys, secret_env):
    root = tmp_path / "root"
    (root / "runs").mkdir(parents=True)
    record = {
        "run_id": "20250101-000000-abcdef",
        "conf": "tiny",
        "status": "finished",
        "started_at": "2025-01-01T00:00:00",
        "mlflow_uri": f"postgresql://ml:{PASSWORD}@db/mlflow",
        "stages": {"data": {"status": "ran", "cache_key": "k" * 64, "uri": f"s3://bkt/data?token={TOKEN}"}},
    }
    (root / "runs" / "r.json").write_text(json.dumps(record))
    assert cli.main(["show", "2025", f"artifacts.root={root}"]) == 0
    assert cli.main(["run", "conf=tiny", f"tracking.token={TOKEN}"]) == 2  # an unknown key: named, its value not
    assert cli.main(["ls", f"aws_secret_access_key={SECRET}"]) == 2  # echoed back as not accepted here
    printed = capsys.readouterr()
    assert "ml:***@db/mlflow" in printed.out and "token=***" in printed.out
    assert "unknown configuration key tracking.token " in printed.err and "'aws_secret_access_key=***'" in printed.err
    for secret in (SECRET, TOKEN, PASSWORD):
        assert secret not in printed.out + printed.err


def test_a_stage_failure_prints_no_secret(capsys, secret_env):
    from pipeline.executor import StageFailure
    from pipeline.ui import ConsoleUI

    error = RuntimeError(f"botocore refused key {SECRET} for token {TOKEN}")
    failure = StageFailure("data", error, f"Traceback ...\n  raise RuntimeError({SECRET!r})\nRuntimeError: {TOKEN}")
    ConsoleUI().failure(failure, f"python -m pipeline run conf=tiny tracking.uri=https://u:{PASSWORD}@h")
    err = capsys.readouterr().err
    assert "stage data failed: RuntimeError: botocore refused key ***" in err
    for secret in (SECRET, TOKEN, PASSWORD):
        assert secret not in err
