"""Strict parsing of request bodies: JSON objects with known fields of the right types."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, NoReturn

from relay.errors import InvalidInput

MAX_TO_CHARS = 64
MAX_TOKEN_CHARS = 2048
MAX_JSON_DEPTH = 32
#: The bytes that matter to nesting: quotes, backslashes and brackets.
_SIGNIFICANT = re.compile(rb'["\\\[\]{}]')
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPEN = frozenset(b"[{")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


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
    """The deepest bracket nesting outside strings, in one linear pass that stops as soon as
    it passes MAX_JSON_DEPTH; checked before the C parser recurses."""
    depth = deepest = 0
    in_string = False
    escaped_at = -1  # the position a backslash inside a string escapes
    for match in _SIGNIFICANT.finditer(raw):
        position = match.start()
        if position == escaped_at:
            continue
        byte = raw[position]
        if in_string:
            if byte == _BACKSLASH:
                escaped_at = position + 1
            elif byte == _QUOTE:
                in_string = False
        elif byte == _QUOTE:
            in_string = True
        elif byte in _OPEN:
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_JSON_DEPTH:
                    return deepest
        elif byte != _BACKSLASH:
            depth -= 1
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
    surrogate = _LONE_SURROGATE.search(value)
    if surrogate is not None:
        _fail(
            f"'{name}' contains an unpaired surrogate (U+{ord(surrogate.group()):04X}).",
            field=name,
            reason="lone_surrogate",
            position=surrogate.start(),
        )
    return value


def parse_message_request(
    data: dict[str, Any], *, allow_token: bool, max_message_chars: int
) -> MessageRequest:
    """Validate the fields of a quote (allow_token=False) or send request; ``message`` may
    be as long as the longest message MAX_SEGMENTS allows (Settings.max_message_chars)."""
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
        message=_string(data, "message", max_message_chars, required=True) or "",
        to=_string(data, "to", MAX_TO_CHARS, required=True) or "",
        quote_token=_string(data, "quote_token", MAX_TOKEN_CHARS, required=False),
        smart_encoding=smart,
    )
