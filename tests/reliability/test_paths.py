"""Paths read from manifests, indexes, run records, artifact records and the command line stay inside
the directory they belong to: `..`, absolute paths and symlinks out are refused, naming the path.

Paths the user names on purpose (`data.sources[].path`, `data.tokenizer`, `artifacts.root`) may be
anywhere; what an artifact or a record names about itself may not leave it.
"""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ernie.checkpoint import INDEX_FILE, CheckpointError, iter_checkpoint_tensors
from pipeline import cli, shards
from pipeline.contract import MANIFEST, Artifact, PathEscape, UserError, check_relative, contained
from pipeline.store import ArtifactStore
from stages.training import train_state

ESCAPES = ["../outside", "/etc/passwd", "a/../../outside", "a/../../../etc/passwd", "", "a\0b"]


@pytest.fixture
def outside(tmp_path) -> Path:
    """A directory beside the root under test, holding a file an escape would reach."""
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "victim.txt").write_text("not yours")
    return directory


@pytest.mark.parametrize("name", ESCAPES)
def test_escaping_names_are_refused_naming_the_path(name, tmp_path):
    with pytest.raises(PathEscape, match="what names it"):
        check_relative(name, "what names it")
    with pytest.raises(PathEscape):
        contained(tmp_path, name, "what names it")


def test_a_symlink_out_is_refused_and_one_inside_is_not(tmp_path, outside):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "out").symlink_to(outside)
    (root / "in").symlink_to(root / "sub")
    with pytest.raises(PathEscape, match=r"'out/victim.txt' resolves to .*outside"):
        contained(root, "out/victim.txt", "a record names")
    assert contained(root, "in/x.png", "a record names") == root / "in" / "x.png"
    assert contained(root, "sub/./x.png", "a record names") == root / "sub" / "x.png"


def test_path_escape_is_a_user_error_and_a_value_error():
    """The CLI prints it as a one-paragraph error; readers that turn a bad record's ValueError into an
    error record keep doing so."""
    assert issubclass(PathEscape, UserError) and issubclass(PathEscape, ValueError)


# ---------------------------------------------------------------------- the artifact store
def _artifact(store: ArtifactStore, stage: str = "data", key: str = "k" * 64) -> Path:
    directory = Path(store.path) / stage / key
    directory.mkdir(parents=True)
    (directory / "payload.txt").write_text("x")
    (directory / MANIFEST).write_text(json.dumps({"kind": "dataset"}))
    return directory


def test_store_refuses_stage_and_key_names_that_leave_the_root(tmp_path):
    store = ArtifactStore(str(tmp_path / "root"), tmp_path / "local")
    for stage, key in (("..", "k"), ("data", "../../x"), ("data/..", "k"), ("/etc", "k")):
        with pytest.raises(PathEscape, match="artifacts.root"):
            store.find(stage, key)
    with pytest.raises(PathEscape):
        store.commit("data", "../escape", "dataset", tmp_path, {})


def test_store_refuses_a_manifest_or_artifact_symlinked_out_of_the_root(tmp_path, outside):
    store = ArtifactStore(str(tmp_path / "root"), tmp_path / "local")
    directory = _artifact(store)
    assert store.find("data", "k" * 64).kind == "dataset"
    (outside / MANIFEST).write_text(json.dumps({"kind": "dataset"}))
    (directory / MANIFEST).unlink()
    (directory / MANIFEST).symlink_to(outside / MANIFEST)
    with pytest.raises(PathEscape, match="outside"):
        store.find("data", "k" * 64)
    (Path(store.path) / "data" / ("j" * 64)).symlink_to(outside)
    with pytest.raises(PathEscape):
        store.find("data", "j" * 64)


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"no": "kind"}'])
def test_a_broken_manifest_is_a_user_error_naming_it(tmp_path, content):
    store = ArtifactStore(str(tmp_path / "root"), tmp_path / "local")
    directory = _artifact(store)
    (directory / MANIFEST).write_text(content)
    with pytest.raises(UserError, match=f"data/{'k' * 64}/manifest.json"):
        store.find("data", "k" * 64)


def test_fetching_a_remote_artifact_never_writes_outside_its_local_copy(tmp_path):
    """An object store holds keys like `x/../../y`; the copy refuses them instead of following them."""
    root = f"memory://reliability-{tmp_path.name}/root"
    store = ArtifactStore(root, tmp_path / "local")
    key = "k" * 64
    fs = fsspec.filesystem("memory")
    base = f"{store.path}/data/{key}"
    fs.pipe(f"{base}/{MANIFEST}", json.dumps({"kind": "dataset"}).encode())
    fs.pipe(f"{base}/train/shard-00000.tar", b"rows")
    artifact = store.find("data", key)
    fetched = store.fetch(artifact)
    assert (Path(fetched.local_path) / "train" / "shard-00000.tar").read_bytes() == b"rows"

    other = "m" * 64
    fs.pipe(f"{store.path}/data/{other}/{MANIFEST}", json.dumps({"kind": "dataset"}).encode())
    fs.pipe(f"{store.path}/data/{other}/../../../../../../escaped.txt", b"evil")
    with pytest.raises(PathEscape, match=r"holds file: '\.\./\.\./"):
        store.fetch(store.find("data", other))
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(p.is_relative_to(tmp_path / "local") for p in written)
    assert not [p for p in written if p.name == "escaped.txt"]


def test_run_records_that_are_not_records_are_named(tmp_path):
    store = ArtifactStore(str(tmp_path / "root"), tmp_path / "local")
    (Path(store.path) / "runs").mkdir(parents=True)
    (Path(store.path) / "runs" / "bad.json").write_text('{"run_id": 3}')
    with pytest.raises(UserError, match=r"runs/bad.json is not a pipeline run record"):
        store.runs()


def test_show_takes_a_run_id_not_a_path(tmp_path, capsys, outside):
    """`show RUN_ID` matches the ids of the records under runs/; a path-like id matches nothing."""
    root = tmp_path / "root"
    (root / "runs").mkdir(parents=True)
    (outside / "x.json").write_text(json.dumps({"run_id": "x", "conf": "c", "status": "s", "started_at": "t"}))
    for run_id in ("../outside/x", str(outside / "x"), "/etc/passwd"):
        assert cli.main(["show", run_id, f"artifacts.root={root}"]) == 2
        assert f"no pipeline run {run_id!r}" in capsys.readouterr().err


# ---------------------------------------------------------------------- files named by artifacts
def _split(directory: Path) -> None:
    row = {name: np.zeros(4, dtype) for name, dtype in shards.ROW_FIELDS.items()}
    shards.write_row_shards([row, row], directory, rows_per_shard=1)


@pytest.mark.parametrize("name", ["../outside.tar", "/etc/passwd", "sub/../../x.tar", "sub/shard.tar"])
def test_a_shard_index_names_only_files_of_its_split(tmp_path, name):
    split = tmp_path / "train"
    _split(split)
    index = json.loads((split / shards.INDEX_FILE).read_text())
    index["shards"][0]["name"] = name
    (split / shards.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(PathEscape, match=r"index.json lists shard"):
        shards.read_index(split)
    with pytest.raises(PathEscape):
        list(shards.iter_rows(split))


def test_a_shard_symlinked_out_of_its_split_is_refused(tmp_path, outside):
    split = tmp_path / "train"
    _split(split)
    first = shards.read_index(split).shards[0].name
    (outside / first).write_bytes((split / first).read_bytes())
    (split / first).unlink()
    (split / first).symlink_to(outside / first)
    with pytest.raises(PathEscape, match="resolves to"):
        shards.read_index(split)


@pytest.mark.parametrize("file", ["../outside.safetensors", "/tmp/x.safetensors", "a/../../x.safetensors", 7])
def test_a_checkpoint_index_names_only_weight_files_inside_the_checkpoint(tmp_path, file):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({"w": torch.zeros(2)}, str(tmp_path / "outside.safetensors"))
    (ckpt / INDEX_FILE).write_text(json.dumps({"weight_map": {"w": file}}))
    with pytest.raises(CheckpointError, match="lists weight file"):
        list(iter_checkpoint_tensors(ckpt))


def test_a_checkpoint_weight_file_symlinked_out_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({"w": torch.zeros(2)}, str(tmp_path / "outside.safetensors"))
    (ckpt / "model-1.safetensors").symlink_to(tmp_path / "outside.safetensors")
    (ckpt / INDEX_FILE).write_text(json.dumps({"weight_map": {"w": "model-1.safetensors"}}))
    with pytest.raises(CheckpointError, match="resolves to"):
        list(iter_checkpoint_tensors(ckpt))


@pytest.mark.parametrize("step_dir", ["../../outside", "/etc", "step-1/../../x", "elsewhere", 3])
def test_a_train_state_meta_names_only_a_step_directory_beside_it(tmp_path, step_dir):
    state = tmp_path / "train_state"
    state.mkdir()
    (state / train_state.META_FILE).write_text(json.dumps({"step": 1, "dir": step_dir}))
    with pytest.raises(PathEscape, match=r"meta.json: dir="):
        train_state.read_meta(state)
    remote = f"memory://reliability-{tmp_path.name}/train_state"
    fsspec.filesystem("memory").pipe(f"{remote}/{train_state.META_FILE}", json.dumps({"dir": step_dir}).encode())
    with pytest.raises(PathEscape):
        train_state.copy_state(remote, tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_a_data_stage_progress_file_names_only_its_own_shards(tmp_path, outside):
    """A tampered progress.json must not make the stage move a file from elsewhere into the artifact."""
    from stages.data.config import Config
    from stages.data.stage import PROGRESS_FILE, _Progress

    work = tmp_path / "work"
    (work / "train").mkdir(parents=True)
    shards_listed = {"train": [{"name": "../../outside/victim.txt"}], "val": []}
    (work / PROGRESS_FILE).write_text(json.dumps({"fingerprint": "", "shards": shards_listed}))
    with pytest.raises(PathEscape, match="progress.json lists shard"):
        _Progress.load(work, Config(), 0)
    assert (outside / "victim.txt").read_text() == "not yours"


@pytest.mark.parametrize("ref", ["../outside/victim.txt", "/etc/passwd", "images/../../outside/victim.txt", "out/x"])
def test_chat_image_refs_stay_inside_the_dataset_artifact(tmp_path, outside, ref):
    from pipeline.formats import IMAGE_SETTINGS
    from stages.posttrain.chat import ChatImages

    dataset = tmp_path / "dataset"
    (dataset / IMAGE_SETTINGS).parent.mkdir(parents=True)
    (dataset / IMAGE_SETTINGS).write_text(json.dumps({"min_pixels": 1, "max_pixels": 100}))
    (dataset / "out").symlink_to(outside)
    (outside / "x").write_bytes(b"\x89PNG")
    images = ChatImages(dataset, None, 0)
    with pytest.raises(PathEscape, match=f"image {ref!r} is not a file inside the dataset artifact"):
        images.load(ref)


def test_an_artifact_json_read_goes_through_its_local_dir():
    """`Artifact.read_json` is called with names from code, never from records (kept so by review);
    this pins that it joins under the artifact's directory."""
    artifact = Artifact("dataset", "/a/b", "k", local_path="/a/b")
    with pytest.raises(FileNotFoundError, match="/a/b/stats.json"):
        artifact.read_json("stats.json")
