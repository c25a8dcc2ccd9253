import pytest

from relay.errors import InvalidInput
from relay.inputs import MessageRequest, parse_json_object, parse_message_request


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
        ({"message": "x" * 5001, "to": "+13012576365"}, "message", "too_long"),
        ({"message": "hi", "to": "+1", "smart_encoding": "yes"}, "smart_encoding", "wrong_type"),
    ],
)
def test_bad_fields(data: dict[str, object], field: str, reason: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_message_request(data, allow_token=True)
    assert info.value.details == {"field": field, "reason": reason}


def test_unknown_fields_are_named() -> None:
    with pytest.raises(InvalidInput) as info:
        parse_message_request({"message": "hi", "to": "+1", "extra": 1, "b": 2}, allow_token=True)
    assert info.value.details["fields"] == ["b", "extra"]


def test_quote_token_not_accepted_on_quote() -> None:
    with pytest.raises(InvalidInput):
        parse_message_request({"message": "hi", "to": "+1", "quote_token": "t"}, allow_token=False)


def test_good_request() -> None:
    data = {"message": "hi", "to": "+1", "quote_token": "t", "smart_encoding": True}
    assert parse_message_request(data, allow_token=True) == MessageRequest("hi", "+1", "t", True)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    raw = b'{"message": "' + b"[{" * 100 + b'\\"]", "to": "+1"}'
    assert parse_json_object(raw)["to"] == "+1"
