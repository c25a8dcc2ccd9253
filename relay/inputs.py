"""Strict parsing of request bodies: hostile bytes refused before any JSON parser runs,
then the decoded object validated by the request models of relay.wire."""

from __future__ import annotations

import json
import re
from typing import Any, NoReturn

from annotated_types import MaxLen
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from relay.errors import InvalidInput
from relay.wire import MessageRequest, request_models

__all__ = ["MAX_JSON_DEPTH", "MessageRequest", "parse_json_object", "parse_message_request"]

MAX_JSON_DEPTH = 32
#: The bytes that matter to nesting: quotes, backslashes and brackets.
_SIGNIFICANT = re.compile(rb'["\\\[\]{}]')
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPEN = frozenset(b"[{")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


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


def parse_message_request(
    data: dict[str, Any], *, allow_token: bool, max_message_chars: int
) -> MessageRequest:
    """Validate the fields of a quote (allow_token=False) or send request; ``message`` may
    be as long as the longest message MAX_SEGMENTS allows (Settings.max_message_chars)."""
    quote_model, send_model = request_models(max_message_chars)
    model: type[MessageRequest] = send_model if allow_token else quote_model
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _invalid(model, exc.errors(include_url=False)) from None


def _invalid(model: type[BaseModel], errors: list[ErrorDetails]) -> InvalidInput:
    """The first problem, as invalid_input with the field and reason clients branch on."""
    unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
    if unknown:
        return InvalidInput(
            f"Unknown field(s): {', '.join(unknown)}.",
            details={"fields": unknown, "reason": "unknown_field"},
        )
    return _field_problem(model, errors[0])


def _field_problem(model: type[BaseModel], error: ErrorDetails) -> InvalidInput:
    name, value = str(error["loc"][0]), error["input"]
    field = model.model_fields[name]
    if error["type"] == "missing" or (value is None and field.is_required()):
        return _field(name, "missing", f"'{name}' is required.")
    if error["type"] == "bool_type":
        return _field(name, "wrong_type", f"'{name}' must be true or false.")
    limit = next((m.max_length for m in field.metadata if isinstance(m, MaxLen)), None)
    if isinstance(value, str) and limit is not None and len(value) > limit:
        return _field(name, "too_long", f"'{name}' is longer than {limit} characters.")
    surrogate = _LONE_SURROGATE.search(value) if isinstance(value, str) else None
    if surrogate is not None:  # strings that cannot be UTF-8 (pydantic: string_unicode)
        codepoint = f"U+{ord(surrogate.group()):04X}"
        message = f"'{name}' contains an unpaired surrogate ({codepoint})."
        return _field(name, "lone_surrogate", message, position=surrogate.start())
    return _field(name, "wrong_type", f"'{name}' must be a string.")


def _field(name: str, reason: str, message: str, **more: Any) -> InvalidInput:
    return InvalidInput(message, details={"field": name, "reason": reason, **more})
