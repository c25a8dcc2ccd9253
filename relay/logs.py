"""Logs without secrets: the Sinch callback path carries SINCH_CALLBACK_SECRET in access
logs, and any record may quote a URL with a key or an exception naming one."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable
from typing import Any

from gunicorn.glogging import Logger

_CALLBACK = re.compile(r"(/webhooks/sinch/)[^/?\s]+")


def mask_path(text: str) -> str:
    """Replace the callback secret in a path or request line with ***."""
    return _CALLBACK.sub(r"\1***", text)


class MaskedAccessLogger(Logger):  # type: ignore[misc]
    """gunicorn's logger, with the webhook secret masked in every access-log atom."""

    def atoms(self, resp: Any, req: Any, environ: Any, request_time: Any) -> dict[str, Any]:
        """The access-log fields, masked."""
        atoms: dict[str, Any] = super().atoms(resp, req, environ, request_time)
        for key in ("r", "U"):
            if isinstance(atoms.get(key), str):
                atoms[key] = mask_path(atoms[key])
        return atoms


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
