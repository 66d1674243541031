"""Ray Train's storage on an fsspec store (s3://...), for runs whose workers may sit on any node."""

from __future__ import annotations

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
