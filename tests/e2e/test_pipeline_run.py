"""The whole tiny pipeline through the real CLI, real Ray, real MLflow (SQLite) and real HTTP.

One workspace is shared by the tests of this module, in order: a full run, then reruns
that must hit the cache or recompute exactly what was asked for.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli import clean_env, free_port, pipeline, stage_lines

pytestmark = pytest.mark.slow

STAGES = ["data", "pretrain", "sft", "dpo", "quantize", "serve"]
# smaller than conf=tiny so the suite stays fast; the same graph and code paths
FAST = [
    "data.max_documents=600",
    "data.arithmetic_documents=300",
    "data.scenes=200",
    "pretrain.steps=40",
    "pretrain.checkpoint_every=10",
    "posttrain.sft.steps=12",
    "posttrain.sft.checkpoint_every=4",
    "posttrain.dpo.steps=6",
    "eval.max_items=8",
    "eval.max_rows=16",
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    path = tmp_path_factory.mktemp("workspace")
    port = free_port()
    result = pipeline(path, "run", "conf=tiny", *FAST, f"serve.port={port}")
    assert result.returncode == 0, result.stdout + result.stderr
    return {"path": path, "first": result, "port": port}


def run(workspace, *words, timeout=900):
    return pipeline(
        workspace["path"], "run", "conf=tiny", *FAST, f"serve.port={workspace['port']}", *words, timeout=timeout
    )


def manifests(workspace, stage: str) -> list[Path]:
    return sorted((workspace["path"] / "runs" / "artifacts" / stage).glob("*/manifest.json"))


def mlflow_client(workspace):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{workspace['path'] / 'mlflow.db'}")


def test_full_run_produces_every_artifact(workspace):
    out = workspace["first"].stdout
    assert stage_lines(out) == {s: "done" for s in STAGES}
    for stage in STAGES:
        (manifest,) = manifests(workspace, stage)
        data = json.loads(manifest.read_text())
        assert data["stage"] == stage and data["cache_key"] == manifest.parent.name
        assert data["content_digest"]
    ckpt = manifests(workspace, "dpo")[0].parent
    assert (ckpt / "config.json").is_file() and (ckpt / "tokenizer" / "tokenizer.json").is_file()
    assert (manifests(workspace, "quantize")[0].parent / "quant_report.json").is_file()
    assert "artifacts:" in out and "MLflow:" in out and "python -m pipeline serve conf=tiny" in out
    assert f"http://127.0.0.1:{workspace['port']}/v1" in out


def test_the_tiny_dataset_holds_both_modalities_in_balanced_micro_batches(workspace):
    stats = json.loads((manifests(workspace, "data")[0].parent / "stats.json").read_text())
    assert stats["modalities"]["vision"]["tokens"] > 0 and stats["modalities"]["text"]["tokens"] > 0
    assert stats["sources"]["scenes"]["images"] > 0
    assert stats["packing_efficiency"] >= 0.99
    micro_batches = stats["splits"]["train"]["micro_batches"]
    assert micro_batches["within_band"] == 1.0, micro_batches
    client = mlflow_client(workspace)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("ernie-pipeline").experiment_id], "tags.stage = 'data'", max_results=1
    )
    assert run.data.metrics["tokens/modality/vision"] == stats["modalities"]["vision"]["tokens"]
    names = {a.path for a in client.list_artifacts(run.info.run_id, "data")}
    assert {"data/tokens_per_source.png", "data/token_balance.png", "data/document_length.png"} <= names


def test_pretraining_loss_falls(workspace):
    manifest = json.loads(manifests(workspace, "pretrain")[0].read_text())
    metrics = manifest["metrics"]
    assert metrics["val_loss"] < 0.85 * metrics["val_loss_initial"], metrics


def test_mlflow_has_one_parent_and_one_child_per_stage(workspace):
    client = mlflow_client(workspace)
    experiment = client.get_experiment_by_name("ernie-pipeline")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["conf"] == "tiny" and parent.data.tags["dry_run"] == "false"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["stage"] for r in children) == sorted(STAGES)
    for child in children:
        assert child.data.tags["cache"] == "miss"
        assert child.data.metrics, child.data.tags["stage"]
        assert child.info.status == "FINISHED"
    by_stage = {r.data.tags["stage"]: r for r in children}
    assert "pretrain.steps" in by_stage["pretrain"].data.params
    # what the stages' processes logged, written by the driver: rank 0's step metrics, the stage's own
    # params, its figures
    pretrain_run = by_stage["pretrain"].info.run_id
    assert len(client.get_metric_history(pretrain_run, "loss")) > 1
    assert "loss_curve.png" in [a.path for a in client.list_artifacts(pretrain_run)]
    assert "examples_train" in by_stage["sft"].data.params
    for stage in ("pretrain", "sft", "dpo", "quantize"):
        assert "eval/val_ppl" in by_stage[stage].data.metrics
    assert client.get_registered_model("tiny-model").name == "tiny-model"


def test_rerun_hits_the_cache_for_every_stage(workspace):
    start = time.time()
    result = run(workspace)
    assert result.returncode == 0, result.stderr
    assert stage_lines(result.stdout) == {s: "cached" for s in STAGES}
    assert time.time() - start < 60
    for stage in STAGES:
        assert len(manifests(workspace, stage)) == 1


def test_changing_quantization_reruns_only_quantize_and_serve(workspace):
    result = run(workspace, "quantize.bits=8")
    assert result.returncode == 0, result.stderr
    lines = stage_lines(result.stdout)
    assert lines == {
        "data": "cached",
        "pretrain": "cached",
        "sft": "cached",
        "dpo": "cached",
        "quantize": "done",
        "serve": "done",
    }
    assert len(manifests(workspace, "quantize")) == 2


def test_stages_selection_reruns_that_stage_alone(workspace):
    before = manifests(workspace, "quantize")[0].stat().st_mtime
    result = run(workspace, "stages=[quantize]")
    assert result.returncode == 0, result.stderr
    assert stage_lines(result.stdout) == {"quantize": "done"}
    assert manifests(workspace, "quantize")[0].stat().st_mtime >= before


def test_from_until_and_force(workspace):
    # the forced dpo trains in the stage's own process (num_workers is operational: quantize's key is unchanged);
    # what is tested is which stages run, and the full run above already trained dpo on two workers
    result = run(workspace, "from=dpo", "until=quantize", "force=[dpo]", "posttrain.dpo.num_workers=0")
    assert result.returncode == 0, result.stderr
    assert stage_lines(result.stdout) == {"dpo": "done", "quantize": "cached"}
    result = run(workspace, "until=pretrain")
    assert stage_lines(result.stdout) == {"data": "cached", "pretrain": "cached"}


def test_ls_and_show_read_the_run_records(workspace):
    listing = pipeline(workspace["path"], "ls")
    assert listing.returncode == 0
    run_ids = [line.split()[0] for line in listing.stdout.splitlines()[1:]]
    assert len(run_ids) >= 5
    shown = pipeline(workspace["path"], "show", run_ids[0])
    assert shown.returncode == 0
    for stage in STAGES:
        assert stage in shown.stdout
    assert "mlflow run" in shown.stdout


@pytest.mark.faults
def test_killed_stage_leaves_no_manifest_and_the_rerun_completes(tmp_path):
    # a workspace of its own holding data and pretrain only: the faults suite does not build the module's
    # whole-pipeline workspace for this one test
    workspace = {"path": tmp_path}
    base = pipeline(tmp_path, "run", "conf=tiny", *FAST, "until=pretrain")
    assert base.returncode == 0, base.stdout + base.stderr
    words = ["run", "conf=tiny", *FAST, "posttrain.sft.steps=40", "posttrain.sft.checkpoint_every=4", "until=sft"]
    work_dir = workspace["path"] / "runs" / "local" / "work" / "sft"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *words],
        cwd=workspace["path"],
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline:  # wait until the sft run has written a resumable state
            if any(work_dir.glob("*/**/*.pt")):
                break
            time.sleep(0.5)
        else:
            pytest.fail("the sft stage never wrote a train state")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert manifests(workspace, "sft") == []  # the killed attempt did not become an artifact
    listed = pipeline(workspace["path"], "ls")
    killed_id, status = listed.stdout.splitlines()[-1].split()[0:3:2]  # the newest run: its driver is gone
    assert status == "killed", listed.stdout
    result = pipeline(workspace["path"], *words)
    assert result.returncode == 0, result.stderr
    assert stage_lines(result.stdout) == {"data": "cached", "pretrain": "cached", "sft": "done"}
    assert len(manifests(workspace, "sft")) == 1
    # the rerun wrote it down: the record says killed, and MLflow has the killed run and its open stage run KILLED
    assert f"run {killed_id} was left running by a driver that is gone" in result.stderr
    record = json.loads((workspace["path"] / "runs" / "artifacts" / "runs" / f"{killed_id}.json").read_text())
    assert record["status"] == "killed" and "driver process ended" in record["ended_by"]
    client = mlflow_client(workspace)
    assert client.get_run(record["mlflow_run_id"]).info.status == "KILLED"
    stage_runs = client.search_runs(
        [client.get_run(record["mlflow_run_id"]).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{record['mlflow_run_id']}'",
    )
    assert "KILLED" in {r.info.status for r in stage_runs} and "RUNNING" not in {r.info.status for r in stage_runs}


def test_served_endpoint_answers_the_openai_client(workspace):
    from openai import OpenAI

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve", "conf=tiny", *FAST, f"serve.port={port}"],
        cwd=workspace["path"],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)
    try:
        deadline = time.time() + 180
        while True:
            try:
                models = client.models.list()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail(f"server never came up: {proc.stdout.read() if proc.poll() is not None else ''}")
                time.sleep(1)
        assert models.data
        reply = client.chat.completions.create(
            model=models.data[0].id, messages=[{"role": "user", "content": "What is 2 + 3?"}], max_tokens=8
        )
        assert isinstance(reply.choices[0].message.content, str)
        assert reply.usage.completion_tokens <= 8
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_dry_run_of_a_real_preset_runs_its_graph_on_a_tiny_model(tmp_path):
    result = pipeline(
        tmp_path,
        "run",
        "conf=ernie_21b",
        "dry_run=true",
        *FAST,
        "pretrain.num_workers=0",  # the graph is the subject, not the workers: Ray Train's local mode
        f"serve.port={free_port()}",
        "until=pretrain",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert stage_lines(result.stdout) == {"data": "done", "pretrain": "done"}
    config = json.loads(next((tmp_path / "runs" / "artifacts" / "pretrain").glob("*/config.json")).read_text())
    assert config["architectures"] == ["Ernie4_5_MoeForCausalLM"]
    assert config["hidden_size"] < 2560


def test_plan_of_the_real_preset_counts_the_published_model(tmp_path):
    result = pipeline(tmp_path, "plan", "conf=ernie_21b")
    assert result.returncode == 0, result.stderr
    assert "21.825B total" in result.stdout and "3.087B active" in result.stdout
    assert "data -> pretrain -> sft -> dpo -> quantize -> serve" in result.stdout
    assert "GiB" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_failing_stage_stops_the_run_with_its_error_and_the_resume_command(workspace):
    data_dir = manifests(workspace, "data")[0].parent
    shards = data_dir / "train"
    hidden = data_dir / "train-hidden"
    shards.rename(hidden)  # a damaged dataset artifact: the pretrain stage cannot read its rows
    try:
        result = run(workspace, "stages=[pretrain]")
    finally:
        hidden.rename(shards)
    assert result.returncode == 2
    assert "stage pretrain failed" in result.stderr
    assert "train" in result.stderr
    assert "python -m pipeline run conf=tiny" in result.stderr and "stages=[pretrain]" in result.stderr
    assert stage_lines(result.stdout) == {}
