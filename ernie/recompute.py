"""Activation recomputation (checkpointing): keep fewer activations, run those parts' forward again in backward.

Policies: "none"; "layers" recomputes whole decoder layers (only each layer's input is kept);
"mlp" recomputes only the FFN / MoE part of each layer, where most activation memory of an MoE
model sits, and keeps attention's. A forward that runs again during backward must not repeat
its side effects (the routers' load counts), so it can ask `recomputing()`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

from torch.utils.checkpoint import checkpoint

_state = threading.local()


def recomputing() -> bool:
    """True while a checkpointed forward runs again inside backward."""
    return getattr(_state, "active", False)


@contextlib.contextmanager
def _recompute_phase():
    previous = recomputing()
    _state.active = True
    try:
        yield
    finally:
        _state.active = previous


def _contexts():
    return contextlib.nullcontext(), _recompute_phase()


def recompute(fn: Callable, *args):
    """fn(*args), keeping none of its intermediate activations for backward."""
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_contexts)
