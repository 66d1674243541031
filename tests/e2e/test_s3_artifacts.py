"""Artifacts on S3: a real S3 API (moto_server on 127.0.0.1) through s3fs, end to end."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli import clean_env, free_port, pipeline, stage_lines

pytestmark = pytest.mark.slow
SMALL = [
    "data.max_documents=300",
    "data.arithmetic_documents=200",
    "pretrain.steps=10",
    "eval.max_items=4",
    "eval.max_rows=8",
]


@pytest.fixture(scope="module")
def s3_env():
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = clean_env()
    endpoint = f"http://127.0.0.1:{port}"
    env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
        FSSPEC_S3_ENDPOINT_URL=endpoint,
    )
    import s3fs

    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=endpoint)
    deadline = time.time() + 30
    while True:
        try:
            fs.mkdir("ernie-test")
            break
        except Exception:  # noqa: BLE001 - server still starting
            if time.time() > deadline:
                server.kill()
                raise
            time.sleep(0.3)
    yield env, fs
    server.kill()
    server.wait()


def test_stages_write_and_read_artifacts_on_s3(tmp_path, s3_env):
    env, fs = s3_env
    words = ["run", "conf=tiny", "artifacts.root=s3://ernie-test/runs", *SMALL, "until=pretrain"]
    result = pipeline(tmp_path, *words, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert stage_lines(result.stdout) == {"data": "done", "pretrain": "done"}
    for stage in ("data", "pretrain"):
        manifests = fs.glob(f"ernie-test/runs/{stage}/*/manifest.json")
        assert len(manifests) == 1, stage
    assert fs.glob("ernie-test/runs/pretrain/*/config.json")
    assert fs.glob("ernie-test/runs/runs/*.json")
    assert not (tmp_path / "runs" / "artifacts").exists()  # nothing written to the local default root
    rerun = pipeline(tmp_path, *words, env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert stage_lines(rerun.stdout) == {"data": "cached", "pretrain": "cached"}


def test_unwritable_bucket_is_a_clear_error(tmp_path, s3_env):
    env, _ = s3_env
    result = pipeline(
        tmp_path, "run", "conf=tiny", "artifacts.root=s3://no-such-bucket/x", *SMALL, "until=data", env=env
    )
    assert result.returncode == 2
    assert "artifacts.root=s3://no-such-bucket/x is not writable" in result.stderr
