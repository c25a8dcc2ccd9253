"""Hypothesis over the pure modules with the text an attacker would send: lone surrogates,
control characters, combining marks and emoji sequences, huge numbers. Every input either
works or raises our InvalidInput family; nothing else escapes."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.errors import RelayError
from relay.inputs import parse_json_object, parse_message_request
from relay.phone import mask, normalize_destination
from relay.quote_tokens import message_sha256
from relay.segments import count_segments, smart_encode, split_segments, validate_text

#: Anything a JSON string can hold, weighted towards the awkward: surrogates (lone halves),
#: C0/C1 controls, combining marks, zero-width joiners, emoji and flag sequences.
AWKWARD = st.one_of(
    st.characters(codec=None),
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
    st.characters(min_codepoint=0, max_codepoint=0x1F),
    st.characters(min_codepoint=0x7F, max_codepoint=0x9F),
    st.sampled_from(["\u0301", "\u200d", "\ufe0f", "👩", "👧", "🇺", "🇸", "€", "^", "{", "\\"]),
)
TEXTS = st.text(alphabet=AWKWARD, max_size=400)
NUMBERS = st.one_of(
    st.text(alphabet=st.sampled_from("+0123456789 ()-.x#*"), max_size=40),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    TEXTS,
)
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(TEXTS)
def test_texts_are_valid_or_refused_and_then_counted_consistently(text: str) -> None:
    try:
        validate_text(text)
    except RelayError as error:
        assert error.status == 400
        return
    info = count_segments(text)
    parts = split_segments(text, info.encoding)
    assert "".join(parts) == text
    assert len(parts) == info.segments
    assert message_sha256(text)  # every valid text can be hashed (no lone surrogate)
    encoded = smart_encode(text)
    assert count_segments(encoded).segments <= info.segments or encoded == text


@PROPERTY
@given(NUMBERS)
def test_numbers_normalise_or_are_refused_and_masks_never_show_them_whole(raw: str) -> None:
    try:
        e164 = normalize_destination(raw)
    except RelayError as error:
        assert error.status in (400, 422)
        return
    assert e164.startswith("+") and e164[1:].isdigit()
    shown = mask(e164)
    assert e164 not in shown and "*" in shown


@PROPERTY
@given(
    st.dictionaries(
        st.sampled_from(["message", "to", "quote_token", "smart_encoding", "extra"]),
        st.one_of(TEXTS, st.booleans(), st.integers(), st.none(), st.lists(st.integers())),
    )
)
def test_request_fields_parse_or_are_refused(data: dict[str, object]) -> None:
    try:
        request = parse_message_request(data, allow_token=True, max_message_chars=1600)
    except RelayError as error:
        assert error.status == 400
        return
    for value in (request.message, request.to, request.quote_token or ""):
        value.encode("utf-8")  # no lone surrogate gets through


@PROPERTY
@given(st.binary(max_size=2000) | TEXTS.map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_any_body_parses_or_is_refused(raw: bytes) -> None:
    try:
        parsed = parse_json_object(raw)
    except RelayError as error:
        assert error.status == 400
        return
    assert isinstance(parsed, dict)


@pytest.mark.parametrize("depth", [31, 32, 33, 1000])
def test_depth_at_the_edge(depth: int) -> None:
    raw = b'{"a":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"
    if depth <= 32:
        assert "a" in parse_json_object(raw)
    else:
        with pytest.raises(RelayError):
            parse_json_object(raw)
