"""The resumable train state: model, optimizer, step, data cursor, RNG and metric history.

Two layouts, both atomic (a process killed mid-write leaves the previous state intact) and both
announced by `meta.json`, written last, which says which step the state holds:

- `save` / `load`: rank 0 writes `state.pt`, the full replicated state (no stage uses it now).
- `ShardedCheckpointer` / `load_sharded` (pretraining and post-training, FSDP2 or DDP): every rank writes its own
  shards of the model and optimizer with torch.distributed.checkpoint into `step-NNNNNNNN/`
  (optionally in the background), beside rank 0's `extra.pt` (step, cursor, RNG, history). DCP
  reshards on load, so a state resumes under another worker count or layout.

The sharded state lives in a local directory or under an fsspec URL (`s3://bucket/prefix/...`,
which every worker of a multi-node run can reach). Locally the step directory is written as
`.step-NNNNNNNN.tmp/` and renamed into place once complete. Object stores have no rename: there
the step directory is written in place and counts once `meta.json` names it (one PUT: the
commit); rank 0 deletes any step directory `meta.json` does not name, the previous state once the
next one is committed and, at start, what a killed run left half-written.
`meta.json` also records what the step directory held at commit, checked before a resume loads it, so a
damaged state is refused, not trained on: locally the sha256 of every file (rank 0 reads the state once at
commit); on an object store each object's size and the store's own content tag (S3's ETag, an MD5 of the
bytes as uploaded), from one listing, without reading the state back.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from pipeline.contract import PathEscape, UserError, contained

from .storage import is_remote

STATE_FILE = "state.pt"
META_FILE = "meta.json"
EXTRA_FILE = "extra.pt"
SHARDED_PREFIX = "step-"

Location = str | os.PathLike
"""A local directory, or an fsspec URL such as s3://bucket/prefix/train_state."""


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


def _check_fingerprint(directory: Location, saved: dict, fingerprint: dict) -> None:
    """A state (or its meta) written under another configuration is a `UserError`."""
    if _normalise(saved["fingerprint"]) != _normalise(fingerprint):
        raise UserError(
            f"{directory} holds a train state of a different configuration (step {saved['step']}); "
            "delete it to start over, or rerun with the configuration that wrote it"
        )


def _normalise(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _local(location: Location) -> Path:
    return Path(os.fspath(location).removeprefix("file://"))


# ---------------------------------------------------------------------- sharded (DCP)
class ShardedCheckpointer:
    """Writes the sharded train state: every rank its shards of the model and optimizer, rank 0 the
    rest (`extra`) and `meta.json`.

    With `background=True` the shards are copied to CPU memory at `save` and written by a thread
    (`torch.distributed.checkpoint.async_save` over a gloo group of its own) while training goes
    on; the state is committed (local: directory renamed into place; both: then `meta.json`) once
    rank 0's write, which waits for every rank's, has finished. At most one write is in flight:
    the next `save`, `commit_finished` after a step, and `close` commit it. A run killed mid-write
    resumes from the previous committed state.
    """

    def __init__(self, directory: Location, rank: int, layout=None, background: bool = False) -> None:
        import torch.distributed as dist

        self.remote = _RemoteDir(os.fspath(directory)) if is_remote(directory) else None
        self.directory = None if self.remote else _local(directory)
        self.rank, self.layout = rank, layout
        self.group = dist.new_group(backend="gloo") if background else None  # collective: every rank
        self.pending: tuple | None = None  # (future, written dir, name, meta)
        if rank != 0:
            return
        if self.remote is not None:
            self.remote.keep_only((self.remote.read_meta() or {}).get("dir"))  # a killed run's unfinished write
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(f".{SHARDED_PREFIX}*.tmp"):  # writes a killed run left unfinished
            shutil.rmtree(stale, ignore_errors=True)

    def save(self, model: torch.nn.Module, optimizer, extra: dict) -> None:
        """Collective. `extra` must hold "step", "cursor" and "fingerprint" (they go to meta.json too)."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.close()
        name = f"{SHARDED_PREFIX}{extra['step']:08d}"
        if self.remote is not None:
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter  # not re-exported in torch 2.13

            name = self._begin_remote(name, extra)
            written = self.remote.url(name)
            # no fsync: an object is durable once its upload returns
            storage = {"storage_writer": FsspecWriter(written, sync_files=False)}
        else:
            written = self.directory / f".{name}.tmp"
            if self.rank == 0:
                shutil.rmtree(written, ignore_errors=True)
                written.mkdir(parents=True)
                torch.save(extra, written / EXTRA_FILE)
            dist.barrier()
            storage = {"checkpoint_id": str(written)}
        model_state, optimizer_state = get_state_dict(model, optimizer)
        if self.layout is not None:
            self.layout.checkpoint_state(model, model_state, optimizer_state)
        _key_groups_by_param(optimizer_state)
        state = {"model": model_state, "optimizer": optimizer_state}
        meta = {k: extra[k] for k in ("step", "cursor", "fingerprint")} | {"dir": name}
        if self.group is None:
            dcp.save(state, **storage)
            self._commit(written, name, meta)
            dist.barrier()
            return
        future = dcp.async_save(state, process_group=self.group, **storage)
        self.pending = (getattr(future, "upload_completion", future), written, name, meta)

    def _begin_remote(self, name: str, extra: dict) -> str:
        """Collective: rank 0 picks the step directory to write in place (never the committed one: a
        finished run saves its last step again) and puts `extra` in it; every rank gets its name."""
        import torch.distributed as dist

        chosen = [name]
        if self.rank == 0:
            if (self.remote.read_meta() or {}).get("dir") == name:
                chosen = [f"{name}.2"]
            self.remote.remove(chosen[0])  # an earlier unfinished write under this name
            self.remote.save_extra(chosen[0], extra)
        dist.broadcast_object_list(chosen, src=0)
        return chosen[0]

    def commit_finished(self) -> None:
        """Commit the write in flight if it has finished (cheap; call after every step)."""
        if self.pending is not None and self.pending[0].done():
            self.close()

    def close(self) -> None:
        """Wait for the write in flight, if any, and commit it."""
        if self.pending is None:
            return
        future, written, name, meta = self.pending
        self.pending = None
        future.result()
        self._commit(written, name, meta)

    def _commit(self, written: Location, name: str, meta: dict) -> None:
        if self.rank != 0:
            return
        if self.remote is not None:
            meta = meta | {"objects": self.remote.fingerprints(name)}  # checked before a resume loads the state
            self.remote.write_meta(meta)  # the commit: one PUT naming the finished step directory
            self.remote.keep_only(name)
            return
        meta = meta | {"sha256": file_digests(Path(written))}  # checked before a resume loads the state
        shutil.rmtree(self.directory / name, ignore_errors=True)
        os.replace(written, self.directory / name)
        _write_meta(self.directory, meta)
        for old in self.directory.glob(f"{SHARDED_PREFIX}*"):  # the state before this one, once this one is in place
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)


def load_sharded(directory: Location, fingerprint: dict, model: torch.nn.Module, optimizer, layout=None) -> dict | None:
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
    remote = _RemoteDir(os.fspath(directory)) if is_remote(directory) else None
    if remote is not None:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        recorded = meta.get("objects")
        _verify_on_rank0(
            meta["dir"], lambda: remote.changed_objects(meta["dir"], recorded) if recorded else [], directory, "objects"
        )
        storage = {"storage_reader": FsspecReader(remote.url(meta["dir"]))}
    else:
        step_dir = contained(_local(directory), meta["dir"], f"{directory}/{META_FILE} dir")
        recorded = meta.get("sha256")
        _verify_on_rank0(
            meta["dir"], lambda: damaged_files(step_dir, recorded) if recorded else [], directory, "sha256"
        )
        storage = {"checkpoint_id": str(step_dir)}
    model_state, optimizer_state = get_state_dict(model, optimizer)
    if layout is not None:
        layout.checkpoint_state(model, model_state, optimizer_state)
    grouping = _key_groups_by_param(optimizer_state)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, **storage)
    if layout is not None:
        layout.restored_state(model, state["model"], state["optimizer"])
    state["optimizer"]["param_groups"] = _regroup(state["optimizer"]["param_groups"], grouping, directory)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    if remote is not None:
        return remote.load_extra(meta["dir"])
    return torch.load(_local(directory) / meta["dir"] / EXTRA_FILE, map_location="cpu", weights_only=True)


def file_digests(directory: Path) -> dict[str, str]:
    """sha256 of every file below `directory`, by path relative to it."""
    digests = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digests[path.relative_to(directory).as_posix()] = h.hexdigest()
    return digests


def damaged_files(step_dir: Path, recorded: dict[str, str]) -> list[str]:
    """Files of a committed local state that are missing or no longer match the digests meta.json recorded."""
    found = file_digests(step_dir)
    return sorted(name for name, digest in recorded.items() if found.get(name) != digest)


def _verify_on_rank0(name: str, damaged_of, directory: Location, what: str) -> None:
    """Collective when distributed: rank 0 checks the step directory `name` (`damaged_of()`: the files that changed
    since the commit), every rank gets its word, so no rank loads a damaged state (a disk error, a copy cut short,
    a hand edit, an object overwritten) as if it were whole. States committed before this was recorded load
    unchecked."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    first = not distributed or dist.get_rank() == 0
    damaged = [damaged_of() if first else None]
    if distributed:
        dist.broadcast_object_list(damaged, src=0)
    if damaged[0]:
        raise UserError(
            f"the train state in {directory} is damaged: {', '.join(damaged[0][:5])} of {name} no longer "
            f"match the {what} recorded when it was committed (meta.json); delete {directory} to start this stage "
            "over, or restore the state from a copy"
        )


def _key_groups_by_param(optimizer_state: dict) -> list[list[str]]:
    """In place: the optimizer state's `param_groups` become {parameter name: its group's
    hyperparameters}, the form a sharded state holds; returns the groups' parameter names.

    The groups follow the layout (`build_optimizer` keeps FSDP2 shards and plain tensors, such as
    expert-parallel slices, in separate groups), the hyperparameters follow the parameter. DCP
    addresses a list by position (`optimizer.param_groups.0.lr`), so groups saved under one layout
    would load into another's by index and leave some without hyperparameters (AdamW's
    `KeyError: 'betas'`); keyed by parameter, a state loads under any layout.
    """
    groups = optimizer_state["param_groups"]
    optimizer_state["param_groups"] = {
        name: {key: value for key, value in group.items() if key != "params"}
        for group in groups
        for name in group["params"]
    }
    return [list(group["params"]) for group in groups]


def _regroup(by_param: dict, grouping: list[list[str]], directory: Location) -> list[dict]:
    """The inverse of `_key_groups_by_param`: loaded hyperparameters in this optimizer's `grouping`."""
    groups = []
    for names in grouping:
        values = [by_param[name] for name in names]
        if any(value != values[0] for value in values[1:]):
            raise UserError(
                f"{directory} holds a train state whose optimizer settings differ within one of this run's "
                f"parameter groups ({names[0]}: {values[0]}); delete it to start over"
            )
        groups.append({**(values[0] if values else {}), "params": names})
    return groups


def read_meta(directory: Location) -> dict | None:
    """What `meta.json` says of the latest state (step, cursor, ...), or None when there is none."""
    if is_remote(directory):
        return _RemoteDir(os.fspath(directory)).read_meta()
    path = _local(directory) / META_FILE
    return _checked_meta(json.loads(path.read_text()), path) if path.is_file() else None


def _checked_meta(meta: dict, where: Location) -> dict:
    """`meta` whose `dir` (when present) names one step directory beside it, nothing else."""
    name = meta.get("dir") if isinstance(meta, dict) else None
    if name is not None and (not isinstance(name, str) or "/" in name or not name.startswith(SHARDED_PREFIX)):
        raise PathEscape(f"{where}: dir={name!r} is not a {SHARDED_PREFIX}N directory beside it")
    return meta


def copy_state(directory: Location, destination: Path) -> None:
    """The committed sharded state (`meta.json` and its step directory) copied to local `destination`."""
    if not is_remote(directory):
        shutil.copytree(_local(directory), destination)
        return
    _RemoteDir(os.fspath(directory)).download(destination)


def _meta_text(meta: dict) -> str:
    return json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n"


def _write_meta(directory: Path, meta: dict) -> None:
    tmp_meta = directory / f".{META_FILE}.tmp-{os.getpid()}"
    tmp_meta.write_text(_meta_text(meta))
    os.replace(tmp_meta, directory / META_FILE)


def _content_tag(fs, path: str, info: dict) -> str:
    """The store's own tag of an object's content: S3's ETag (GCS: its MD5 or CRC32C), else fsspec's `ukey`."""
    for key in ("ETag", "md5Hash", "crc32c"):
        if info.get(key):
            return str(info[key]).strip('"')
    return fs.ukey(path)


class _RemoteDir:
    """A sharded train state under an fsspec URL; credentials and endpoint come from the environment
    (AWS_* / FSSPEC_S3_* variables, ~/.aws), as for the artifact store."""

    def __init__(self, url: str) -> None:
        import fsspec

        self.root = url.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.root)

    def url(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _key(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def read_meta(self) -> dict | None:
        try:
            return _checked_meta(json.loads(self.fs.cat_file(self._key(META_FILE))), self.url(META_FILE))
        except FileNotFoundError:
            return None

    def write_meta(self, meta: dict) -> None:
        self.fs.pipe_file(self._key(META_FILE), _meta_text(meta).encode())

    def save_extra(self, name: str, extra: dict) -> None:
        buffer = io.BytesIO()
        torch.save(extra, buffer)
        self.fs.pipe_file(self._key(name, EXTRA_FILE), buffer.getvalue())

    def load_extra(self, name: str) -> dict:
        data = self.fs.cat_file(self._key(name, EXTRA_FILE))
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

    def step_dirs(self) -> list[str]:
        self.fs.invalidate_cache(self.path)  # other processes write here: no stale listing
        try:
            entries = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return []
        names = [posixpath.basename(entry.rstrip("/")) for entry in entries]
        return [name for name in names if name.startswith(SHARDED_PREFIX)]

    def remove(self, name: str) -> None:
        try:
            self.fs.rm(self._key(name), recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(self.path)

    def fingerprints(self, name: str) -> dict[str, str]:
        """ "size:content tag" of every object of step directory `name`, by path relative to it (one listing)."""
        base = self._key(name)
        self.fs.invalidate_cache(base)
        found = self.fs.find(base, detail=True)
        return {
            posixpath.relpath(path, base): f"{info['size']}:{_content_tag(self.fs, path, info)}"
            for path, info in sorted(found.items())
        }

    def changed_objects(self, name: str, recorded: dict[str, str]) -> list[str]:
        """Objects of a committed step directory that are missing or differ from what its commit recorded."""
        found = self.fingerprints(name)
        return sorted(path for path, tag in recorded.items() if found.get(path) != tag)

    def keep_only(self, name: str | None) -> None:
        """Delete every step directory but `name` (None: all of them)."""
        for other in self.step_dirs():
            if other != name:
                self.remove(other)

    def download(self, destination: Path) -> None:
        meta = self.read_meta()
        if meta is None:
            raise FileNotFoundError(f"{self.root} holds no train state ({META_FILE} is missing)")
        step_dir = self._key(meta["dir"])
        self.fs.invalidate_cache(step_dir)
        for key in self.fs.find(step_dir):
            local = destination / meta["dir"] / posixpath.relpath(key, step_dir)
            local.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(key, str(local))
        (destination / META_FILE).write_text(_meta_text(meta))
