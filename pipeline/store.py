"""Content-addressed artifact store on any fsspec filesystem (local directory or s3://).

Layout under `artifacts.root`:
    {stage}/{cache_key}/...            a finished artifact, `manifest.json` written last
    {stage}/.staging-{key}-{token}/    a stage's output while it runs (local roots; the token names
                                       the writing process, so one killed is cleared later)
    .work/{stage}/{cache_key}/...      resume state every worker reaches (remote roots: the
                                       pretraining train state); never read as an artifact
    runs/{run_id}.json                 one record per pipeline run (for `ls` / `show`)
Local working copies of remote artifacts, the other resume state and the cache keys' locks
(`locks/{stage}/{cache_key}.lock`, `pipeline.keylock`) live under `local_root`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import fsspec

from .contract import MANIFEST, SCHEMA_VERSION, Artifact, PathEscape, UserError, check_relative, contained, file_digest

ROOT = Path(__file__).resolve().parents[1]
RUN_FIELDS = ("run_id", "conf", "status", "started_at")
"""What `ls` and `show` need of every run record."""
STATE_PREFIX = ".work"
"""Under a remote root: resume state (a dot name, so no stage and no artifact key can clash with it)."""


STAGING_PREFIX = ".staging-"
"""Of a stage's staging directory under a local root (beside its artifacts, which a dot name cannot be)."""
_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"
_OWNER = re.compile(r"-p(\d+)@([A-Za-z0-9._-]+)$")


def _abandoned(name: str) -> bool:
    """Whether `name` is a staging directory whose writer, a process of this host, is gone."""
    owner = _OWNER.search(name)
    if owner is None or owner.group(2) != _HOST:
        return False  # not a staging directory, an older one (no owner in its name), or another host's
    try:
        os.kill(int(owner.group(1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        pass  # alive, under another user (or no pid this system has)
    return False


class StorageError(RuntimeError):
    """An operation on a remote artifact root (S3, ...) failed after the client's own retries; the
    message names the operation, the URL and the cause (the S3 error code where there is one)."""


def cache_key(stage: str, config: Any, code: str, input_keys: dict[str, str], extra: dict | None = None) -> str:
    """sha256 of the stage name, its resolved config, its code and its inputs' keys."""
    payload = {
        "stage": stage,
        "config": _plain(config),
        "code": code,
        "inputs": dict(sorted(input_keys.items())),
        "extra": _plain(extra or {}),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _plain(value: Any) -> Any:
    if is_dataclass(value):
        return asdict(value)
    return value


def code_fingerprint(module_path: str) -> str:
    """sha256 over the source of a stage package plus everything a stage may import."""
    package_dir = ROOT / Path(*module_path.split("."))
    files = sorted(package_dir.rglob("*.py")) if package_dir.is_dir() else [package_dir.with_suffix(".py")]
    if module_path.startswith("stages.posttrain."):
        files += sorted((ROOT / "stages" / "posttrain").glob("*.py"))
    files += sorted((ROOT / "stages" / "training").glob("*.py"))  # shared training plumbing
    files += sorted((ROOT / "ernie").rglob("*.py"))
    files += [ROOT / "pipeline" / name for name in ("contract.py", "formats.py", "shards.py")]
    h = hashlib.sha256()
    for path in sorted(set(files)):
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _describe(err: BaseException) -> str:
    """A client error in one line: its type and message, the service's error code and HTTP status
    (s3fs keeps botocore's error as the cause), and what to do about a denied access."""
    text = f"{type(err).__name__}: {err}"
    response = getattr(err.__cause__, "response", None) or getattr(err, "response", None)
    if isinstance(response, dict) and response.get("Error", {}).get("Code"):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        text += f" (error code {response['Error']['Code']}, HTTP {status})"
    if isinstance(err, PermissionError):
        text += (
            ". Access was denied: check the credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE, an expired session"
            " token) and the bucket policy, then rerun the same command"
        )
    return text


class ArtifactStore:
    def __init__(self, root: str, local_root: str | os.PathLike) -> None:
        self.root = root.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.root)
        self.is_local = self.fs.protocol in ("file", "local") or "file" in self.fs.protocol
        self.scheme = self.root.split("://", 1)[0] if "://" in self.root else "file"
        self.local_root = Path(local_root)

    # -------------------------------------------------------------- addresses
    def uri(self, stage: str, key: str) -> str:
        return f"{self.root}/{stage}/{key}"

    def _path(self, *parts: str) -> str:
        """A path under the root; every part is one name (no `/`, no `..`): nothing addressed leaves it."""
        for part in parts:
            if "/" in check_relative(part, f"a path under artifacts.root={self.root}"):
                raise PathEscape(f"a path under artifacts.root={self.root}: {part!r} is not one name")
        return "/".join([self.path.rstrip("/"), *parts])

    def _read_json(self, *parts: str) -> Any:
        """A JSON file under the root (a manifest, a run record); under a local root it may not be a
        symlink out of the root, and an unreadable one is a `UserError` naming it."""
        path = self._path(*parts)
        if self.is_local:
            contained(self.path, "/".join(parts), f"artifacts.root={self.root}")
        try:
            return json.loads(self.fs.cat_file(path))
        except (ValueError, UnicodeDecodeError) as err:
            raise UserError(f"{self.root}/{'/'.join(parts)} is not valid JSON ({err}); delete or restore it") from None

    def work_dir(self, stage: str, key: str) -> Path:
        """Resume state of one (stage, cache key), kept across interrupted attempts."""
        return self.local_root / "work" / stage / key

    def lock_path(self, stage: str, key: str) -> Path:
        """The lock a run holds while it runs this (stage, cache key) (`pipeline.keylock`)."""
        return self.local_root / "locks" / stage / f"{key}.lock"

    def state_uri(self, stage: str, key: str) -> str | None:
        """Resume state of one (stage, cache key) that workers on any node must reach: under a remote
        root, `{root}/.work/{stage}/{key}`; None under a local root (the local `work_dir` serves)."""
        return None if self.is_local else f"{self.root}/{STATE_PREFIX}/{stage}/{key}"

    def check_writable(self) -> None:
        try:
            if self.is_local:  # object stores have no directories (and mkdir would create a bucket)
                self.fs.makedirs(self.path, exist_ok=True)
            probe = self._path(f".probe-{uuid.uuid4().hex}")
            self.fs.pipe(probe, b"ok")
            self.fs.rm(probe)
        except Exception as err:  # noqa: BLE001 - any backend error means the same to the user
            raise UserError(
                f"artifacts.root={self.root} is not writable ({type(err).__name__}: {err}). "
                "Point artifacts.root at a writable directory or bucket (and check credentials)."
            ) from None

    # -------------------------------------------------------------- reading
    def find(self, stage: str, key: str) -> Artifact | None:
        """The finished artifact for this key, or None (no manifest = not an artifact)."""
        manifest_path = self._path(stage, key, MANIFEST)
        with self._remote_op("reading", f"{self.uri(stage, key)}/{MANIFEST}"):
            if not self.fs.exists(manifest_path):
                return None
            manifest = self._read_json(stage, key, MANIFEST)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("kind"), str):
            raise UserError(f"{self.uri(stage, key)}/{MANIFEST} is not an artifact manifest (no kind); delete it")
        return Artifact(kind=manifest["kind"], uri=self.uri(stage, key), cache_key=key, manifest=manifest)

    def fetch(self, artifact: Artifact) -> Artifact:
        """The artifact with a local directory (downloaded once for remote roots)."""
        if self.is_local:
            return Artifact(
                artifact.kind,
                artifact.uri,
                artifact.cache_key,
                artifact.manifest,
                local_path=self._path(*self._rel(artifact.uri)),
            )
        stage = self._rel(artifact.uri)[0]
        local = self.local_root / "fetched" / stage / artifact.cache_key
        if not (local / MANIFEST).is_file():
            tmp = local.with_name(local.name + f".tmp-{uuid.uuid4().hex[:8]}")
            remote = self._path(*self._rel(artifact.uri))
            with self._remote_op("download of", artifact.uri):
                keys = self.fs.find(remote)
                targets = [self._local_copy(tmp, remote, key, artifact.uri) for key in keys]  # all checked first
                for target in targets:
                    target.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get(keys, [str(t) for t in targets])
            shutil.rmtree(local, ignore_errors=True)
            tmp.rename(local)
        return Artifact(artifact.kind, artifact.uri, artifact.cache_key, artifact.manifest, local_path=str(local))

    def _rel(self, uri: str) -> list[str]:
        return uri[len(self.root) + 1 :].split("/")

    @staticmethod
    def _local_copy(tmp: Path, remote: str, key: str, uri: str) -> Path:
        """Where a remote artifact's file goes: inside `tmp`, whatever its key says (an object store
        happily holds a key like `x/../../etc/y`)."""
        prefix = remote.rstrip("/") + "/"
        if not key.startswith(prefix):
            raise PathEscape(f"artifact {uri} lists {key!r}, which is not under {remote}")
        return contained(tmp, key[len(prefix) :], f"artifact {uri} holds file")

    # -------------------------------------------------------------- writing
    def staging_dir(self, stage: str, key: str) -> Path:
        """A fresh local directory for a stage's output, named after the process that writes it.

        A stage that fails deletes its own (`executor._discard`); one killed outright cannot. So the
        staging directories of this stage left by processes of this host that are gone are deleted here
        first, with their eval scratch: a killed attempt is not kept on disk by every rerun."""
        token = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}-p{os.getpid()}@{_HOST}"
        if self.is_local:
            path = Path(self._path(stage, f"{STAGING_PREFIX}{key[:16]}-{token}"))
        else:
            path = self.local_root / "staging" / stage / f"{key[:16]}-{token}"
        if path.parent.is_dir():
            for left in path.parent.iterdir():
                if _abandoned(left.name):
                    shutil.rmtree(left, ignore_errors=True)
                    shutil.rmtree(left.parent / f".eval-{left.name}", ignore_errors=True)
        path.mkdir(parents=True, exist_ok=False)
        return path

    def commit(self, stage: str, key: str, kind: str, staged: Path, manifest_extra: dict) -> Artifact:
        """`place` then `publish`, in one process."""
        return self.publish(stage, key, self.place(stage, key, kind, staged, manifest_extra))

    def place(self, stage: str, key: str, kind: str, staged: Path, manifest_extra: dict) -> dict:
        """Move the staged output into place (no manifest yet) and return the manifest `publish` will write.

        Runs where the stage ran, beside its files. If a step fails (disk full, S3 access denied, ...) the
        half-placed directory is removed as far as possible: without a manifest `find` never sees it, and the
        next attempt's `place` replaces it."""
        manifest = {
            "kind": kind,
            "schema_version": SCHEMA_VERSION,
            "stage": stage,
            "cache_key": key,
            "content_digest": file_digest(staged),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **manifest_extra,
        }
        final = self._path(stage, key)
        uri = self.uri(stage, key)
        with self._remote_op("removal of an unfinished earlier attempt at", uri):
            if self.fs.exists(final):
                self.fs.rm(final, recursive=True)  # a directory without manifest: an earlier attempt that died
        try:
            if self.is_local:
                os.replace(staged, final)
            else:
                with self._remote_op(f"upload of {staged} to", uri):
                    self.fs.put(str(staged) + "/", final, recursive=True)
        except BaseException:
            self._unplace(final)
            raise
        if not self.is_local:
            shutil.rmtree(staged, ignore_errors=True)
        return manifest

    def publish(self, stage: str, key: str, manifest: dict) -> Artifact:
        """Write the manifest of a placed output: the one write that makes it an artifact. The driver makes
        it once the stage has returned, so a driver killed while its stage runs leaves no artifact even when
        the stage finishes before Ray ends it. A failed write removes the placed files as far as possible."""
        try:
            self._write(self._path(stage, key, MANIFEST), (json.dumps(manifest, indent=2) + "\n").encode())
        except BaseException:
            self._unplace(self._path(stage, key))
            raise
        return Artifact(kind=manifest["kind"], uri=self.uri(stage, key), cache_key=key, manifest=manifest)

    def _unplace(self, final: str) -> None:
        with contextlib.suppress(Exception):  # best effort: with credentials revoked this fails too
            self.fs.rm(final, recursive=True)

    def _write(self, path: str, data: bytes) -> None:
        """One file under the root, whole or not at all: locally a temporary file renamed into place
        (a full disk leaves no truncated manifest or record); on an object store one PUT."""
        if not self.is_local:
            with self._remote_op("write of", self.root + path[len(self.path.rstrip("/")) :]):
                self.fs.pipe(path, data)
            return
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    @contextlib.contextmanager
    def _remote_op(self, what: str, url: str) -> Iterator[None]:
        """Errors of a remote root's client (after its retries) as a `StorageError` naming what failed."""
        try:
            yield
        except (UserError, StorageError):
            raise
        except Exception as err:
            if self.is_local:
                raise
            raise StorageError(f"{self.scheme.upper()} {what} {url} failed: {_describe(err)}") from err

    # -------------------------------------------------------------- run records
    def save_run(self, record: dict) -> None:
        with self._remote_op("write of", f"{self.root}/runs/{record['run_id']}.json"):
            self.fs.makedirs(self._path("runs"), exist_ok=True)
        self._write(self._path("runs", f"{record['run_id']}.json"), (json.dumps(record, indent=2) + "\n").encode())

    def runs(self) -> list[dict]:
        if not self.fs.exists(self._path("runs")):
            return []
        records = []
        for path in self.fs.glob(self._path("runs", "*.json")):
            name = path.rsplit("/", 1)[-1]
            record = self._read_json("runs", name)
            if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in RUN_FIELDS):
                raise UserError(
                    f"{self.root}/runs/{name} is not a pipeline run record (needs {', '.join(RUN_FIELDS)}); delete it"
                )
            records.append(record)
        return sorted(records, key=lambda r: r["started_at"])

    def run(self, run_id: str) -> dict:
        matches = [r for r in self.runs() if r["run_id"].startswith(run_id)]
        if not matches:
            raise UserError(f"no pipeline run {run_id!r} under {self.root}; `python -m pipeline ls` lists them")
        if len(matches) > 1:
            raise UserError(f"run id prefix {run_id!r} is ambiguous: {[r['run_id'] for r in matches]}")
        return matches[0]
