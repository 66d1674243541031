"""The stage contract: what a stage receives (`StageContext`) and what it hands on (`Artifact`).

A stage is `run(ctx: StageContext) -> StageResult`. It reads its typed config from
`ctx.config`, its inputs from `ctx.inputs[name]` (each an `Artifact`, already on local disk
via `local_dir()`), writes everything it produces under `ctx.output_dir`, logs through
`ctx.log` and reports progress through `ctx.progress`. The orchestrator turns the output
directory into an artifact: it uploads it (when the artifact root is remote) and the driver writes
`manifest.json` last, so a stage (or driver) that dies never leaves something that looks finished.

This module has no Ray, MLflow or Hydra import: stages and their tests use it alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
LOCAL_RAY_CPUS = 4
"""Logical CPUs of a local Ray (the pipeline's default and a stage's run outside the pipeline)."""


class UserError(Exception):
    """Bad input from the user: printed as one paragraph, exit code 2, nothing written."""


class PathEscape(UserError, ValueError):
    """A path named by a manifest, an index, a record or the command line that would leave the
    directory it must stay in (absolute, `..`, or a symlink out). A `ValueError` too, so a reader that
    turns a bad record's `ValueError` into an error record keeps doing so."""


def check_relative(name: str, what: str) -> str:
    """`name` if it is a relative path that stays where it is put (no root, no `..`, no NUL byte);
    else `PathEscape` naming `what` and the path. Lexical only: for object stores and for names
    checked before the directory exists."""
    if not isinstance(name, str) or not name:
        raise PathEscape(f"{what}: {name!r} is not a relative path")
    if name.startswith("/") or "\0" in name or ".." in name.split("/"):
        raise PathEscape(f"{what}: {name!r} leaves its directory (absolute paths and '..' are refused)")
    return name


def contained(root: str | os.PathLike, name: str, what: str) -> Path:
    """`root / name` on local disk, refused with `PathEscape` (naming `what` and the path) when `name`
    is absolute, climbs out with `..`, or resolves through a symlink to somewhere outside `root`."""
    path = Path(root) / check_relative(name, what)
    base = Path(root).resolve()
    if not path.resolve().is_relative_to(base):
        raise PathEscape(f"{what}: {name!r} resolves to {path.resolve()}, outside {base} (a symlink out)")
    return path


# ---------------------------------------------------------------------- artifacts
@dataclass(frozen=True)
class Artifact:
    """A finished stage output: a directory (local path or fsspec URI) with a manifest."""

    kind: str  # dataset | ckpt | qckpt | endpoint
    uri: str
    cache_key: str
    manifest: dict = field(default_factory=dict, compare=False)
    local_path: str | None = None  # where it is on this machine, once fetched

    def local_dir(self) -> Path:
        """The artifact as a local directory (fetched by the orchestrator for remote roots)."""
        if self.local_path is not None:
            return Path(self.local_path)
        if "://" in self.uri and not self.uri.startswith("file://"):
            raise RuntimeError(f"artifact {self.uri} has not been fetched to local disk")
        return Path(self.uri.removeprefix("file://"))

    def read_json(self, relative: str) -> Any:
        return json.loads((self.local_dir() / relative).read_text())


def file_digest(directory: Path) -> str:
    """sha256 over (relative path, size, content) of every file except the manifest."""
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        h.update(str(path.relative_to(directory)).encode())
        h.update(str(path.stat().st_size).encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------- logging + progress
class StageLogger(Protocol):
    """What a stage may log; the orchestrator binds it to the stage's MLflow run."""

    def metrics(self, values: dict[str, float], step: int | None = None) -> None: ...

    def params(self, values: dict[str, Any]) -> None: ...

    def artifact(self, path: str | os.PathLike, subdir: str | None = None) -> None: ...

    def figure(self, figure, name: str) -> None: ...

    def text(self, text: str, name: str) -> None: ...


class MemoryLogger:
    """A `StageLogger` that keeps everything in memory (tests, and stages run without tracking)."""

    def __init__(self) -> None:
        self.metric_log: list[tuple[str, float, int | None]] = []
        self.param_log: dict[str, Any] = {}
        self.artifact_log: list[str] = []

    def metrics(self, values, step=None):
        self.metric_log += [(k, float(v), step) for k, v in values.items()]

    def params(self, values):
        self.param_log.update(values)

    def artifact(self, path, subdir=None):
        self.artifact_log.append(str(path))

    def figure(self, figure, name):
        self.artifact_log.append(name)

    def text(self, text, name):
        self.artifact_log.append(name)

    def last(self, name: str) -> float:
        return [v for k, v, _ in self.metric_log if k == name][-1]


class RelayLogger:
    """A `StageLogger` that queues what a stage logs until the driver takes it (`drain`) and writes it to the
    stage's MLflow run: a stage's process (on any node) needs no MLflow client, import or route to the tracking
    server, and starts seconds sooner. Figures and texts travel as file bytes (small files, not checkpoints)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[tuple] = []

    def __getstate__(self):
        raise TypeError("a RelayLogger stays in the stage's process: rank 0 sends its metrics to it (launch.relay)")

    def _put(self, event: tuple) -> None:
        with self._lock:
            self._events.append(event)

    def metrics(self, values, step=None):
        self._put(("metrics", {k: float(v) for k, v in values.items()}, step, int(time.time() * 1000)))

    def params(self, values):
        self._put(("params", dict(values)))

    def artifact(self, path, subdir=None):
        path = Path(path)
        if path.is_dir():
            files = [(f.relative_to(path).as_posix(), f.read_bytes()) for f in sorted(path.rglob("*")) if f.is_file()]
        else:
            files = [(path.name, path.read_bytes())]
        self._put(("files", files, subdir))

    def figure(self, figure, name):
        import io

        image = io.BytesIO()
        figure.savefig(image, format=Path(name).suffix.lstrip(".") or "png")
        self._put(("files", [(name, image.getvalue())], None))

    def text(self, text, name):
        self._put(("files", [(name, text.encode())], None))

    def drain(self) -> list[tuple]:
        """Everything logged since the last drain, oldest first."""
        with self._lock:
            events, self._events = self._events, []
        return events


class Progress:
    """Thread-safe progress of one stage, polled by the driver to draw its bar."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total: int | None = None
        self.done = 0
        self.message = ""
        self.started = time.time()

    def set_total(self, total: int, message: str = "") -> None:
        with self._lock:
            self.total, self.done, self.message = total, 0, message or self.message

    def update(self, n: int = 1, message: str | None = None) -> None:
        with self._lock:
            self.done += n
            if message is not None:
                self.message = message

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def snapshot(self) -> dict:
        with self._lock:
            return {"total": self.total, "done": self.done, "message": self.message}


# ---------------------------------------------------------------------- context + result
@dataclass
class Resources:
    """What the stage's Ray actor asks the cluster for (distributed stages: per worker too)."""

    num_cpus: float = 1.0
    """Logical CPUs reserved (Ray's num_cpus; torch threads follow Ray's OMP_NUM_THREADS)."""
    num_gpus: float = 0.0
    """GPUs reserved (fractions share one GPU)."""
    memory_gb: float = 0.0
    """Memory to reserve for the stage actor (0 = no reservation)."""
    custom: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources the stage actor needs, e.g. {gpu_serve: 1}: it runs only on nodes started with them
    (`ray start --resources='{"gpu_serve": 4}'`, a node type's `resources:` in the cluster launcher or KubeRay).
    New keys need Hydra's `++`: `++serve.resources.custom={gpu_serve:1}`."""


@dataclass(frozen=True)
class Request:
    """Everything a stage holds on the cluster at once (its actor, workers, actors, replicas)."""

    cpus: float
    gpus: float
    terms: str
    """How the totals add up, in the config's own field names (for error messages)."""


def requested(section: Any) -> Request:
    """A stage config's `requested()` when it has one, else its own actor's `resources`."""
    if hasattr(section, "requested"):
        return section.requested()
    res = section.resources
    return Request(res.num_cpus, res.num_gpus, f"resources.num_cpus={res.num_cpus:g}, num_gpus={res.num_gpus:g}")


def check_fits(request: Request, cluster: dict[str, float], key: str) -> None:
    """Refuse a stage the cluster can never place: Ray would wait for the resources forever."""
    for name, need in (("CPU", request.cpus), ("GPU", request.gpus)):
        have = cluster.get(name, 0.0)
        if need > have + 1e-9:
            raise UserError(
                f"{key} asks for {need:g} {name}(s) at once ({request.terms}) but the Ray cluster has {have:g}. "
                f"Lower the request, add nodes{', or use dry_run=true for a CPU rehearsal' if name == 'GPU' else ''}."
            )


def check_custom_resources(resources: Any, cluster: dict[str, float] | None, key: str) -> None:
    """Refuse a bad `resources.custom` entry, or (given the cluster's totals) one no node offers: Ray would wait
    for it forever."""
    for name, need in getattr(resources, "custom", {}).items():
        if name in ("CPU", "GPU", "memory", "object_store_memory"):
            raise UserError(f"{key}.resources.custom.{name}: ask for it with num_cpus, num_gpus or memory_gb")
        if not need > 0:
            raise UserError(f"{key}.resources.custom.{name}={need} must be > 0")
        have = 0.0 if cluster is None else cluster.get(name, 0.0)
        if cluster is not None and need > have + 1e-9:
            raise UserError(
                f"{key} asks for {need:g} of the custom resource {name!r} (resources.custom) but the Ray cluster's "
                f"nodes offer {have:g}. Start a node with it (ray start --resources='{{\"{name}\": {need:g}}}') or "
                "drop the entry."
            )


@dataclass
class StageContext:
    stage: str
    config: Any  # the stage's typed config section
    model: Any  # the pipeline's `ernie.ErnieConfig` (after dry-run shrinking)
    inputs: dict[str, Artifact]
    output_dir: Path
    log: StageLogger = field(default_factory=MemoryLogger)
    """In the pipeline a `RelayLogger`: log from the stage's process (rank 0's metrics reach it through
    `stages.training.launch.relay`), not from workers."""
    progress: Progress = field(default_factory=Progress)
    seed: int = 0
    dry_run: bool = False
    num_cpus: float = 1
    num_gpus: float = 0
    work_dir: Path | None = None  # scratch space (resume checkpoints of this cache key)
    state_uri: str | None = None
    """Where resume state that every worker (on any node) must reach goes: an fsspec URL under a
    remote artifact root, kept across attempts of this cache key; None: keep it under `work_dir`."""

    def input(self, name: str) -> Artifact:
        if name not in self.inputs:
            raise UserError(f"stage {self.stage} needs the input artifact {name!r}, which is missing")
        return self.inputs[name]


@dataclass
class StageResult:
    """What the orchestrator records in the manifest and shows the user."""

    metrics: dict[str, float] = field(default_factory=dict)
    summary: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
