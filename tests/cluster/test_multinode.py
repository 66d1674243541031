"""Multi-node on one machine, for real: a Ray head and a second Ray node (`ray start --head`,
`ray start --address`, separate process sessions on this machine), the pipeline's CLI pointed at them
through RAY_ADDRESS, artifacts on S3 (moto_server).

Where things run is forced by the nodes' resources, not left to the scheduler:
- node_a: 1 CPU, 4 GiB of Ray's logical `memory`; node_b: 1 CPU, 1 GiB. The run asks 2 GiB for the
  data, pretrain and sft stage actors (`*.resources.memory_gb=2`): they can only go to node_a. The dpo
  stage actor asks for the custom resource only node_b has (`resources.custom`): it runs there, and
  reads the dataset and SFT's checkpoint, which stages on node_a wrote, from S3.
- each training stage's 2 Ray Train workers take 1 CPU each: no node holds both, so one runs on each.
Each node reaches S3 through a recording proxy of its own (tests/helpers/ray_nodes.py): the proxy of
node_b seeing the dataset's shards and the input checkpoints read proves that the workers there read,
from S3, what the stages on node_a wrote, and its train-state writes that they resume from there.
Where the actors ran is read back from the GCS's actor table (dead actors included) after the run.

`make test-cluster` runs these (CI does, after `make test-faults`): about 2.5 minutes on an idle
2-core machine. The GCS's actor table is read through `ray._private.state`:
Ray's public state API needs the dashboard, which the nodes do not start.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from cli import clean_env, pipeline, stage_lines

from pipeline.contract import UserError

BUCKET = "ernie-cluster"
ROOT = f"s3://{BUCKET}/run"
RUN_SECONDS = 600
SMALL = [
    "data.max_documents=150",
    "data.arithmetic_documents=100",
    "data.scenes=40",
    "data.scene_chats=20",
    "data.sft_examples=40",
    "data.preference_pairs=40",
    "data.rlvr_prompts=40",
    "data.eval_tasks=20",
    "data.rows_per_shard=64",
    "pretrain.steps=4",
    "pretrain.eval_every=4",
    "pretrain.checkpoint_every=4",
    "pretrain.eval_rows=8",
    "posttrain.sft.steps=2",
    "posttrain.sft.eval_every=2",
    "posttrain.sft.checkpoint_every=2",
    "posttrain.sft.batch_size=4",
    "posttrain.dpo.steps=2",
    "posttrain.dpo.eval_every=2",
    "posttrain.dpo.checkpoint_every=2",
    "posttrain.dpo.batch_size=4",
    "eval.max_items=4",
    "eval.max_rows=8",
    # only node_a has the logical memory for these: the stage actors are pinned there
    "data.resources.memory_gb=2",
    "pretrain.resources.memory_gb=2",
    "posttrain.sft.resources.memory_gb=2",
    # and DPO's on node_b: only node_b offers the custom resource `node_b` (tests/helpers/ray_nodes.py)
    "++posttrain.dpo.resources.custom={node_b:0.5}",
    "until=dpo",
]
STAGES = ["data", "pretrain", "sft", "dpo"]

ACTORS = """
import json, sys, ray
import ray._private.state
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
print(json.dumps({"nodes": ray.nodes(), "actors": list(ray._private.state.actors().values())}, default=str))
"""


@dataclass
class TwoNodes:
    cluster: Any
    s3: Any
    s3_logs: dict
    """{node label: the requests its S3 endpoint forwarded}."""
    env: dict = field(repr=False)
    """The CLI's environment (the whole of this one's, and the cluster's auth token): kept out of reports."""


@pytest.fixture(scope="module")
def two_nodes():
    from ray_nodes import NodeSpec, nodes_with_own_s3_endpoints
    from s3_server import moto_s3

    with moto_s3(BUCKET) as s3:
        env = clean_env() | {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        specs = [NodeSpec("node_a", num_cpus=1, memory_gb=4), NodeSpec("node_b", num_cpus=1, memory_gb=1)]
        started = time.monotonic()
        with nodes_with_own_s3_endpoints(s3.endpoint, specs, env) as (cluster, s3_logs):
            print(f"two Ray nodes up in {time.monotonic() - started:.0f} s")
            # the driver (the CLI) reaches S3 directly: what the proxies saw came from the nodes
            driver_env = (
                env
                | cluster.client_env
                | {
                    "RAY_ADDRESS": cluster.address,
                    "AWS_ENDPOINT_URL": s3.endpoint,
                    "FSSPEC_S3_ENDPOINT_URL": s3.endpoint,
                }
            )
            yield TwoNodes(cluster, s3, s3_logs, driver_env)


def _cluster_state(two_nodes) -> tuple[dict[str, str], list[dict]]:
    """({node_id: label}, every actor the cluster has had, dead ones included)."""
    cluster = two_nodes.cluster
    out = subprocess.run(
        [sys.executable, "-c", ACTORS, cluster.address],
        env=clean_env() | cluster.client_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    state = json.loads(out.stdout.strip().splitlines()[-1])
    labels = {}
    for node in state["nodes"]:
        (label,) = [name for name in node["Resources"] if name in cluster.nodes]
        labels[node["NodeID"]] = label
    return labels, state["actors"]


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(900)  # the nodes' start counts too
def test_stages_and_train_workers_run_on_both_nodes_and_share_artifacts_through_s3(tmp_path, two_nodes):
    started = time.monotonic()
    result = pipeline(
        tmp_path, "run", "conf=tiny", f"artifacts.root={ROOT}", *SMALL, env=two_nodes.env, timeout=RUN_SECONDS
    )
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:] + two_nodes.cluster.logs()
    assert stage_lines(result.stdout) == dict.fromkeys(STAGES, "done")
    print(f"{' + '.join(STAGES)} on two nodes: {seconds:.0f} s")
    print("\n".join(line for line in result.stdout.splitlines() if line.split()[:1] in [[s] for s in STAGES]))

    labels, actors = _cluster_state(two_nodes)
    node_of = lambda actor: labels[actor["Address"]["NodeID"]]  # noqa: E731
    stage_actors = sorted((a for a in actors if a["ActorClassName"] == "StageActor"), key=lambda a: a["StartTime"])
    assert [node_of(a) for a in stage_actors] == ["node_a", "node_a", "node_a", "node_b"], "pinned by resources"
    workers = [a for a in actors if a["ActorClassName"] == "RayTrainWorker"]
    assert sorted(node_of(a) for a in workers) == ["node_a"] * 3 + ["node_b"] * 3, workers  # pretrain, sft, dpo

    fs = two_nodes.s3.fs
    (data_manifest,) = fs.glob(f"{BUCKET}/run/data/*/manifest.json")
    data_key = data_manifest.split("/")[-2]
    (pretrain_manifest,) = fs.glob(f"{BUCKET}/run/pretrain/*/manifest.json")
    pretrain_key = pretrain_manifest.split("/")[-2]
    assert fs.exists(f"{BUCKET}/run/pretrain/{pretrain_key}/model.safetensors")
    assert not fs.exists(f"{BUCKET}/run/.work/pretrain/{pretrain_key}/ray"), "Ray Train's copy is removed"

    a, b = two_nodes.s3_logs["node_a"], two_nodes.s3_logs["node_b"]
    dataset = f"/{BUCKET}/run/data/{data_key}/"
    assert a.paths("PUT", dataset + "train/shard-"), "node_a, where the data stage ran, placed the dataset"
    assert not a.paths("PUT", dataset + "manifest.json"), "the driver, not the stage, publishes the manifest"
    assert not b.paths("PUT", dataset), "node_b wrote nothing of the dataset"
    assert b.paths("GET", dataset + "train/shard-"), "the worker on node_b streamed its train shards from S3"
    assert b.paths("GET", dataset + "val/"), "and the validation rows"
    state = f"/{BUCKET}/run/.work/pretrain/{pretrain_key}/"
    assert b.paths("PUT", state + "train_state/"), "the worker on node_b wrote its train-state shards to S3"
    assert a.paths("PUT", state + "train_state/")
    assert a.paths("PUT", state + "ray/") or b.paths("PUT", state + "ray/"), "Ray Train's storage is on S3"
    # post-training: each stage's input checkpoint read from S3 by the worker on node_b, its state written there
    for stage, upstream in (("sft", "pretrain"), ("dpo", "sft")):
        (manifest,) = fs.glob(f"{BUCKET}/run/{stage}/*/manifest.json")
        key = manifest.split("/")[-2]
        (upstream_manifest,) = fs.glob(f"{BUCKET}/run/{upstream}/*/manifest.json")
        weights = f"/{BUCKET}/run/{upstream}/{upstream_manifest.split('/')[-2]}/model.safetensors"
        assert b.paths("GET", weights), f"the {stage} worker on node_b loaded its checkpoint from S3"
        assert b.paths("PUT", f"/{BUCKET}/run/.work/{stage}/{key}/train_state/"), f"{stage} state from node_b on S3"
        assert fs.exists(f"{BUCKET}/run/{stage}/{key}/model.safetensors")
    # the dpo stage actor on node_b fetched its inputs whole (workers take the checkpoint's top-level files only)
    (sft_manifest,) = fs.glob(f"{BUCKET}/run/sft/*/manifest.json")
    assert b.paths("GET", f"/{BUCKET}/run/sft/{sft_manifest.split('/')[-2]}/tokenizer/"), (
        "SFT's artifact read on node_b"
    )
    assert b.paths("GET", dataset), "and the dataset"
    (dpo_manifest,) = fs.glob(f"{BUCKET}/run/dpo/*/manifest.json")
    dpo_artifact = f"/{BUCKET}/run/dpo/{dpo_manifest.split('/')[-2]}/"
    assert b.paths("PUT", dpo_artifact + "model.safetensors"), "DPO's output placed from node_b"
    assert not (a.paths("PUT", dpo_artifact + "manifest.json") or b.paths("PUT", dpo_artifact + "manifest.json"))
    assert not list(tmp_path.glob("runs/artifacts")), "nothing under the default local root"


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_driver_killed_alone_on_the_cluster_leaves_no_artifact_and_the_rerun_completes(tmp_path, two_nodes):
    """SIGKILL to the driver only (the CLI, with RAY_ADDRESS) while its data stage writes shards on the cluster:
    the cluster ends the dead driver's job and its stage actor, nothing is committed, the same command completes."""
    local = tmp_path / "local"
    words = ["run", "conf=tiny", f"artifacts.root=s3://{BUCKET}/killed", f"artifacts.local_root={local}"]
    words += [word for word in SMALL if not word.startswith("until=")] + ["until=data"]
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *words],
        cwd=tmp_path,
        env=two_nodes.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not any(local.rglob("shard-*.tar")):  # the stage actor is writing its shards
            assert driver.poll() is None, f"the run ended before it wrote a shard: {driver.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "the data stage never wrote a shard"
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:
        _, actors = _cluster_state(two_nodes)
        alive = [a for a in actors if a["ActorClassName"] == "StageActor" and a["State"] != "DEAD"]
        if not alive:
            break
        assert time.monotonic() < deadline, f"the dead driver's stage actor lives on: {alive}"
        time.sleep(1)
    fs = two_nodes.s3.fs
    fs.invalidate_cache()
    assert not fs.glob(f"{BUCKET}/killed/data/*/manifest.json"), "a killed run left an artifact"

    rerun = pipeline(tmp_path, *words, env=two_nodes.env, timeout=RUN_SECONDS)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-5000:]
    assert stage_lines(rerun.stdout) == {"data": "done"}
    fs.invalidate_cache()
    (manifest,) = fs.glob(f"{BUCKET}/killed/data/*/manifest.json")
    print(
        f"\ndriver SIGKILLed alone on the cluster: its stage actor ended, no artifact; the rerun committed {manifest}"
    )
    # the first test of this module ran the same data stage undisturbed (same config, same key)
    undisturbed = fs.glob(f"{BUCKET}/run/data/{manifest.split('/')[-2]}/manifest.json")
    if undisturbed:
        digest = json.loads(fs.cat_file(manifest))["content_digest"]
        assert digest == json.loads(fs.cat_file(undisturbed[0]))["content_digest"], "the rerun's artifact differs"
        print("and its content digest equals the undisturbed run's")


@pytest.mark.cluster
@pytest.mark.slow
def test_a_local_artifact_root_is_refused_on_a_cluster_of_two_nodes(tmp_path, two_nodes):
    local_root = tmp_path / "artifacts"
    result = pipeline(
        tmp_path, "run", "conf=tiny", f"artifacts.root={local_root}", *SMALL, env=two_nodes.env, timeout=300
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"artifacts.root={local_root} is a local directory, but the Ray cluster has 2 nodes" in result.stderr
    assert "s3://" in result.stderr
    assert list(tmp_path.iterdir()) == [], "nothing written: no artifact, no run record, no MLflow store"
    assert "data" not in stage_lines(result.stdout)


def test_the_refusal_counts_alive_nodes_only(monkeypatch):
    import ray

    from pipeline import executor

    nodes = [{"Alive": True}, {"Alive": False}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    executor.check_shared_root("/data/artifacts", is_local=True)  # one node alive: a local root is fine
    nodes.append({"Alive": True})
    with pytest.raises(UserError, match=r"artifacts.root=/data/artifacts is a local directory, but .* 2 nodes.*s3://"):
        executor.check_shared_root("/data/artifacts", is_local=True)
    executor.check_shared_root("s3://bucket/prefix", is_local=False)
    nodes[:] = [{"Alive": True}]  # an autoscaling cluster at rest: its head alone, more nodes to come
    with pytest.raises(UserError, match=r"is a local directory, but the Ray cluster has an autoscaling ceiling"):
        executor.check_shared_root("/data/artifacts", is_local=True, autoscaling=True)
