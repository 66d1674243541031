"""A real S3 API for tests: `moto_server` on 127.0.0.1, reached through s3fs."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cli import free_port

STARTUP_SECONDS = 30


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    storage_options: dict[str, Any]
    """fsspec options reaching this server (explicit test credentials, so no ~/.aws is read)."""
    fs: Any
    """An s3fs filesystem of its own (no shared instance or listing cache with the code under test)."""


@contextmanager
def moto_s3(bucket: str) -> Iterator[S3Server]:
    """A fresh moto_server with `bucket` created; killed on exit."""
    import s3fs

    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        options = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint},
        }
        fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **options)
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            try:
                fs.mkdir(bucket)
                break
            except Exception:  # noqa: BLE001 - server still starting
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
        yield S3Server(endpoint, options, fs)
    finally:
        server.kill()
        server.wait()
