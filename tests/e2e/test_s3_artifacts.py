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
    # the stage trains in its own process (Ray Train's local mode): workers on S3 are tests/cluster's
    "pretrain.num_workers=0",
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
    _pretrain_state_is_in_the_bucket_and_resumes(tmp_path, words, env, fs)
    rerun = pipeline(tmp_path, *words, env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert stage_lines(rerun.stdout) == {"data": "cached", "pretrain": "cached"}


def _pretrain_state_is_in_the_bucket_and_resumes(tmp_path: Path, words: list[str], env: dict, fs) -> None:
    """The stage wrote the train state under the root's .work/ prefix, not to local disk; with the
    artifact deleted (the state kept), a rerun resumes from it at the saved step."""
    import json

    from mlflow.tracking import MlflowClient

    (artifact,) = [p.rsplit("/", 1)[0] for p in fs.glob("ernie-test/runs/pretrain/*/manifest.json")]
    key = artifact.rsplit("/", 1)[1]
    state = f"ernie-test/runs/.work/pretrain/{key}/train_state"
    meta = json.loads(fs.cat_file(f"{state}/meta.json"))
    assert meta["step"] == 10 and fs.glob(f"{state}/{meta['dir']}/*.distcp")
    assert fs.exists(f"{artifact}/train_state/{meta['dir']}/.metadata"), "the artifact holds a copy"
    assert not [p for p in tmp_path.rglob("*") if p.name == "train_state"], "no train state on local disk"

    fs.rm(artifact, recursive=True)
    resumed = pipeline(tmp_path, *words, env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert stage_lines(resumed.stdout) == {"data": "cached", "pretrain": "done"}
    assert fs.exists(f"{artifact}/manifest.json")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ernie-pipeline").experiment_id
    runs = client.search_runs([experiment], "tags.stage = 'pretrain'", order_by=["attributes.start_time DESC"])
    assert [r.data.metrics.get("resumed_from_step") for r in runs] == [10.0, None]


def test_unwritable_bucket_is_a_clear_error(tmp_path, s3_env):
    env, _ = s3_env
    result = pipeline(
        tmp_path, "run", "conf=tiny", "artifacts.root=s3://no-such-bucket/x", *SMALL, "until=data", env=env
    )
    assert result.returncode == 2
    assert "artifacts.root=s3://no-such-bucket/x is not writable" in result.stderr


def _png(colour: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 99, 199)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_data_stage_reads_sources_from_s3_counts_corrupt_inputs_and_writes_shards_to_s3(tmp_path, s3_env):
    import json

    env, fs = s3_env
    texts = [json.dumps({"text": f"document {i}: the quick brown fox jumps over {i} lazy dogs."}) for i in range(300)]
    lines = [t.encode() for t in texts[:150]] + [b'{"text": "caf\xe9 au lait"}'] + [t.encode() for t in texts[150:]]
    fs.pipe("ernie-test/src/web/part-0.jsonl", b"\n".join(lines) + b"\n")
    captions = []
    for i in range(60):
        fs.pipe(f"ernie-test/src/caps/img/{i}.png", _png((4 * i, 100, 200 - 3 * i)))
        captions.append({"image": f"img/{i}.png", "text": f"a square of colour number {i}"})
    fs.pipe("ernie-test/src/caps/img/truncated.jpg", _jpeg()[:300])
    captions += [{"image": "img/truncated.jpg", "text": "cut short"}, {"image": "img/absent.png", "text": "gone"}]
    fs.pipe("ernie-test/src/caps/index.jsonl", "\n".join(json.dumps(c) for c in captions).encode() + b"\n")
    fs.pipe("ernie-test/src/empty/none.jsonl", b"")
    sources = (
        "data.sources=[{name:web,kind:jsonl,path:s3://ernie-test/src/web/,weight:0.8},"
        "{name:caps,kind:image-text,path:s3://ernie-test/src/caps/index.jsonl,weight:0.2},"
        "{name:empty,kind:jsonl,path:s3://ernie-test/src/empty/,weight:0.1}]"
    )
    words = ["run", "conf=tiny", "model=tiny_vl", "model.vocab_size=1024", "quantize.group_size=16"]
    words.append("artifacts.root=s3://ernie-test/vl")
    result = pipeline(tmp_path, *words, sources, "until=data", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    (stats_path,) = fs.glob("ernie-test/vl/data/*/stats.json")
    stats = json.loads(fs.cat_file(stats_path))
    assert stats["errors"]["web"]["counts"] == {"bad_utf8": 1}
    assert "part-0.jsonl:line 151" in stats["errors"]["web"]["examples"][0]
    assert stats["errors"]["caps"]["counts"] == {"bad_image": 1, "missing_file": 1}
    assert stats["errors"]["empty"]["counts"] == {"empty_source": 1}
    assert stats["modalities"]["vision"]["tokens"] > 0 and stats["modalities"]["vision"]["images"] >= 60
    for name in ("web", "caps"):  # weights renormalised over the sources that have documents
        assert abs(stats["mixture"][name]["realised"] - {"web": 0.8, "caps": 0.2}[name]) < 0.02
    directory = stats_path.rsplit("/", 1)[0]
    index = json.loads(fs.cat_file(f"{directory}/train/index.json"))
    assert index["schema_version"] == 2 and "pixel_values" in index["fields"]
    assert len(fs.glob(f"{directory}/train/shard-*.tar")) == len(index["shards"])

    failing = pipeline(tmp_path, *words, sources, "data.on_error=fail", "until=data", env=env)
    assert failing.returncode == 2
    assert "part-0.jsonl:line 151" in failing.stderr and "UTF-8" in failing.stderr
