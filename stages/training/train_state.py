"""The resumable train state: model, optimizer, step, data cursor, RNG and metric history.

Two layouts, both atomic (a process killed mid-write leaves the previous state intact) and both
announced by `meta.json`, written last, which says which step the state holds:

- `save` / `load` (post-training, DDP): rank 0 writes `state.pt`, the full replicated state.
- `ShardedCheckpointer` / `load_sharded` (pretraining, FSDP2 or DDP): every rank writes its own
  shards of the model and optimizer with torch.distributed.checkpoint into `step-NNNNNNNN/`
  (optionally in the background), beside rank 0's `extra.pt` (step, cursor, RNG, history); the
  directory is renamed into place once complete. DCP reshards on load, so a state resumes under
  another worker count.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from pipeline.contract import UserError

STATE_FILE = "state.pt"
META_FILE = "meta.json"
EXTRA_FILE = "extra.pt"
SHARDED_PREFIX = "step-"


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
    _write_meta(directory, {"step": state["step"], "cursor": state["cursor"], "fingerprint": state["fingerprint"]})


def load(directory: Path, fingerprint: dict) -> dict | None:
    """The saved state, or None when there is none; a state of another config is a `UserError`."""
    path = directory / STATE_FILE
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    _check_fingerprint(directory, state, fingerprint)
    return state


def _check_fingerprint(directory: Path, saved: dict, fingerprint: dict) -> None:
    """A state (or its meta) written under another configuration is a `UserError`."""
    if _normalise(saved["fingerprint"]) != _normalise(fingerprint):
        raise UserError(
            f"{directory} holds a train state of a different configuration (step {saved['step']}); "
            "delete it to start over, or rerun with the configuration that wrote it"
        )


def _normalise(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


# ---------------------------------------------------------------------- sharded (DCP)
class ShardedCheckpointer:
    """Writes the sharded train state: every rank its shards of the model and optimizer, rank 0 the
    rest (`extra`) and `meta.json`.

    With `background=True` the shards are copied to CPU memory at `save` and written by a thread
    (`torch.distributed.checkpoint.async_save` over a gloo group of its own) while training goes
    on; the state is committed (directory renamed into place, then `meta.json`) once rank 0's
    write, which waits for every rank's, has finished. At most one write is in flight: the next
    `save`, `commit_finished` after a step, and `close` commit it. A run killed mid-write resumes
    from the previous committed state.
    """

    def __init__(self, directory: Path, rank: int, layout=None, background: bool = False) -> None:
        import torch.distributed as dist

        self.directory, self.rank, self.layout = directory, rank, layout
        self.group = dist.new_group(backend="gloo") if background else None  # collective: every rank
        self.pending: tuple | None = None  # (future, tmp dir, name, meta)
        if rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            for stale in directory.glob(f".{SHARDED_PREFIX}*.tmp"):  # writes a killed run left unfinished
                shutil.rmtree(stale, ignore_errors=True)

    def save(self, model: torch.nn.Module, optimizer, extra: dict) -> None:
        """Collective. `extra` must hold "step", "cursor" and "fingerprint" (they go to meta.json too)."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.close()
        name = f"{SHARDED_PREFIX}{extra['step']:08d}"
        tmp = self.directory / f".{name}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save(extra, tmp / EXTRA_FILE)
        dist.barrier()
        model_state, optimizer_state = get_state_dict(model, optimizer)
        if self.layout is not None:
            self.layout.checkpoint_state(model, model_state, optimizer_state)
        state = {"model": model_state, "optimizer": optimizer_state}
        meta = {k: extra[k] for k in ("step", "cursor", "fingerprint")} | {"dir": name}
        if self.group is None:
            dcp.save(state, checkpoint_id=str(tmp))
            self._commit(tmp, name, meta)
            dist.barrier()
            return
        future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.group)
        self.pending = (getattr(future, "upload_completion", future), tmp, name, meta)

    def commit_finished(self) -> None:
        """Commit the write in flight if it has finished (cheap; call after every step)."""
        if self.pending is not None and self.pending[0].done():
            self.close()

    def close(self) -> None:
        """Wait for the write in flight, if any, and commit it."""
        if self.pending is None:
            return
        future, tmp, name, meta = self.pending
        self.pending = None
        future.result()
        self._commit(tmp, name, meta)

    def _commit(self, tmp: Path, name: str, meta: dict) -> None:
        if self.rank != 0:
            return
        shutil.rmtree(self.directory / name, ignore_errors=True)
        os.replace(tmp, self.directory / name)
        _write_meta(self.directory, meta)
        for old in self.directory.glob(f"{SHARDED_PREFIX}*"):  # the state before this one, once this one is in place
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)


def load_sharded(directory: Path, fingerprint: dict, model: torch.nn.Module, optimizer, layout=None) -> dict | None:
    """Collective: load the latest sharded state into `model` and `optimizer` (already wrapped and
    sharded for this run's workers); returns rank 0's `extra`, or None when there is no state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    meta = read_meta(directory)
    if meta is None:
        return None
    _check_fingerprint(directory, meta, fingerprint)
    if "dir" not in meta:
        raise UserError(f"{directory} holds a train state in an older layout (state.pt); delete it to start over")
    path = directory / meta["dir"]
    model_state, optimizer_state = get_state_dict(model, optimizer)
    if layout is not None:
        layout.checkpoint_state(model, model_state, optimizer_state)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(path))
    if layout is not None:
        layout.restored_state(model, state["model"], state["optimizer"])
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return torch.load(path / EXTRA_FILE, map_location="cpu", weights_only=True)


def read_meta(directory: Path) -> dict | None:
    """What `meta.json` says of the latest state (step, cursor, ...), or None when there is none."""
    path = directory / META_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _write_meta(directory: Path, meta: dict) -> None:
    tmp_meta = directory / f".{META_FILE}.tmp-{os.getpid()}"
    tmp_meta.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp_meta, directory / META_FILE)
