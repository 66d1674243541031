"""The disk fills up while the data stage writes its shards into the artifact root.

The artifact root is a tmpfs too small for the dataset artifact, mounted inside the mount namespace
of the pipeline's process and its Ray (see conftest.py). MLflow's database, Ray's temp dir and the
local working space (`artifacts.local_root`) stay on the real disk, so what fails is the write into
the artifact. Then the tmpfs is remounted larger (the user freed space) and the same command runs
again.
"""

from __future__ import annotations

import json
import shlex
import sys

import pytest
from cli_session import SMALL_DATA, artifact_files

pytestmark = [pytest.mark.slow, pytest.mark.faults]
TOO_SMALL = "256k"
"""Room for the small files and one 120 KiB shard, not for the artifact's 1.7 MB."""
ENOUGH = "16m"
COMMIT_ON_A_FULL_DISK = """
import json, sys
from pathlib import Path
from pipeline.store import ArtifactStore

root, local = sys.argv[1:]
store, key = ArtifactStore(root, local), "k" * 64
staged = store.staging_dir("data", key)
(staged / "shard-00000.tar").write_bytes(bytes(64 * 1024))  # the whole disk
try:
    store.commit("data", key, "dataset", staged, {})
    error = None
except OSError as err:
    error = f"{type(err).__name__}: {err}"
left = sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))
print(json.dumps({"error": error, "found": store.find("data", key) is not None, "left": left}))
"""


def test_a_full_disk_stops_the_shard_write_clearly_leaves_no_artifact_and_the_rerun_matches(
    tmp_path, cli_session, undisturbed_data, record_property
):
    if not cli_session.can_mount:
        pytest.skip(f"cannot mount a tmpfs in a user + mount namespace here ({cli_session.why_not})")
    tiny = tmp_path / "tiny-disk"
    tiny.mkdir()
    words = ["run", *SMALL_DATA, f"artifacts.root={tiny}", f"artifacts.local_root={tmp_path / 'local'}"]
    assert cli_session.sh(f"mount -t tmpfs -o size={TOO_SMALL} tmpfs {tiny}")["rc"] == 0

    full = cli_session.run(*words)
    left = cli_session.files(tiny)
    # a clear error naming the shard being written and the free space; exit code 1
    assert full["rc"] == 1, full["stdout"] + full["stderr"]
    error = next(line for line in full["stderr"].splitlines() if line.startswith("stage data failed"))
    assert "DiskFull: [Errno 28] no space left on device writing" in error, error
    assert f"writing {tiny}/data/.staging-" in error and "/train/shard-" in error, error
    assert f"free of 256.0 KiB at {tiny}/data/.staging-" in error, error
    # nothing a later run could take for an artifact or resume from: no manifest, no partial shard,
    # no staging directory; only the run record, which says the run failed
    assert list(left) == [name for name in left if name.startswith("runs/")], left
    (record,) = left
    assert json.loads((cli_session.sh(f"cat {tiny}/{record}"))["output"])["status"] == "failed"

    assert cli_session.sh(f"mount -o remount,size={ENOUGH} {tiny}")["rc"] == 0  # space freed
    rerun = cli_session.run(*words)
    assert rerun["rc"] == 0, rerun["stdout"] + rerun["stderr"]

    # the rerun's artifact is the undisturbed run's, byte for byte (the manifests differ in their
    # run ids and times; their content digests are equal)
    directory, files = artifact_files(cli_session.files(tiny))
    assert files == undisturbed_data.files and len([name for name in files if "/shard-" in name]) == 15
    manifest = json.loads(cli_session.sh(f"cat {tiny}/{directory}/manifest.json")["output"])
    assert manifest["content_digest"] == undisturbed_data.manifest["content_digest"]

    seconds = {"full": round(full["seconds"], 1), "rerun": round(rerun["seconds"], 1)}
    record_property("disk_full_error", error)
    record_property("disk_full_seconds", seconds)
    print(f"\n{error}\nthe rerun with space: {len(files) + 1} files, those of an undisturbed run; seconds {seconds}")


def test_a_disk_full_at_the_manifest_leaves_no_manifest_and_frees_the_artifact(tmp_path, cli_session):
    """The artifact fits, its manifest does not: no truncated manifest (which would make every later
    run fail on invalid JSON), and the unfinished artifact is removed."""
    if not cli_session.can_mount:
        pytest.skip(f"cannot mount a tmpfs in a user + mount namespace here ({cli_session.why_not})")
    tiny = tmp_path / "tiny-disk"
    tiny.mkdir()
    script = shlex.join([sys.executable, "-c", COMMIT_ON_A_FULL_DISK, str(tiny), str(tmp_path / "local")])
    done = cli_session.sh(f"mount -t tmpfs -o size=64k tmpfs {tiny} && {script}")
    assert done["rc"] == 0, done["output"]
    assert json.loads(done["output"]) == {
        "error": "OSError: [Errno 28] No space left on device",
        "found": False,
        "left": ["data"],
    }


PRETRAIN = [
    *[word for word in SMALL_DATA if not word.startswith("until=")],
    "pretrain.steps=4",
    "pretrain.eval_every=4",
    "pretrain.checkpoint_every=2",
    "pretrain.eval_rows=8",
    "pretrain.max_failures=0",  # a restarted worker group would only meet the same full disk
    "eval.max_items=4",
    "eval.max_rows=8",
    "until=pretrain",
]
STATE_TOO_SMALL = "1m"
"""`artifacts.local_root` (the working space: the train state, Ray Train's copy of the checkpoint) too small for
the pretraining stage's first train state (several MiB); the dataset, made before on the real disk, is cached."""


def test_a_full_disk_during_a_train_state_write_stops_clearly_and_the_rerun_has_the_undisturbed_weights(
    tmp_path, cli_session, record_property
):
    if not cli_session.can_mount:
        pytest.skip(f"cannot mount a tmpfs in a user + mount namespace here ({cli_session.why_not})")
    calm = cli_session.run(
        "run", *PRETRAIN, f"artifacts.root={tmp_path / 'calm'}", f"artifacts.local_root={tmp_path / 'l'}"
    )
    assert calm["rc"] == 0, calm["stdout"] + calm["stderr"]
    _, undisturbed = artifact_files(cli_session.files(tmp_path / "calm"), "pretrain")

    data = cli_session.run(
        "run", *SMALL_DATA, f"artifacts.root={tmp_path / 'root'}", f"artifacts.local_root={tmp_path / 'l'}"
    )
    assert data["rc"] == 0, data["stdout"] + data["stderr"]  # the dataset, cached for the runs below
    local = tmp_path / "tiny-local"
    local.mkdir()
    words = ["run", *PRETRAIN, f"artifacts.root={tmp_path / 'root'}", f"artifacts.local_root={local}"]
    assert cli_session.sh(f"mount -t tmpfs -o size={STATE_TOO_SMALL} tmpfs {local}")["rc"] == 0
    full = cli_session.run(*words)
    assert full["rc"] == 1, full["stdout"] + full["stderr"]
    error = next((line for line in full["stderr"].splitlines() if line.startswith("stage ")), full["stderr"][-3000:])
    assert error.startswith("stage pretrain failed: DiskFull: [Errno 28] no space left on device"), full["stderr"][
        -4000:
    ]
    assert f"free of 1.0 MiB at {local}/work/pretrain/" in error, error  # where the train state goes
    assert not [name for name in cli_session.files(tmp_path / "root") if name.startswith("pretrain/")]
    state = [name for name in cli_session.files(local) if "/train_state/" in name]
    assert not [name for name in state if name.endswith("meta.json")], f"a state was committed: {state}"

    assert cli_session.sh(f"mount -o remount,size={ENOUGH} {local}")["rc"] == 0  # space freed
    rerun = cli_session.run(*words)
    assert rerun["rc"] == 0, rerun["stdout"] + rerun["stderr"]
    _, files = artifact_files(cli_session.files(tmp_path / "root"), "pretrain")
    for name in ("model.safetensors", "config.json"):
        assert files[name] == undisturbed[name], name
    record_property("disk_full_state_error", error)
    print(f"\n{error}\nthe rerun with space: the weights of an undisturbed run")
