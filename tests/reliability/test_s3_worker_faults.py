"""S3 faults on the training workers' own traffic: under a remote root, pretraining's Ray Train workers stream
the dataset's shards from S3 and write their shards of the train state and Ray Train's checkpoint there, each
through its own s3fs client. With one request in six of the whole run (the store's and the workers' alike)
answered by a 503 SlowDown or a 500 InternalError (`faulty_s3_proxy`, see conftest.py), every fault is
retried and the trained weights are byte for byte those of an undisturbed run on a local root.
"""

from __future__ import annotations

import hashlib

import pytest
from cli_session import SMALL_DATA, artifact_files, file_digests

pytestmark = [pytest.mark.slow, pytest.mark.faults]
FAIL_EVERY = 6
PRETRAIN = [
    *[word for word in SMALL_DATA if not word.startswith("until=")],
    "pretrain.steps=4",
    "pretrain.eval_every=4",
    "pretrain.checkpoint_every=2",  # a train state written (to S3) mid-run, then the final one
    "pretrain.eval_rows=8",
    "eval.max_items=4",
    "eval.max_rows=8",
    "until=pretrain",
]
COMPARED = ("model.safetensors", "config.json")
"""The trained model. (The artifact's copy of the train state differs by design: its meta.json records the
files' sha256 locally and the objects' ETags on S3.)"""


def test_faults_on_the_workers_s3_traffic_are_retried_and_the_weights_are_the_undisturbed_runs(
    cli_session, faulty_s3, tmp_path_factory, record_property
):
    place = tmp_path_factory.mktemp("workers-undisturbed")
    calm = cli_session.run("run", *PRETRAIN, f"artifacts.root={place / 'root'}", f"artifacts.local_root={place / 'l'}")
    assert calm["rc"] == 0, calm["stdout"] + calm["stderr"]
    _, undisturbed = artifact_files(file_digests(place / "root"), "pretrain")

    root = f"{faulty_s3.bucket}/workers"
    faulty_s3.policy.reset(fail_every=FAIL_EVERY)
    local = tmp_path_factory.mktemp("workers-local")
    result = cli_session.run("run", *PRETRAIN, f"artifacts.root=s3://{root}", f"artifacts.local_root={local}")
    faults, faulted = faulty_s3.policy.stats(), list(faulty_s3.policy.faulted)
    faulty_s3.policy.reset()
    assert result["rc"] == 0, result["stdout"] + result["stderr"]
    assert faults["injected"] >= 10 and faults["retries_survived"] == faults["injected"] and faults["lost"] == 0

    # the faults hit the workers' own requests: shard reads and train-state writes
    shard_reads = [path for method, path in faulted if method == "GET" and "/train/shard-" in path]
    state_writes = [path for method, path in faulted if method == "PUT" and "/.work/pretrain/" in path]
    assert shard_reads and state_writes, faulted

    (manifest,) = faulty_s3.fs.glob(f"{root}/pretrain/*/manifest.json")
    directory = manifest.removesuffix("manifest.json")
    for name in COMPARED:
        assert hashlib.sha256(faulty_s3.fs.cat_file(directory + name)).hexdigest() == undisturbed[name], name
    summary = (
        f"pretraining on S3 through faults ({result['seconds']:.1f} s): {faults['requests']} requests, "
        f"{faults['injected']} faults injected ({len(shard_reads)} on shard reads, {len(state_writes)} on train-state "
        f"writes), {faults['retries_survived']} retried successfully, {faults['lost']} lost; weights identical to "
        "the undisturbed run's"
    )
    record_property("worker_faults", faults)
    print("\n" + summary)
