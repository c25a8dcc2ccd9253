"""A JSON-RPC forwarder in front of anvil that notes what each client asked.

Servers pointed at ``proxy.url`` reach the node through it unchanged (single calls and
batches, kept-alive connections); ``proxy.calls`` lists every call as (method, params), and
``proxy.broadcasts`` maps the hash of every transaction sent with ``eth_sendRawTransaction``
to the moment (``time.monotonic()``) the call first reached the proxy, which is when the
server broadcast it.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from eth_typing import HexStr
from web3 import Web3

from tests.http_thread import ServedInBackground

UPSTREAM_TIMEOUT = 60
NO_BATCHES = json.dumps(
    {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "batches not supported"}}
).encode()


class RpcProxy(ServedInBackground):
    """A threaded HTTP server on 127.0.0.1 forwarding POSTs to ``upstream``."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.broadcasts: dict[str, float] = {}
        self.calls: list[tuple[str, list[Any]]] = []
        #: HTTP requests received (a batch of calls is one).
        self.requests = 0
        #: While set, every request is answered 503, as by a node that is away.
        self.down = False
        #: The next this many requests are answered 503 (a blip).
        self.fail_next = 0
        #: Calls of these methods are answered ``null``, as by a node that lags behind.
        self.lagging: set[str] = set()
        #: While set, a batch of calls is refused, as by a node that takes none.
        self.refuses_batches = False
        #: Batch requests received.
        self.batches = 0
        #: TCP connections accepted from clients.
        self.connections = 0
        #: While set, a request without this Authorization header is answered 401.
        self.required_authorization: str | None = None
        #: While set, every request is answered 308 with this Location.
        self.moved_to: str | None = None
        #: The request target of each request ("/", or a whole URL when used as a proxy).
        self.targets: list[str] = []
        #: Called (once) when a raw transaction arrives, before it reaches the node: what
        #: someone else gets mined just ahead of it.
        self.before_broadcast: Callable[[], object] | None = None
        self._lock = threading.Lock()
        self._local = threading.local()
        self._connections: list[http.client.HTTPConnection] = []
        server = _Server(("127.0.0.1", 0), _Handler)
        server.proxy = self
        super().__init__(server)

    def forget(self) -> None:
        """Start counting afresh."""
        with self._lock:
            self.calls.clear()
            self.requests = 0

    def count(self, method: str) -> int:
        """How many calls of ``method`` reached the node so far."""
        with self._lock:
            return sum(1 for name, _ in self.calls if name == method)

    def note(self, body: bytes, arrived: float) -> None:
        """Record the calls and raw transactions of one request (a call or a batch)."""
        try:
            calls = json.loads(body)
        except ValueError:
            return
        with self._lock:
            self.requests += 1
            self.batches += isinstance(calls, list)
        for call in calls if isinstance(calls, list) else [calls]:
            if not isinstance(call, dict):
                continue
            with self._lock:
                self.calls.append((str(call.get("method")), list(call.get("params") or [])))
            if call.get("method") == "eth_sendRawTransaction":
                raw = str((call.get("params") or [""])[0])
                tx_hash = Web3.keccak(hexstr=HexStr(raw)).to_0x_hex()
                with self._lock:
                    self.broadcasts.setdefault(tx_hash, arrived)

    def failing(self) -> bool:
        """Whether this request is to be answered 503."""
        with self._lock:
            blip, self.fail_next = self.fail_next > 0, max(0, self.fail_next - 1)
        return self.down or blip

    def lag(self, body: bytes, answer: bytes) -> bytes:
        """The answer, or ``null`` for a single call of a lagging method."""
        try:
            call = json.loads(body)
        except ValueError:
            return answer
        if isinstance(call, dict) and call.get("method") in self.lagging:
            return json.dumps({"jsonrpc": "2.0", "id": call.get("id"), "result": None}).encode()
        return answer

    def forward(self, body: bytes) -> tuple[int, bytes]:
        """The node's answer to ``body``, over this thread's kept-alive connection."""
        for attempt in range(2):
            connection = self._connection(fresh=attempt > 0)
            try:
                connection.request("POST", "/", body, {"Content-Type": "application/json"})
                answer = connection.getresponse()
                return answer.status, answer.read()
            except (OSError, http.client.HTTPException):
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _connection(self, *, fresh: bool) -> http.client.HTTPConnection:
        connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        if connection is None or fresh:
            if connection is not None:
                connection.close()
            connection = http.client.HTTPConnection(*self.upstream, timeout=UPSTREAM_TIMEOUT)
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    def stopping(self) -> None:
        """Close the kept-alive connections to the node."""
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    #: Twenty payers at once open more connections than socketserver's backlog of 5: the
    #: connections beyond it would wait for TCP's one-second retry.
    request_queue_size = 128
    proxy: RpcProxy

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client closing its kept-alive connection is not an error here


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.proxy._lock:
            self.server.proxy.connections += 1

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        proxy = self.server.proxy
        with proxy._lock:
            proxy.targets.append(self.path)
        required = proxy.required_authorization
        if required is not None and self.headers.get("Authorization") != required:
            self._answer(401, b"{}")
            return
        if proxy.moved_to is not None:
            self._answer(308, b"", location=proxy.moved_to)
            return
        proxy.note(body, time.monotonic())
        if proxy.before_broadcast is not None and b"eth_sendRawTransaction" in body:
            ahead, proxy.before_broadcast = proxy.before_broadcast, None
            ahead()
        if proxy.refuses_batches and body.lstrip().startswith(b"["):
            status, answer = 200, NO_BATCHES
        else:
            status, answer = (503, b"{}") if proxy.failing() else proxy.forward(body)
            answer = proxy.lag(body, answer)
        self._answer(status, answer)

    def _answer(self, status: int, answer: bytes, location: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        if location is not None:
            self.send_header("Location", location)
        self.end_headers()
        self.wfile.write(answer)
