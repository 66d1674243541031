"""The resumable train state: model, optimizer, step, data cursor, RNG and metric history.

`train_state/state.pt` is written by rank 0 to a temporary file and renamed into place, so
a process killed mid-write leaves the previous state intact; `meta.json` beside it says
which step it holds. torch.save of the full (replicated) state is enough for DDP on small
models; sharded models will move to torch.distributed.checkpoint.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from pipeline.contract import UserError

STATE_FILE = "state.pt"
META_FILE = "meta.json"


def rng_state() -> dict:
    """torch, numpy and Python RNG states as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, list(internal), python_gauss],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, python_gauss = state["python"]
    random.setstate((version, tuple(internal), python_gauss))


def save(directory: Path, state: dict) -> None:
    """Atomically replace `directory/state.pt` (then `meta.json`) with `state`."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{STATE_FILE}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, directory / STATE_FILE)
    meta = {"step": state["step"], "cursor": state["cursor"], "fingerprint": state["fingerprint"]}
    tmp_meta = directory / f".{META_FILE}.tmp-{os.getpid()}"
    tmp_meta.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp_meta, directory / META_FILE)


def load(directory: Path, fingerprint: dict) -> dict | None:
    """The saved state, or None when there is none; a state of another config is a `UserError`."""
    path = directory / STATE_FILE
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if _normalise(state["fingerprint"]) != _normalise(fingerprint):
        raise UserError(
            f"{directory} holds a train state of a different configuration (step {state['step']}); "
            "delete it to start over, or rerun with the configuration that wrote it"
        )
    return state


def _normalise(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)
