"""What a `relay doctor` check is: a probe of the settings that answers PASS, FAIL or SKIP
with a one-line detail, or raises Problem with a message safe to show as it is."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal
from urllib.parse import urlsplit

from relay.settings import Settings

#: Connect and read timeout of every chain, facilitator, Sinch and database request.
HTTP_TIMEOUT_SECONDS = 5.0

Status = Literal["PASS", "FAIL", "SKIP"]
Probe = Callable[[Settings], tuple[Status, str]]


class Problem(Exception):
    """Raised inside a check: a FAIL whose message is safe to show as it is."""


def origin(url: str) -> str:
    """scheme://host[:port] of a URL: paths and queries may hold keys, so they are not shown."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(unreadable URL)"
    return f"{parts.scheme}://{parts.hostname or ''}{port}"
