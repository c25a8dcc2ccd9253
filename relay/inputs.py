"""Strict parsing of request bodies: JSON objects with known fields of the right types."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, NoReturn

from relay.errors import InvalidInput

MAX_MESSAGE_CHARS = 5000
MAX_TO_CHARS = 64
MAX_TOKEN_CHARS = 2048
MAX_JSON_DEPTH = 32
_JSON_STRING = re.compile(rb'"(?:\\.|[^"\\])*"')
_BRACKETS = re.compile(rb"[\[\]{}]")


@dataclass(frozen=True)
class MessageRequest:
    """The body of /api/quote and /api/send."""

    message: str
    to: str
    quote_token: str | None = None
    smart_encoding: bool = False


def _fail(message: str, **details: Any) -> NoReturn:
    raise InvalidInput(message, details=details)


def _reject_constant(name: str) -> NoReturn:
    _fail(f"JSON constant {name} is not allowed.")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Decode a UTF-8 JSON object or raise invalid_input saying what is wrong."""
    if not raw.strip():
        _fail("The request body must be a JSON object.", reason="empty_body")
    if _nesting_depth(raw) > MAX_JSON_DEPTH:
        _fail("The request body is nested too deeply.", reason="too_deep")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        _fail("The request body must be UTF-8 encoded JSON.", reason="not_utf8")
    except (json.JSONDecodeError, RecursionError):
        _fail("The request body is not valid JSON.", reason="not_json")
    if not isinstance(data, dict):
        _fail("The request body must be a JSON object.", reason="not_an_object")
    return data


def _nesting_depth(raw: bytes) -> int:
    """The deepest bracket nesting outside strings; checked before the C parser recurses."""
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_JSON_STRING.sub(b"", raw)):
        depth += 1 if bracket in (b"[", b"{") else -1
        deepest = max(deepest, depth)
    return deepest


def _string(data: dict[str, Any], name: str, limit: int, *, required: bool) -> str | None:
    value = data.get(name)
    if value is None and not required:
        return None
    if value is None:
        _fail(f"'{name}' is required.", field=name, reason="missing")
    if not isinstance(value, str):
        _fail(f"'{name}' must be a string.", field=name, reason="wrong_type")
    if len(value) > limit:
        _fail(f"'{name}' is longer than {limit} characters.", field=name, reason="too_long")
    return value


def parse_message_request(data: dict[str, Any], *, allow_token: bool) -> MessageRequest:
    """Validate the fields of a quote (allow_token=False) or send request."""
    allowed = {"message", "to", "smart_encoding"} | ({"quote_token"} if allow_token else set())
    unknown = sorted(set(data) - allowed)
    if unknown:
        _fail(f"Unknown field(s): {', '.join(unknown)}.", fields=unknown, reason="unknown_field")
    smart = data.get("smart_encoding", False)
    if not isinstance(smart, bool):
        _fail(
            "'smart_encoding' must be true or false.", field="smart_encoding", reason="wrong_type"
        )
    return MessageRequest(
        message=_string(data, "message", MAX_MESSAGE_CHARS, required=True) or "",
        to=_string(data, "to", MAX_TO_CHARS, required=True) or "",
        quote_token=_string(data, "quote_token", MAX_TOKEN_CHARS, required=False),
        smart_encoding=smart,
    )
