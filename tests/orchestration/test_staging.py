"""Staging directories name the process that writes them; one whose writer (a process of this host) is gone
is deleted when the stage next stages, and nothing else is."""

from __future__ import annotations

import os
import subprocess
import sys

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
