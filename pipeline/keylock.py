"""One run at a time of a stage's cache key on a machine.

Two pipeline runs that need the same stage output (the same cache key) would both run the stage and
share its resume state (`work_dir`: the data stage's progress, the train state), each overwriting
what the other wrote. So a run takes the key's lock before it runs the stage; a second run waits for
it and then finds the first one's artifact, as Bazel or ccache make a second build wait for the same
output. The lock is an `flock` on a file under `artifacts.local_root`: the kernel drops it when its
holder exits, however it ends (a SIGKILLed driver leaves no stale lock). It holds for the processes of
one machine; two drivers on two machines over one remote root are not serialized.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def held(path: Path, holder: dict, on_wait: Callable[[dict], None]) -> Iterator[None]:
    """Hold the lock at `path` for the block, writing `holder` (who holds it) into the file.

    When another process holds it, `on_wait` gets that one's `holder` (empty if unreadable) first, then
    this waits until it is free (Ctrl-C stops the wait). Lock files are kept: deleting one while another
    process waits on it would give the next comer a new file, and two holders.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait(_holder(fd))
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder, sort_keys=True).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> dict:
    """What the holder wrote (it may be rewriting it this instant: then nothing)."""
    try:
        size = os.fstat(fd).st_size
        value = json.loads(os.pread(fd, size, 0)) if size else {}
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
