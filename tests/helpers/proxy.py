"""A fault-injecting HTTP proxy on 127.0.0.1, in front of the local S3/GCS servers.

The client is pointed at the proxy's endpoint instead of the server's. Every request gets its own
upstream connection, and the proxy asks both sides to close after it (``Connection: close``), so
one TCP connection carries exactly one request and "the Nth request" is well defined. Faults are
rules, matched in order against each request's method and path:

    with FaultProxy(server.endpoint) as proxy:
        proxy.add(Fault("status", method="GET", skip=2, times=1, status=503))
        fs = s3fs.S3FileSystem(endpoint_url=proxy.endpoint, ...)

Kinds: ``drop`` closes the connection as soon as the request has arrived (no response at all);
``stall`` holds it open without answering for ``stall_s``, then closes; ``truncate`` forwards the
request and relays only the first ``truncate_bytes`` of the response before closing; ``status``
answers with ``status`` (503, 500, ...) itself; ``unranged`` forwards the request without its
``Range`` header, so the server sends the whole object (as one that ignores ranges would).
``skip`` lets that many matching requests pass first; ``times`` bounds how many it hits (None:
every one after, a persistent fault).
Nothing here listens anywhere but 127.0.0.1.
"""

from __future__ import annotations

import re
import socket
import threading
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from tests.helpers.servers import HOST

_HEAD_END = b"\r\n\r\n"
_MAX_HEAD_BYTES = 64 * 1024
_IO_TIMEOUT_S = 30.0


@dataclass
class Fault:
    """One rule: what to do to which requests (see the module docstring)."""

    kind: str  # "drop" | "stall" | "truncate" | "status" | "unranged"
    method: str | None = None
    path: str | None = None  # a regular expression searched in the request target
    min_range_bytes: int = 0  # only ranged reads (``Range: bytes=a-b``) at least this long
    skip: int = 0
    times: int | None = 1
    status: int = 503
    stall_s: float = 5.0
    truncate_bytes: int = 200
    seen: int = field(default=0, init=False)
    hits: int = field(default=0, init=False)

    def matches(self, method: str, target: str, range_bytes: int) -> bool:
        """True for a request this rule is about (whether or not it fires)."""
        return (
            (self.method is None or self.method == method)
            and (self.path is None or re.search(self.path, target) is not None)
            and range_bytes >= self.min_range_bytes
        )


class FaultProxy:
    """A threaded HTTP/1.1 proxy that forwards to ``upstream`` unless a fault rule fires."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or HOST, parts.port or 80)
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server((HOST, 0))
        self._listener.settimeout(0.2)
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        # (method, target, bytes its Range header asks for or 0, what happened)
        self.requests: list[tuple[str, str, int, str]] = []
        self.endpoint = f"http://{HOST}:{self._listener.getsockname()[1]}"

    def add(self, fault: Fault) -> Fault:
        """Append a rule (rules are tried in the order added); return it, to read its hits."""
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        """Forward everything from now on."""
        with self._lock:
            self._faults.clear()

    def __enter__(self) -> FaultProxy:
        acceptor = threading.Thread(target=self._accept, name="fault-proxy", daemon=True)
        acceptor.start()
        self._threads.append(acceptor)
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        for thread in list(self._threads):
            thread.join(_IO_TIMEOUT_S)
        self._listener.close()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            worker = threading.Thread(target=self._serve, args=(client,), daemon=True)
            worker.start()
            self._threads.append(worker)

    def _pick(self, method: str, target: str, range_bytes: int) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if not fault.matches(method, target, range_bytes):
                    continue
                fault.seen += 1
                if fault.seen > fault.skip and (fault.times is None or fault.hits < fault.times):
                    fault.hits += 1
                    return fault
        return None

    def _serve(self, client: socket.socket) -> None:
        with client:
            client.settimeout(_IO_TIMEOUT_S)
            try:
                head, body = _read_request(client)
            except OSError:
                return
            if not head:
                return
            method, target = head.split(b" ", 2)[:2]
            range_bytes = _range_bytes(head)
            fault = self._pick(method.decode(), target.decode(), range_bytes)
            what = fault.kind if fault else "forwarded"
            self.requests.append((method.decode(), target.decode(), range_bytes, what))
            if fault is None or fault.kind == "truncate":
                limit = fault.truncate_bytes if fault else None
                self._forward(client, _close_after(head), body, limit)
            elif fault.kind == "unranged":
                self._forward(client, _close_after(head, drop=(b"range:",)), body, None)
            elif fault.kind == "status":
                reason = b"Service Unavailable" if fault.status == 503 else b"Error"
                # an answer to HEAD has headers only (a body there is a protocol error)
                payload = b"" if method == b"HEAD" else b"injected"
                client.sendall(
                    b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: 8\r\n"
                    b"Connection: close\r\n\r\n%s" % (fault.status, reason, payload)
                )
            elif fault.kind == "stall":
                self._closing.wait(fault.stall_s)
            # "drop": close without a word

    def _forward(self, client: socket.socket, head: bytes, body: bytes, limit: int | None) -> None:
        try:
            upstream = socket.create_connection(self._upstream, timeout=_IO_TIMEOUT_S)
        except OSError:
            return
        with upstream:
            try:
                upstream.sendall(head + body)
                sent = 0
                while limit is None or sent < limit:
                    data = upstream.recv(1 << 16)
                    if not data:
                        break
                    if limit is not None:
                        data = data[: limit - sent]
                    client.sendall(data)
                    sent += len(data)
            except OSError:
                return


def _read_request(client: socket.socket) -> tuple[bytes, bytes]:
    """The request head (through the blank line) and its body (by Content-Length)."""
    data = b""
    while _HEAD_END not in data:
        chunk = client.recv(1 << 16)
        if not chunk:
            return b"", b""
        data += chunk
        if len(data) > _MAX_HEAD_BYTES and _HEAD_END not in data:
            return b"", b""
    head, _, first = data.partition(_HEAD_END)
    length = int(_header(head, b"content-length") or 0)
    if _header(head, b"transfer-encoding"):
        raise OSError("chunked request bodies are not supported by this proxy")
    if (_header(head, b"expect") or b"").lower() == b"100-continue" and len(first) < length:
        client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")  # botocore waits for it on uploads
    body = bytearray(first)
    while len(body) < length:
        chunk = client.recv(min(1 << 20, length - len(body)))
        if not chunk:
            break
        body += chunk
    return head + _HEAD_END, bytes(body)


def _header(head: bytes, wanted: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == wanted:
            return value.strip()
    return None


def _range_bytes(head: bytes) -> int:
    """The length a ``Range: bytes=a-b`` header asks for (0 without one)."""
    match = re.fullmatch(rb"bytes=(\d+)-(\d+)", _header(head, b"range") or b"")
    return int(match[2]) - int(match[1]) + 1 if match else 0


def _close_after(head: bytes, drop: tuple[bytes, ...] = ()) -> bytes:
    """Rewrite the request head so that the server closes the connection after answering.

    ``drop``: more headers to leave out (lower-case names with their colon).
    """
    dropped = (b"connection:", b"keep-alive:", b"expect:", *drop)
    lines = [
        line
        for line in head[: -len(_HEAD_END)].split(b"\r\n")
        if not line.lower().startswith(dropped)
    ]
    return b"\r\n".join([*lines, b"Connection: close"]) + _HEAD_END
