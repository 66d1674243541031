"""A Ray cluster of several nodes on this machine: `ray start --head` and `ray start --address`, each its
own process session, and per node an S3 endpoint of its own (a recording proxy in front of one S3
server) so that a test can tell which node read or wrote what.

Stopping never uses `ray stop` (it stops every Ray on the machine, other tests' too): it ends the
processes of the sessions this module started, and only those.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from cli import free_port

RAY = str(Path(sys.executable).parent / "ray")
NODE_SECONDS = 120
"""How long the nodes may take to start and join (minutes are possible on a loaded 2-core machine)."""


# ---------------------------------------------------------------------- one S3 endpoint per node
@dataclass
class S3Log:
    """Requests a proxy forwarded: (method, path without the query, status)."""

    requests: list[tuple[str, str, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def paths(self, method: str, prefix: str) -> list[str]:
        with self.lock:
            return [p for m, p, s in self.requests if m == method and p.startswith(prefix) and s < 300]


def _proxy_handler(upstream: tuple[str, int], log: S3Log) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = bytearray()
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return bytes(body)

        def _forward(self) -> None:
            body = self._read_body()
            skip = {"connection", "keep-alive", "transfer-encoding", "content-length"}
            headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
            headers["Content-Length"] = str(len(body))
            upstream_conn = http.client.HTTPConnection(*upstream, timeout=120)
            try:
                upstream_conn.request(self.command, self.path, body=body, headers=headers)
                response = upstream_conn.getresponse()
                payload = response.read()
                reply = [(k, v) for k, v in response.getheaders() if k.lower() not in skip]
                length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(payload))
            finally:
                upstream_conn.close()
            with log.lock:
                log.requests.append((self.command, unquote(urlsplit(self.path).path), response.status))
            self.send_response_only(response.status, response.reason)
            for key, value in reply:
                self.send_header(key, value)
            self.send_header("Content-Length", length or "0")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    return Handler


@contextmanager
def recording_proxy(upstream_endpoint: str) -> Iterator[tuple[str, S3Log]]:
    """An HTTP proxy on 127.0.0.1 in front of `upstream_endpoint`: yields (its endpoint, its log)."""
    target = urlsplit(upstream_endpoint)
    log = S3Log()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _proxy_handler((target.hostname, target.port), log))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="s3-node-proxy", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", log
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# ---------------------------------------------------------------------- Ray nodes
@dataclass(frozen=True)
class NodeSpec:
    label: str
    """A custom resource (1 unit) naming the node: how a test finds it in `ray.nodes()`."""
    num_cpus: int
    memory_gb: float
    """Ray's logical `memory` resource: stage actors that ask for more than a node has never go there."""
    env: dict[str, str] = field(default_factory=dict)
    """Added to the node's environment (its workers inherit it), e.g. its S3 endpoint."""


@dataclass
class LocalCluster:
    address: str
    """host:port of the head's GCS, for RAY_ADDRESS."""
    client_env: dict[str, str] = field(repr=False)
    """What a driver needs to connect (the cluster's auth token)."""
    nodes: dict[str, int] = field(default_factory=dict)
    """label -> pid of the node's `ray start --block` (its session id)."""
    temp_dirs: list[str] = field(default_factory=list)

    def logs(self) -> str:
        """The tail of every node's `ray start` output, for a failure message."""
        out = []
        for d in self.temp_dirs:
            path = Path(d) / "ray-start.log"
            if path.is_file():
                out.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(out)


def _node_command(spec: NodeSpec, temp_dir: str, head: bool, gcs_port: int) -> list[str]:
    command = [
        RAY,
        "start",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp_dir}",
        f"--num-cpus={spec.num_cpus}",
        f"--memory={int(spec.memory_gb * 2**30)}",
        f"--object-store-memory={200 * 2**20}",
        f"--resources={json.dumps({spec.label: 1})}",
        # ports with a fixed default get free ones: two nodes (and other tests' Ray) share this machine
        f"--dashboard-agent-listen-port={free_port()}",
        "--min-worker-port=0",
        "--max-worker-port=0",
        "--disable-usage-stats",
    ]
    if head:
        return [
            *command,
            "--head",
            f"--port={gcs_port}",
            f"--ray-client-server-port={free_port()}",
            "--include-dashboard=false",
            f"--dashboard-port={free_port()}",
        ]
    return [*command, f"--address=127.0.0.1:{gcs_port}", "--include-log-monitor=false"]


WAIT_FOR_NODES = """
import json, sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
deadline = time.monotonic() + float(sys.argv[3])
while sum(n["Alive"] for n in ray.nodes()) < int(sys.argv[2]) and time.monotonic() < deadline:
    time.sleep(0.5)
print(json.dumps([n for n in ray.nodes() if n["Alive"]], default=str))
"""


@contextmanager
def local_cluster(specs: list[NodeSpec], env: dict[str, str]) -> Iterator[LocalCluster]:
    """Start `specs[0]` as the head and the rest as nodes joining it; yields once all are alive."""
    token = secrets.token_hex(32)  # Ray's token auth, as `ray start --head` turns it on; no file in ~/.ray
    client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    gcs_port = free_port()
    cluster = LocalCluster(f"127.0.0.1:{gcs_port}", client_env)
    processes: list[subprocess.Popen] = []
    try:
        for i, spec in enumerate(specs):
            temp_dir = tempfile.mkdtemp(prefix="ray-mn-", dir="/tmp")  # short: Ray's socket paths have a limit
            cluster.temp_dirs.append(temp_dir)
            node_env = {**env, **client_env, "RAY_USAGE_STATS_ENABLED": "0", **spec.env}
            with open(Path(temp_dir) / "ray-start.log", "wb") as out:
                process = subprocess.Popen(
                    _node_command(spec, temp_dir, head=i == 0, gcs_port=gcs_port),
                    env=node_env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its processes (raylet, workers, ...) are this session
                    preexec_fn=_die_with_this_process,
                )
            processes.append(process)
            cluster.nodes[spec.label] = process.pid
            if i == 0:
                _wait_for_port(gcs_port, process, cluster)
        alive = subprocess.run(
            [sys.executable, "-c", WAIT_FOR_NODES, cluster.address, str(len(specs)), str(NODE_SECONDS)],
            env={**env, **client_env},
            capture_output=True,
            text=True,
            timeout=NODE_SECONDS + 60,
        )
        nodes = json.loads(alive.stdout.strip().splitlines()[-1]) if alive.returncode == 0 else []
        if len(nodes) < len(specs):
            raise RuntimeError(
                f"{len(nodes)} of {len(specs)} Ray nodes came up:\n{alive.stderr[-3000:]}\n{cluster.logs()}"
            )
        yield cluster
    finally:
        for process in reversed(processes):
            _end_session(process)
        for temp_dir in cluster.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _die_with_this_process() -> None:
    """In the child: SIGTERM when the test process dies, however it dies; `ray start --block` then ends,
    and its reaper takes the node's processes with it."""
    _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG; a C call only (resolved before the fork)


_PRCTL = ctypes.CDLL(None, use_errno=True).prctl


def _wait_for_port(port: int, process: subprocess.Popen, cluster: LocalCluster) -> None:
    import socket

    deadline = time.monotonic() + NODE_SECONDS
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if _exited(process):
            break
        time.sleep(0.2)
    raise RuntimeError(f"the Ray head did not open port {port}:\n{cluster.logs()}")


def _exited(process: subprocess.Popen) -> bool:
    """Without reaping it: while it is a zombie its pid, the session id, cannot be reused."""
    try:
        with open(f"/proc/{process.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def session_processes(session: int) -> list[int]:
    """Pids of the processes whose session id is `session` (one of ours: a `ray start` we began)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == session:
                    pids.append(int(entry))
            except OSError:  # gone meanwhile
                pass
    return pids


def _end_session(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM every process of the node's session, SIGKILL what is left after `grace`, reap `ray start`."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        pids = [p for p in session_processes(process.pid) if p != os.getpid()]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_running(p) for p in pids):
            time.sleep(0.2)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


@contextmanager
def nodes_with_own_s3_endpoints(s3_endpoint: str, specs: list[NodeSpec], env: dict[str, str]):
    """`local_cluster(specs)` where each node reaches S3 through a recording proxy of its own; yields
    (cluster, {label: S3Log})."""
    with ExitStack() as stack:
        logs, with_endpoints = {}, []
        for spec in specs:
            endpoint, logs[spec.label] = stack.enter_context(recording_proxy(s3_endpoint))
            node_env = {"AWS_ENDPOINT_URL": endpoint, "FSSPEC_S3_ENDPOINT_URL": endpoint}
            with_endpoints.append(NodeSpec(spec.label, spec.num_cpus, spec.memory_gb, {**spec.env, **node_env}))
        yield stack.enter_context(local_cluster(with_endpoints, env)), logs
