"""Tests for relay.segments: validation, segment counting (SPEC §6) and smart encoding."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.errors import InvalidInput
from relay.segments import (
    GSM7_BASIC,
    GSM7_CHARSET,
    GSM7_EXTENSION,
    MULTI_SEGMENT_UNITS,
    SINGLE_SEGMENT_UNITS,
    SMART_ENCODING,
    Encoding,
    SegmentInfo,
    count_segments,
    count_units,
    detect_encoding,
    smart_encode,
    split_segments,
    validate_text,
)

CYR = "ж"  # one UTF-16 unit, not GSM-7
EMOJI = "😀"  # two UTF-16 units (a surrogate pair)
FAMILY = "👨\u200d👩\u200d👧\u200d👦"  # one grapheme cluster, 11 UTF-16 units
FLAG = "🇺🇸"  # one grapheme cluster, 4 UTF-16 units


def test_gsm_tables_match_gsm_03_38() -> None:
    assert len(GSM7_BASIC) == 127  # 128 code points minus the escape
    assert frozenset("\f^{}\\[~]|€") == GSM7_EXTENSION
    assert not GSM7_BASIC & GSM7_EXTENSION


@pytest.mark.parametrize(
    ("text", "encoding", "segments", "units"),
    [
        ("", "GSM-7", 0, 0),
        ("Hello", "GSM-7", 1, 5),
        ("a" * 160, "GSM-7", 1, 160),
        ("a" * 161, "GSM-7", 2, 161),
        ("a" * 306, "GSM-7", 2, 306),
        ("a" * 307, "GSM-7", 3, 307),
        ("€" * 80, "GSM-7", 1, 160),
        ("a" * 159 + "€", "GSM-7", 2, 161),
        ("^{}\\[~]|€\f", "GSM-7", 1, 20),
        ("a\r\nb", "GSM-7", 1, 4),
        ("@£$¥èéùìòÇØøÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ¤¡ÄÖÑÜ§¿äöñüà", "GSM-7", 1, 42),
        ("ç", "UCS-2", 1, 1),
        ("Hello `", "UCS-2", 1, 7),
        (CYR * 70, "UCS-2", 1, 70),
        (CYR * 71, "UCS-2", 2, 71),
        (CYR * 134, "UCS-2", 2, 134),
        (CYR * 135, "UCS-2", 3, 135),
        (EMOJI * 35, "UCS-2", 1, 70),
        (EMOJI * 36, "UCS-2", 2, 72),
        ("a" * 159 + EMOJI, "UCS-2", 3, 161),
        (FAMILY, "UCS-2", 1, 11),
        (FLAG * 2, "UCS-2", 1, 8),
        ("Your order has shipped — track at example.com/t/123", "UCS-2", 1, 51),
    ],
)
def test_count_segments(text: str, encoding: Encoding, segments: int, units: int) -> None:
    assert count_segments(text) == SegmentInfo(encoding, segments)
    assert count_units(text, encoding) == units
    assert "".join(split_segments(text, encoding)) == text


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        # GSM-7 greedy fill: 153 septets, then the rest.
        ("a" * 161, ("a" * 153, "a" * 8)),
        # An escape pair never straddles a boundary: "€" would be septets 153-154.
        ("a" * 152 + "€" + "a" * 10, ("a" * 152, "€" + "a" * 10)),
        # ... which costs a segment that ceil(306 / 153) = 2 would not predict.
        ("a" * 152 + "€" + "a" * 152, ("a" * 152, "€" + "a" * 151, "a")),
        # A surrogate pair never straddles a boundary: the emoji would be units 67-68.
        (CYR * 66 + EMOJI * 3, (CYR * 66, EMOJI * 3)),
        # A ZWJ family (11 units) stays whole: 60 + 11 > 67.
        (CYR * 60 + FAMILY, (CYR * 60, FAMILY)),
        # A flag (two regional indicators, 4 units) stays whole: 65 + 4 > 67.
        (CYR * 65 + FLAG + CYR * 2, (CYR * 65, FLAG + CYR * 2)),
        # UCS-2 greedy fill: 67 units, then the rest.
        (CYR * 135, (CYR * 67, CYR * 67, CYR)),
        # CR LF may be split, as in the Twilio calculator (it is two GSM characters).
        ("a" * 152 + "\r\n" + "a" * 10, ("a" * 152 + "\r", "\n" + "a" * 10)),
    ],
)
def test_split_never_cuts_an_indivisible_piece(text: str, parts: tuple[str, ...]) -> None:
    info = count_segments(text)
    assert split_segments(text, info.encoding) == parts
    assert info.segments == len(parts)


def test_oversized_cluster_is_split_between_code_points() -> None:
    text = "a" + "\u0301" * 100  # one grapheme cluster of 101 units
    assert count_segments(text) == SegmentInfo("UCS-2", 2)
    assert count_units(text, "UCS-2") == 101
    assert split_segments(text, "UCS-2") == ("a" + "\u0301" * 66, "\u0301" * 34)


def test_segment_info_is_frozen() -> None:
    info = count_segments("hi")
    assert info == SegmentInfo("GSM-7", 1)
    with pytest.raises(AttributeError):
        info.segments = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "encoding", "units"),
    [
        ("a€", "GSM-7", 3),
        ("a€", "UCS-2", 2),
        ("\f", "GSM-7", 2),
        ("\f", "UCS-2", 1),
        (EMOJI, "UCS-2", 2),
        (FAMILY, "UCS-2", 11),
        ("e\u0301", "UCS-2", 2),
    ],
)
def test_count_units(text: str, encoding: Encoding, units: int) -> None:
    assert count_units(text, encoding) == units


# --- validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["ok", "a\nb", "a\r\nb", "page\fbreak", "€uro", EMOJI, FAMILY, "\u0085 C1 is allowed"],
)
def test_validate_text_accepts(text: str) -> None:
    validate_text(text)


@pytest.mark.parametrize("text", ["", " ", "\n\r\n", "\u00a0\u3000"])
def test_validate_text_rejects_empty(text: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_text(text)
    assert caught.value.details == {"field": "message", "reason": "empty"}
    assert caught.value.code == "invalid_input"
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("text", "reason", "position", "codepoint"),
    [
        ("\x00", "control_character", 0, "U+0000"),
        ("a\tb", "control_character", 1, "U+0009"),
        ("ab\x0b", "control_character", 2, "U+000B"),
        ("esc\x1b[0m", "control_character", 3, "U+001B"),
        ("x\x1f", "control_character", 1, "U+001F"),
        ("del\x7f", "control_character", 3, "U+007F"),
        ("\ud800", "lone_surrogate", 0, "U+D800"),
        ("hi \udfff", "lone_surrogate", 3, "U+DFFF"),
        ("\ud83d\ude00", "lone_surrogate", 0, "U+D83D"),  # a "pair" of lone code points
    ],
)
def test_validate_text_rejects_forbidden_characters(
    text: str, reason: str, position: int, codepoint: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_text(text)
    assert caught.value.details == {
        "field": "message",
        "reason": reason,
        "position": position,
        "codepoint": codepoint,
    }
    assert codepoint in caught.value.message


# --- smart encoding -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Your order has shipped — track at example.com/t/123",
            "Your order has shipped - track at example.com/t/123",
        ),
        ("“Quoted” and ‘single’ it’s", "\"Quoted\" and 'single' it's"),  # noqa: RUF001
        ("Wait…", "Wait..."),
        ("10–12 May", "10-12 May"),  # noqa: RUF001
        ("non\u00a0breaking\u2009thin\u202fnarrow", "non breaking thin narrow"),
        ("zero\u200bwidth\ufeff\u2060", "zerowidth"),
        ("• one\n• two", "- one\n- two"),
        ("ＡＢＣ１２３！", "ABC123!"),  # noqa: RUF001
        ("Cafe\u0301", "Café"),  # decomposed accent composed by NFC
        ("½ price ‹deal›", "1/2 price <deal>"),  # noqa: RUF001
        ("€5 — {ok}", "€5 - {ok}"),
    ],
)
def test_smart_encode_replaces_lookalikes(text: str, expected: str) -> None:
    assert detect_encoding(text) == "UCS-2"
    assert smart_encode(text) == expected
    assert detect_encoding(expected) == "GSM-7"


def test_smart_encode_halves_an_em_dash_message() -> None:
    text = "Reminder — " + "a" * 100
    assert count_segments(text).segments == 2
    assert count_segments(smart_encode(text)) == count_segments("Reminder - " + "a" * 100)
    assert count_segments(smart_encode(text)).segments == 1


@pytest.mark.parametrize(
    "text",
    [
        "Plain GSM text {with} [extension] chars € and \\ ~ ^ |",
        "“Still UCS-2” because of 😀…",  # stays UCS-2: left exactly as submitted
        "Привет — мир",
        "",
    ],
)
def test_smart_encode_leaves_text_unchanged(text: str) -> None:
    assert smart_encode(text) == text


def test_smart_encoding_table_maps_non_gsm_to_gsm() -> None:
    assert len(SMART_ENCODING) > 200
    for char, replacement in SMART_ENCODING.items():
        assert len(char) == 1 and char not in GSM7_CHARSET, repr(char)
        assert detect_encoding(replacement) == "GSM-7", repr(char)


# --- properties ---------------------------------------------------------------------

_FORBIDDEN_CHARS = [chr(c) for c in range(0x20) if c not in (0x0A, 0x0C, 0x0D)] + ["\x7f"]
_ANY_CHAR = st.characters(exclude_categories=["Cs"], exclude_characters=_FORBIDDEN_CHARS)
_PIECES = st.sampled_from(["€", "^", "\r\n", EMOJI, FAMILY, FLAG, "e\u0301", "—", "“"])
_VALID_TEXT = st.one_of(
    st.text(alphabet=sorted(GSM7_CHARSET), min_size=1, max_size=500),
    st.text(alphabet=_ANY_CHAR, min_size=1, max_size=400),
    st.lists(st.one_of(_ANY_CHAR, _PIECES), min_size=1, max_size=300).map("".join),
    st.lists(st.one_of(st.sampled_from("ab "), _PIECES), min_size=1, max_size=300).map("".join),
).filter(lambda text: bool(text.strip()))


@settings(database=None, max_examples=300, deadline=None)
@given(_VALID_TEXT)
def test_count_segments_properties(text: str) -> None:
    validate_text(text)
    info = count_segments(text)
    assert info.encoding == detect_encoding(text)
    units = count_units(text, info.encoding)
    parts = split_segments(text, info.encoding)
    assert info.segments == len(parts) >= 1
    assert "".join(parts) == text
    if units <= SINGLE_SEGMENT_UNITS[info.encoding]:
        assert info.segments == 1
    else:
        capacity = MULTI_SEGMENT_UNITS[info.encoding]
        assert all(0 < count_units(p, info.encoding) <= capacity for p in parts)
        assert info.segments >= math.ceil(units / capacity)


@settings(database=None, max_examples=200, deadline=None)
@given(_VALID_TEXT)
def test_smart_encode_properties(text: str) -> None:
    encoded = smart_encode(text)
    if detect_encoding(text) == "GSM-7":
        assert encoded == text
    else:
        assert encoded == text or detect_encoding(encoded) == "GSM-7"
    assert count_segments(encoded).segments <= count_segments(text).segments


def test_smart_encode_never_costs_more_segments() -> None:
    text = "…" * 70  # one UCS-2 segment; "..." * 70 would be 210 septets, two segments
    assert smart_encode(text) == text
    assert smart_encode("…" * 69 + "—") == "…" * 69 + "—"  # 208 septets vs 70 units
    assert smart_encode("…" * 53) == "." * 159  # 159 septets: still one segment
