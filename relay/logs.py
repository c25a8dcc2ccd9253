"""Logs without secrets: any record may quote a URL with a key or an exception naming one
(the access log, which carries SINCH_CALLBACK_SECRET in the callback path, is masked by
``relay.access_log``)."""

from __future__ import annotations

import json
import logging
import re
import secrets
import sys
import threading
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from contextvars import ContextVar, Token
from typing import Any


class _ScrubbedRecord(logging.LogRecord):
    """A log record whose message and traceback show every hidden value as ***."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.exc_info and _hidden:
            self.exc_text = scrub(logging.Formatter().formatException(self.exc_info))

    def getMessage(self) -> str:
        """The formatted message, scrubbed."""
        return scrub(super().getMessage())


_hidden: tuple[str, ...] = ()
_hidden_lock = threading.Lock()


def hide_in_logs(values: Iterable[str]) -> None:
    """From now on every log record of this process, from any library, shows these values
    (keys, tokens, credentials in URLs) as ***."""
    global _hidden
    with _hidden_lock:
        merged = set(_hidden) | {value for value in values if len(value) >= 6}
        _hidden = tuple(sorted(merged, key=len, reverse=True))
        if logging.getLogRecordFactory() is not _ScrubbedRecord:
            logging.setLogRecordFactory(_ScrubbedRecord)


def scrub(text: str) -> str:
    """``text`` with every hidden value replaced by ***."""
    for value in _hidden:
        if value in text:
            text = text.replace(value, "***")
    return text


# Configuration ------------------------------------------------------------------------
#
# Every way of running the relay (`relay serve`, the Procfile's gunicorn line, `relay
# worker`, an operator's own WSGI server) logs through one handler on the root logger, so
# the relay's lines and the libraries' (the x402 SDK's, web3's) share one format.

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


#: A request id a client or proxy sends is kept if it looks like one; otherwise one is made.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_request_id: ContextVar[str] = ContextVar("relay_request_id", default="-")


def request_id_of(sent: str) -> str:
    """X-Request-Id as sent (by a proxy or a client) when it looks like one, or a new one."""
    return sent if _REQUEST_ID.fullmatch(sent) else secrets.token_hex(16)


def serving(request_id: str) -> AbstractContextManager[None]:
    """Every log line within the block carries ``request_id``."""
    return _Serving(request_id)


class _Serving(AbstractContextManager[None]):
    """serving()'s block (a class: it is entered for every request)."""

    def __init__(self, request_id: str) -> None:
        self._request_id = request_id
        self._token: Token[str] | None = None

    def __enter__(self) -> None:
        self._token = _request_id.set(self._request_id)

    def __exit__(self, *_: object) -> None:
        if self._token is not None:
            _request_id.reset(self._token)


class _RequestId(logging.Filter):
    """Adds the id of the HTTP request being served (or "-") to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, request id, traceback."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        if record.exc_info:
            line["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class _RelayHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler `configure_logging` installs (recognised so it is installed once)."""


def configure_logging(level: str, fmt: str, *, force: bool = False) -> None:
    """Send every record at ``level`` or above to stderr, as text or JSON lines.

    Without ``force``, a process whose logging someone else already set up (a test runner,
    an embedding application) is left alone.
    """
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, _RelayHandler)]
    if root.handlers and not ours and not force:
        return
    handler = ours[0] if ours else _RelayHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    if not ours:
        handler.addFilter(_RequestId())
        root.addHandler(handler)
    root.setLevel(level)
