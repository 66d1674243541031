"""An HTTP reverse proxy in front of an S3 server (moto_server in tests) that injects S3 faults.

Every request is forwarded unless the policy answers it instead with an S3 XML error:

- `fail_every=k`: every k-th request (of `fail_methods`, counted in arrival order) gets a 503
  SlowDown or a 500 InternalError, alternately. The server never sees it, as when S3's front end
  throttles. Deterministic: the same request sequence gets the same faults.
- `revoke_after_puts=n`: once n PUTs have been forwarded and answered 2xx, the credentials are
  "revoked": from then on every request gets a 403 InvalidAccessKeyId, until `reset()`.
  `revoke()` flips the switch at once.

It counts what it did (`stats()`): requests, forwarded, faults injected, and for the 5xx faults how
many were followed by a successful retry of the same request (same method and path) and how many
never were (`lost`).
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
ERRORS = {
    503: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    403: ("InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records."),
}


class FaultPolicy:
    """What the proxy does to each request; thread-safe, changeable while the proxy runs."""

    def __init__(
        self,
        fail_every: int = 0,
        fail_methods: tuple[str, ...] = ("GET", "HEAD", "PUT", "POST", "DELETE"),
        revoke_after_puts: int | None = None,
    ) -> None:
        self.fail_every, self.fail_methods, self.revoke_after_puts = fail_every, fail_methods, revoke_after_puts
        self.revoked = False
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.pending: Counter[tuple[str, str]] = Counter()
        """5xx faults not yet followed by a successful retry, per (method, path)."""
        self.faulted: list[tuple[str, str]] = []
        """(method, path) of every 5xx fault injected, in order."""

    def revoke(self) -> None:
        with self.lock:
            self.revoked = True

    def reset(self, fail_every: int = 0, revoke_after_puts: int | None = None) -> None:
        """Credentials valid, a new fault schedule, the counts back to zero."""
        with self.lock:
            self.fail_every, self.revoke_after_puts, self.revoked = fail_every, revoke_after_puts, False
            self.counts.clear()
            self.pending.clear()
            self.faulted.clear()

    def decide(self, method: str, path: str) -> int | None:
        """The status of the error to answer with, or None to forward."""
        with self.lock:
            self.counts["requests"] += 1
            if self.revoked:
                self.counts["denied"] += 1
                return 403
            if self.fail_every and method in self.fail_methods:
                self.counts["eligible"] += 1
                if self.counts["eligible"] % self.fail_every == 0:
                    status = 503 if self.counts["injected"] % 2 == 0 else 500
                    self.counts["injected"] += 1
                    self.counts[f"injected_{status}"] += 1
                    self.pending[(method, path)] += 1
                    self.faulted.append((method, path))
                    return status
            return None

    def forwarded(self, method: str, path: str, status: int) -> None:
        with self.lock:
            self.counts["forwarded"] += 1
            if status < 500 and self.pending[(method, path)]:
                self.counts["retries_survived"] += self.pending.pop((method, path))
            if method == "PUT" and 200 <= status < 300:
                self.counts["puts_ok"] += 1
                if self.revoke_after_puts is not None and self.counts["puts_ok"] >= self.revoke_after_puts:
                    self.revoked, self.revoke_after_puts = True, None
                    self.counts["revoked_after_puts"] = self.counts["puts_ok"]

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {**self.counts, "lost": sum(self.pending.values())}


def _error_body(status: int, path: str) -> bytes:
    code, message = ERRORS[status]
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{path}</Resource><RequestId>FAULTY-PROXY</RequestId></Error>"
    ).encode()


def _handler(upstream: tuple[str, int], policy: FaultPolicy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

        def log_message(self, *args) -> None:  # quiet
            pass

        def _body(self) -> tuple[bytes, bool]:
            """The request body, raw; True when it was chunked (forwarded chunked, unchanged)."""
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                raw = bytearray()
                while True:
                    line = self.rfile.readline()
                    raw += line
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while True:  # trailers, then the empty line
                            trailer = self.rfile.readline()
                            raw += trailer
                            if trailer in (b"\r\n", b"\n", b""):
                                return bytes(raw), True
                    raw += self.rfile.read(size + 2)
            length = int(self.headers.get("Content-Length") or 0)
            return (self.rfile.read(length) if length else b""), False

        def _handle(self) -> None:
            body, chunked = self._body()
            method, path = self.command, self.path
            status = policy.decide(method, path)
            if status is not None:
                payload = _error_body(status, urlsplit(path).path)
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(payload)
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            if chunked:
                headers["Transfer-Encoding"] = "chunked"
            connection = http.client.HTTPConnection(*upstream, timeout=60)
            try:
                connection.request(method, path, body=body or None, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                reply = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
            finally:
                connection.close()
            policy.forwarded(method, path, response.status)
            self.send_response_only(response.status, response.reason)
            for key, value in reply:
                if key.lower() != "content-length" or method == "HEAD":
                    self.send_header(key, value)
            if method != "HEAD":
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(payload)

        def _answer(self) -> None:
            try:
                self._handle()
            except (BrokenPipeError, ConnectionResetError):  # the client gave up on this request
                self.close_connection = True

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _answer

    return Handler


@contextmanager
def faulty_proxy(upstream_endpoint: str, policy: FaultPolicy) -> Iterator[str]:
    """Serve the proxy on 127.0.0.1 (a free port) in a thread; yields its endpoint URL."""
    target = urlsplit(upstream_endpoint)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler((target.hostname, target.port), policy))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="faulty-s3-proxy", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
