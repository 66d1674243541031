"""Staging directories name the process that writes them; one whose writer (a process of this host) is gone
is deleted when the stage next stages, and nothing else is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import store as store_module
from pipeline.store import ArtifactStore


def _gone_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("root", ["local", "memory://staging-test"])
def test_a_dead_writers_staging_directory_goes_and_everything_else_stays(tmp_path, root):
    store = ArtifactStore(str(tmp_path / "artifacts") if root == "local" else root, tmp_path / "local")
    first = store.staging_dir("data", "a" * 64)
    assert first.name.endswith(f"-p{os.getpid()}@{store_module._HOST}")
    parent = first.parent
    dead = parent / first.name.replace(f"-p{os.getpid()}@", f"-p{_gone_pid()}@")
    others = [
        first,  # this process: alive
        parent / first.name.replace(f"@{store_module._HOST}", "@another-host"),
        parent / first.name.split("-p")[0],  # no writer in its name
    ]
    for directory in [dead, *others]:
        (directory / "train").mkdir(parents=True, exist_ok=True)
        (directory / "train" / "shard-00000.tar").write_bytes(b"rows")
    (parent / f".eval-{dead.name}").mkdir()
    artifact = parent / ("b" * 64)
    artifact.mkdir()

    second = store.staging_dir("data", "c" * 64)
    assert second.is_dir() and second != first
    assert not dead.exists() and not (parent / f".eval-{dead.name}").exists()
    assert all((d / "train" / "shard-00000.tar").read_bytes() == b"rows" for d in others)
    assert artifact.is_dir()


def test_only_names_with_a_writer_of_this_host_count():
    host = store_module._HOST
    assert store_module._abandoned(f".staging-0123-20261203-101010-abcdef-p{_gone_pid()}@{host}")
    assert not store_module._abandoned(f".staging-0123-20261203-101010-abcdef-p{os.getpid()}@{host}")
    assert not store_module._abandoned(f".staging-0123-20261203-101010-abcdef-p{_gone_pid()}@{host}x")
    assert not store_module._abandoned("0123456789abcdef")
    assert not store_module._abandoned(f".staging-0123-p{10**30}@{host}")  # no such pid on any system


@pytest.mark.parametrize("root", ["local", "memory://placing-test"])
def test_placed_output_is_no_artifact_until_published_and_the_next_attempt_replaces_it(tmp_path, root):
    """The stage's process places its files; only the driver's `publish` (the manifest) makes them an artifact.
    A driver killed in between leaves files that `find` ignores and the next attempt overwrites."""
    store = ArtifactStore(str(tmp_path / "artifacts") if root == "local" else root, tmp_path / "local")
    key = "d" * 64

    def staged(content: bytes) -> Path:
        directory = store.staging_dir("data", key)
        (directory / "train").mkdir()
        (directory / "train" / "shard-00000.tar").write_bytes(content)
        return directory

    orphan = store.place("data", key, "dataset", staged(b"killed attempt"), {"pipeline_run": "dead"})
    assert store.find("data", key) is None
    assert store.fs.cat(f"{store._path('data', key)}/train/shard-00000.tar") == b"killed attempt"

    manifest = store.place("data", key, "dataset", staged(b"rerun"), {"pipeline_run": "rerun"})
    assert manifest["content_digest"] != orphan["content_digest"]
    assert store.find("data", key) is None
    published = store.publish("data", key, manifest)
    found = store.find("data", key)
    assert found is not None and found.manifest == published.manifest == manifest
    assert store.fs.cat(f"{store._path('data', key)}/train/shard-00000.tar") == b"rerun"
