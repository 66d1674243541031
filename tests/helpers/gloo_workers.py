"""Worker processes for the multi-rank (gloo) tests.

`spawn` is `torch.multiprocessing.spawn` with Python's faulthandler on in every worker: a worker that
dies of a signal (a native crash in a collective, a heap error at exit) prints every thread's Python
stack into the test's captured stderr, where a bare spawn reports only "terminated with signal".
"""

from __future__ import annotations

import faulthandler
from collections.abc import Callable

import torch.multiprocessing as mp
from cli import free_port

__all__ = ["free_port", "spawn"]  # free_port: a rendezvous port for the workers' process group


def spawn(worker: Callable[..., None], *args, nprocs: int) -> None:
    """Run `worker(rank, *args)` in `nprocs` fresh processes and wait for all (any failure raises)."""
    mp.spawn(_with_faulthandler, args=(worker, args), nprocs=nprocs, join=True)


def _with_faulthandler(rank: int, worker: Callable[..., None], args: tuple) -> None:
    faulthandler.enable(all_threads=True)
    worker(rank, *args)
