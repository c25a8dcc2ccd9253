import json
import time

import pytest

from relay.errors import InvalidInput
from relay.inputs import MAX_JSON_DEPTH, parse_json_object, parse_message_request
from relay.settings import Settings

CHARS = Settings().max_message_chars  # ten segments by default: 1600
KIB_64 = 64 * 1024


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "empty_body"),
        (b"   ", "empty_body"),
        (b"not json", "not_json"),
        (b"[1, 2]", "not_an_object"),
        (b'"text"', "not_an_object"),
        (b"\xff\xfe{}", "not_utf8"),
        (b'{"a": NaN}', None),
        (b"[" * 100_000, "too_deep"),
        (b'{"a": ' * 40 + b"1" + b"}" * 40, "too_deep"),
    ],
)
def test_bad_bodies(raw: bytes, reason: str | None) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_json_object(raw)
    if reason:
        assert info.value.details["reason"] == reason


@pytest.mark.parametrize(
    ("data", "field", "reason"),
    [
        ({"to": "+13012576365"}, "message", "missing"),
        ({"message": "hi"}, "to", "missing"),
        ({"message": 5, "to": "+13012576365"}, "message", "wrong_type"),
        ({"message": "hi", "to": ["+1"]}, "to", "wrong_type"),
        ({"message": "hi", "to": "1" * 65}, "to", "too_long"),
        ({"message": "x" * (CHARS + 1), "to": "+13012576365"}, "message", "too_long"),
        ({"message": "bad \ud800 half", "to": "+13012576365"}, "message", "lone_surrogate"),
        ({"message": "hi", "to": "+1\udfff"}, "to", "lone_surrogate"),
        ({"message": "hi", "to": "+1", "quote_token": "t\ud83d"}, "quote_token", "lone_surrogate"),
        ({"message": "hi", "to": "+1", "smart_encoding": "yes"}, "smart_encoding", "wrong_type"),
    ],
)
def test_bad_fields(data: dict[str, object], field: str, reason: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_message_request(data, allow_token=True, max_message_chars=CHARS)
    details = dict(info.value.details)
    details.pop("position", None)
    assert details == {"field": field, "reason": reason}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"to": "+1"}, "'message' is required."),
        ({"message": None, "to": "+1"}, "'message' is required."),
        ({"message": "hi", "to": 1}, "'to' must be a string."),
        ({"message": "hi", "to": "1" * 65}, "'to' is longer than 64 characters."),
        (
            {"message": "x" * CHARS + "\ud800", "to": "+1"},
            "'message' is longer than 1600 characters.",
        ),
        ({"message": "a\ud800", "to": "+1"}, "'message' contains an unpaired surrogate (U+D800)."),
        ({"message": "hi", "to": "+1", "quote_token": 7}, "'quote_token' must be a string."),
        (
            {"message": "hi", "to": "+1", "smart_encoding": None},
            "'smart_encoding' must be true or false.",
        ),
        (
            {"message": "hi", "to": "+1", "smart_encoding": 1},
            "'smart_encoding' must be true or false.",
        ),
    ],
)
def test_messages_say_what_is_wrong(data: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_message_request(data, allow_token=True, max_message_chars=CHARS)
    assert info.value.message == message


def test_a_null_quote_token_is_no_token() -> None:
    data = {"message": "hi", "to": "+1", "quote_token": None}
    assert (
        parse_message_request(data, allow_token=True, max_message_chars=CHARS).quote_token is None
    )


def test_the_message_bound_follows_the_setting() -> None:
    data = {"message": "x" * 200, "to": "+1"}
    assert (
        parse_message_request(data, allow_token=False, max_message_chars=200).message == "x" * 200
    )
    with pytest.raises(InvalidInput) as info:
        parse_message_request(data, allow_token=False, max_message_chars=199)
    assert info.value.details == {"field": "message", "reason": "too_long"}


def test_unknown_fields_are_named() -> None:
    with pytest.raises(InvalidInput) as info:
        parse_message_request(
            {"message": "hi", "to": "+1", "extra": 1, "b": 2},
            allow_token=True,
            max_message_chars=CHARS,
        )
    assert info.value.details["fields"] == ["b", "extra"]


@pytest.mark.parametrize("token", ["t", None])
def test_quote_token_not_accepted_on_quote(token: str | None) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_message_request(
            {"message": "hi", "to": "+1", "quote_token": token},
            allow_token=False,
            max_message_chars=CHARS,
        )
    assert info.value.details == {"fields": ["quote_token"], "reason": "unknown_field"}


def test_good_request() -> None:
    data = {"message": "hi", "to": "+1", "quote_token": "t", "smart_encoding": True}
    request = parse_message_request(data, allow_token=True, max_message_chars=CHARS)
    assert request.model_dump(exclude_none=True) == data
    quote = parse_message_request(
        {"message": "hi", "to": "+1"}, allow_token=False, max_message_chars=CHARS
    )
    assert (quote.message, quote.to, quote.quote_token) == ("hi", "+1", None)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    raw = b'{"message": "' + b"[{" * 100 + b'\\"]", "to": "+1"}'
    assert parse_json_object(raw)["to"] == "+1"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a": "' + b'\\"' * (KIB_64 // 2),  # an unterminated string of escaped quotes
        b'{"a": "' + b"\\\\" * (KIB_64 // 2) + b'"}',  # escaped backslashes
        b'{"a": ' + b'"\\"' * (KIB_64 // 3),  # quote, backslash, quote...
        b'{"a": "' + b"[{" * (KIB_64 // 2) + b'"}',  # brackets inside a string
        b"[" * KIB_64,  # brackets
        b"[]" * (KIB_64 // 2),
    ],
)
def test_worst_case_bodies_are_scanned_in_one_pass(raw: bytes) -> None:
    """64 KiB of the inputs that made the old backtracking pre-scan quadratic (16 s of CPU
    for the first) are rejected or parsed at once: a guard against a frozen worker, far
    above the milliseconds the scan takes (bench/json_scan.py measures it)."""
    started = time.process_time()
    try:
        parse_json_object(raw)
    except InvalidInput as error:
        assert error.details["reason"] in ("not_json", "too_deep", "not_an_object")
    assert time.process_time() - started < 2.0


def test_depth_counts_brackets_outside_strings_only() -> None:
    text = "[" * 100 + '\\" [[[ \\\\'
    assert parse_json_object(json.dumps({"a": text}).encode()) == {"a": text}
    nested: object = []
    for _ in range(MAX_JSON_DEPTH - 2):
        nested = [nested]
    assert parse_json_object(json.dumps({"a": nested}).encode()) == {"a": nested}
    deeper = json.dumps({"a": [nested, [[[[]]]]]}).encode()
    with pytest.raises(InvalidInput) as info:
        parse_json_object(deeper)
    assert info.value.details["reason"] == "too_deep"
