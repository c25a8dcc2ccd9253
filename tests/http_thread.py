"""A local HTTP server on a daemon thread: what every fake vendor (and the bench's RPC proxy)
is served by, started and stopped the same way."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer
from types import TracebackType
from typing import Self


class ServedInBackground:
    """Owns ``self._server`` (a ThreadingHTTPServer on 127.0.0.1); ``start()`` serves it on a
    daemon thread, ``stop()`` (or leaving the ``with`` block) shuts it down and frees the port,
    ``serve_forever()`` serves on the calling thread (the command-line mode)."""

    def __init__(self, server: ThreadingHTTPServer, poll_interval: float = 0.05) -> None:
        server.daemon_threads = True
        self._server = server
        self._poll_interval = poll_interval
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The TCP port actually bound."""
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        """Serve on a daemon thread."""
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(self._poll_interval,), daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Wake what is waiting (``stopping``), stop serving and release the port."""
        self.stopping()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def stopping(self) -> None:
        """Called first by stop(): a fake wakes its slow replies here."""

    def serve_forever(self) -> None:
        """Serve on this thread until interrupted, then release the port."""
        try:
            self._server.serve_forever(self._poll_interval)
        except KeyboardInterrupt:
            pass
        finally:
            self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
