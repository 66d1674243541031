"""Ray Train's storage on an fsspec store (s3://...), and checkpoints read from one, for runs whose workers
may sit on any node."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import fsspec
import pyarrow.fs


class NodeFileSystem(pyarrow.fs.FSSpecHandler):
    """An fsspec filesystem of `protocol` as a pyarrow one (Ray Train's `storage_filesystem`).

    Unpickled, in Ray Train's controller and in each worker, it is opened anew there: every process
    reaches the store with its own node's settings and credentials (AWS_*, FSSPEC_S3_ENDPOINT_URL, an
    instance profile), as it does for the artifact URLs, and none of them travel in the pickle."""

    def __init__(self, protocol: str) -> None:
        super().__init__(fsspec.filesystem(protocol))
        self.protocol = protocol

    def __reduce__(self):
        return type(self), (self.protocol,)


def ray_storage(url: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """(storage_filesystem, storage_path) for `ray.train.RunConfig` from an fsspec URL."""
    protocol, _ = fsspec.core.split_protocol(url)
    handler = NodeFileSystem(protocol)
    return pyarrow.fs.PyFileSystem(handler), handler.fs._strip_protocol(url)


def is_remote(location: str | os.PathLike) -> bool:
    """An fsspec URL of a remote store (s3://...), not a local path (file:// counts as local)."""
    text = os.fspath(location)
    return "://" in text and not text.startswith("file://")


def local_checkpoint(uri: str) -> tuple[str, tempfile.TemporaryDirectory | None]:
    """(directory, its holder) of a checkpoint for this process to load: `uri` itself when it is a local path;
    for a URL (an artifact under a remote root, which a worker on another node cannot reach through the stage's
    local copy), its top-level files (config, weights, their index; not the train state or tokenizer below it)
    downloaded to a temporary directory that goes when the holder does."""
    if not is_remote(uri):
        return uri.removeprefix("file://"), None
    fs, path = fsspec.core.url_to_fs(uri)
    fs.invalidate_cache(path)
    files = [entry["name"] for entry in fs.ls(path, detail=True) if entry["type"] == "file"]
    if not files:
        raise FileNotFoundError(f"the checkpoint {uri} holds no files")
    holder = tempfile.TemporaryDirectory(prefix="ernie-ckpt-")
    for name in files:
        fs.get_file(name, str(Path(holder.name) / name.rsplit("/", 1)[-1]))
    return holder.name, holder
