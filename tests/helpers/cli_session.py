"""`python -m pipeline` commands in one long-lived process, so they share one Ray.

Each `python -m pipeline run` process pays for its imports, Ray's start and a fresh MLflow database
(30 to 60 s on a loaded 2-core machine) before its stage starts; in one process only the first run
does, and the next ones take seconds. Each command still goes through `pipeline.cli.main`, as
`python -m pipeline` does, with its exit code, stdout and stderr captured; an exception that
escapes it is a traceback on stderr and exit code 1, as `pipeline.cli.entry` makes it. Filesystem
instances (and their listing caches) are dropped before each command, as in a new process.

`CliSession` starts the process (`python cli_session.py`, optionally inside
`unshare --user --map-root-user --mount`, where its shell steps may mount a tmpfs that Ray's
workers see too) and sends it one JSON step per line:
    {"run": [words...]}   a pipeline command: {rc, stdout, stderr, seconds}
    {"sh": "command"}     a shell command: {rc, output}
    {"files": "dir"}      every file under dir: {relative path: sha256}
The process ends, and its Ray with it, once no step came for `IDLE_SECONDS`, so a session fixture
holds no Ray through the rest of the test suite; the next step then starts a new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import queue
import select
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

MARK = "@@cli-session@@ "
IDLE = "@@cli-session-idle@@"
IDLE_SECONDS = 120
"""Long enough for the other test files of a directory to run between two that use the session."""
SMALL_DATA = [
    "conf=tiny",
    "model=tiny_moe",
    "model.vocab_size=400",
    "data.vocab_size=400",
    "data.sources=[{name:stdlib-docs,kind:stdlib,weight:0.7},{name:arithmetic,kind:arithmetic,weight:0.3}]",
    "data.max_documents=100",
    "data.arithmetic_documents=60",
    "data.sft_examples=40",
    "data.preference_pairs=20",
    "data.eval_tasks=20",
    "data.rows_per_shard=16",
    "until=data",
]
"""The cheapest run that writes real shards: the data stage alone on text sources (an artifact of
28 files, 1.7 MB: 13 + 2 shards of up to 120 KiB and small jsonl / tokenizer / stats files)."""


class CliSession:
    """The client: a driver process that runs steps in order; `close()` ends it (and its Ray)."""

    def __init__(self, cwd: Path, env: dict[str, str], namespace: bool) -> None:
        self.command = [sys.executable, str(Path(__file__).resolve())]
        if namespace:
            self.command = ["unshare", "--user", "--map-root-user", "--mount", *self.command]
        self.cwd, self.env, self.log = cwd, env, cwd / "cli-session.log"
        self.process: subprocess.Popen | None = None

    def _start(self) -> None:
        self.process = subprocess.Popen(
            self.command,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log.open("a"),
            text=True,
        )
        self.replies: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(self.process, self.replies), daemon=True).start()

    @staticmethod
    def _read(process: subprocess.Popen, replies: queue.Queue) -> None:
        for line in process.stdout:
            if line.startswith((MARK, IDLE)):
                replies.put(line)
        replies.put(None)

    def step(self, step: dict, timeout: float = 600) -> dict:
        for _ in range(2):
            if self.process is None or self.process.poll() is not None:
                self._start()
            try:
                self.process.stdin.write(json.dumps(step) + "\n")
                self.process.stdin.flush()
                reply = self.replies.get(timeout=timeout)
            except BrokenPipeError:  # it ended, idle, just now
                reply = IDLE
            except queue.Empty:
                raise TimeoutError(f"{step} took over {timeout} s; see {self.log}") from None
            if reply is None:
                raise RuntimeError(f"the session process ended: {self.log.read_text()[-3000:]}")
            if not reply.startswith(IDLE):  # else it ended, idle, before reading the step: again
                return json.loads(reply[len(MARK) :])
            self.process.wait()
        raise RuntimeError("the session process keeps ending")

    def run(self, *words: str, timeout: float = 600) -> dict:
        return self.step({"run": list(words)}, timeout)

    def sh(self, command: str) -> dict:
        return self.step({"sh": command}, 60)

    def files(self, directory: str | Path) -> dict[str, str]:
        return self.step({"files": str(directory)}, 60)

    def close(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def file_digests(directory: str | Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `directory` ({} if it does not exist)."""
    root = Path(directory)
    if not root.is_dir():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def artifact_files(listing: dict[str, str], stage: str = "data") -> tuple[str, dict[str, str]]:
    """The one artifact of `stage` in a root's listing (`file_digests`): its directory, relative to
    the root, and {path in the artifact: sha256} of its files but the manifest (which holds run ids
    and times)."""
    (manifest,) = [name for name in listing if name.startswith(f"{stage}/") and name.endswith("/manifest.json")]
    directory = manifest.removesuffix("/manifest.json")
    files = {name[len(directory) + 1 :]: digest for name, digest in listing.items() if name.startswith(directory + "/")}
    del files["manifest.json"]
    return directory, files


def _run_cli(words: list[str]) -> dict:
    import fsspec

    from pipeline import cli

    for cls in {fsspec.AbstractFileSystem, *fsspec.registry.values()}:
        with contextlib.suppress(Exception):
            cls.clear_instance_cache()
    out, err = io.StringIO(), io.StringIO()
    start = time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(list(words))
        except Exception:  # noqa: BLE001 - what `pipeline.cli.entry` does
            traceback.print_exc()
            rc = 1
    return {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue(), "seconds": time.monotonic() - start}


def _step(step: dict) -> dict:
    if "run" in step:
        return _run_cli(step["run"])
    if "sh" in step:
        done = subprocess.run(step["sh"], shell=True, capture_output=True, text=True)
        return {"rc": done.returncode, "output": done.stdout + done.stderr}
    if "files" in step:
        return file_digests(step["files"])
    raise ValueError(f"unknown step {step}")


def serve() -> None:
    """The driver: one step per stdin line, one marked JSON reply per step on stdout."""
    reply_to = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    try:
        while select.select([sys.stdin], [], [], IDLE_SECONDS)[0]:
            line = sys.stdin.readline()
            if not line:
                break
            reply_to.write(MARK + json.dumps(_step(json.loads(line))) + "\n")
            reply_to.flush()
        else:
            reply_to.write(IDLE + "\n")
            reply_to.flush()
    finally:
        if "ray" in sys.modules:
            import ray

            ray.shutdown()


if __name__ == "__main__":
    serve()
