"""SMS text rules: validation, GSM-7 / UCS-2 segment counting and smart encoding (SPEC §6).

Counting follows the open-source Twilio segment calculator: a message is GSM-7 when
every character is in the GSM 03.38 basic or extension table, else UCS-2. One segment
holds 160 septets or 70 UTF-16 code units; a longer message is filled greedily into
segments of 153 septets or 67 units, and an indivisible piece (an escape pair, a
surrogate pair, a grapheme cluster) that does not fit starts the next segment. As in
Twilio's calculator, CR LF counts as two pieces. A cluster larger than a whole segment
(e.g. a letter with dozens of combining marks) is split between code points, since it
could not be sent otherwise.

Smart encoding composes decomposed accents (NFC: "e" + U+0301 is the GSM "é") and
replaces typographic look-alikes, but only when the result is wholly GSM-7: a text
that stays UCS-2 is returned unchanged, since replacing a few characters would not
change its encoding and "…" -> "..." would even cost two more units; so is a text
whose GSM-7 form would need more segments (seventy "…" fit one UCS-2 segment but
make 210 septets).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, Literal

import grapheme

from relay.errors import InvalidInput

Encoding = Literal["GSM-7", "UCS-2"]

GSM7_BASIC: Final = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION: Final = frozenset("\f^{}\\[~]|€")
GSM7_CHARSET: Final = GSM7_BASIC | GSM7_EXTENSION

SINGLE_SEGMENT_UNITS: Final[dict[Encoding, int]] = {"GSM-7": 160, "UCS-2": 70}
MULTI_SEGMENT_UNITS: Final[dict[Encoding, int]] = {"GSM-7": 153, "UCS-2": 67}

# C0 controls except LF, CR, FF; DEL; any surrogate code point (in a Python str
# a surrogate is always unpaired: a real pair is decoded to one astral code point).
_FORBIDDEN: Final = re.compile("[\x00-\x09\x0b\x0e-\x1f\x7f\ud800-\udfff]")


@dataclass(frozen=True)
class SegmentInfo:
    """How a text is encoded and split into SMS segments."""

    encoding: Encoding
    segments: int


def validate_text(text: str) -> None:
    """Raise InvalidInput unless the text is sendable (SPEC §6)."""
    if not text.strip():
        raise InvalidInput("The message is empty.", details={"field": "message", "reason": "empty"})
    match = _FORBIDDEN.search(text)
    if match is not None:
        raise _forbidden_character(match.group(), match.start())


def _forbidden_character(char: str, position: int) -> InvalidInput:
    """Build the error for a control character or lone surrogate at a position."""
    codepoint = f"U+{ord(char):04X}"
    is_surrogate = 0xD800 <= ord(char) <= 0xDFFF
    reason = "lone_surrogate" if is_surrogate else "control_character"
    what = "an unpaired surrogate" if is_surrogate else "a control character"
    details = {"field": "message", "reason": reason, "position": position, "codepoint": codepoint}
    return InvalidInput(f"The message contains {what} ({codepoint}).", details=details)


def detect_encoding(text: str) -> Encoding:
    """GSM-7 if every character is in the GSM 03.38 tables, else UCS-2."""
    return "GSM-7" if all(char in GSM7_CHARSET for char in text) else "UCS-2"


def count_units(text: str, encoding: Encoding) -> int:
    """Septets (GSM-7) or UTF-16 code units (UCS-2) the text takes."""
    if encoding == "GSM-7":
        return len(text) + sum(char in GSM7_EXTENSION for char in text)
    return len(text) + sum(ord(char) > 0xFFFF for char in text)


def count_segments(text: str) -> SegmentInfo:
    """Encoding and segment count of a text; an empty text has 0 segments."""
    encoding = detect_encoding(text)
    return SegmentInfo(encoding, len(split_segments(text, encoding)))


def split_segments(text: str, encoding: Encoding) -> tuple[str, ...]:
    """The text of each segment, never cutting an indivisible piece."""
    if not text:
        return ()
    if count_units(text, encoding) <= SINGLE_SEGMENT_UNITS[encoding]:
        return (text,)
    return tuple(_fill(_pieces(text, encoding), encoding))


def _pieces(text: str, encoding: Encoding) -> Iterator[str]:
    """Indivisible pieces: grapheme clusters, CR LF as two, oversized clusters by code point."""
    capacity = MULTI_SEGMENT_UNITS[encoding]
    for cluster in grapheme.graphemes(text):
        if cluster == "\r\n" or count_units(cluster, encoding) > capacity:
            yield from cluster
        else:
            yield str(cluster)


def _fill(pieces: Iterator[str], encoding: Encoding) -> list[str]:
    """Fill segments greedily; a piece that does not fit starts the next segment."""
    capacity = MULTI_SEGMENT_UNITS[encoding]
    parts: list[list[str]] = [[]]
    used = 0
    for piece in pieces:
        size = count_units(piece, encoding)
        if used + size > capacity:
            parts.append([])
            used = 0
        parts[-1].append(piece)
        used += size
    return ["".join(part) for part in parts]


def _lookalikes(replacement: str, chars: str) -> dict[str, str]:
    """Map each of chars to the replacement."""
    return dict.fromkeys(chars, replacement)


def _fullwidth_forms() -> dict[str, str]:
    """Fullwidth ASCII forms (U+FF01..U+FF5E) whose ASCII twin is GSM-7."""
    pairs = {chr(code + 0xFEE0): chr(code) for code in range(0x21, 0x7F)}
    return {wide: narrow for wide, narrow in pairs.items() if narrow in GSM7_CHARSET}


# Typographic look-alikes -> GSM-7, after Twilio's smart-encoding table (minus its
# combining marks, C0 controls and slips such as U+2039 -> ">"). Many keys are
# confusable with ASCII by design, hence the RUF001 waivers.
SMART_ENCODING: Final[dict[str, str]] = {
    **_fullwidth_forms(),
    **_lookalikes('"', "«»“”„‟″‶〝〞ʺˮ❝❞"),
    **_lookalikes("'", "‘’‚‛′‵ʹʻʼʽˈˊˋ´`❛❜︐︑"),  # noqa: RUF001
    **_lookalikes("-", "‐‑‒–—―−⁃•∙⎼⎽﹣"),  # noqa: RUF001
    **_lookalikes(" ", "\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"),
    **_lookalikes(" ", "\u2008\u2009\u200a\u202f\u205f\u3000"),
    **_lookalikes("", "\u00ad\u180e\u200b\u200c\u200d\u2060\ufeff"),
    **_lookalikes("\n", "\u0085\u2028\u2029"),
    **_lookalikes("...", "…"),
    **_lookalikes(".", "․。﹒｡"),  # noqa: RUF001
    **_lookalikes(",", "、﹐﹑､"),
    **_lookalikes("/", "÷⁄∕⧸"),  # noqa: RUF001
    **_lookalikes("\\", "⧵⧹﹨"),  # noqa: RUF001
    **_lookalikes("|", "∣⎜⎟⎸⎹⏐"),  # noqa: RUF001
    **_lookalikes("*", "⁎∗⊛✢✣✤✥✱✲✳✺✻✼✽❃❉❊❋⧆﹡"),  # noqa: RUF001
    **_lookalikes("~", "˜˷∼"),  # noqa: RUF001
    **_lookalikes("(", "❨❪﹙⟮⦅"),  # noqa: RUF001
    **_lookalikes(")", "❩❫﹚⟯⦆"),  # noqa: RUF001
    **_lookalikes("{", "❴﹛"),  # noqa: RUF001
    **_lookalikes("}", "❵﹜"),  # noqa: RUF001
    **_lookalikes(":", "ː˸⦂꞉︓"),  # noqa: RUF001
    **_lookalikes(";", "⁏︔﹔"),
    **_lookalikes("!", "ǃ︕﹗"),  # noqa: RUF001
    **_lookalikes("?", "︖﹖"),
    **_lookalikes("+", "˖﹢"),
    **_lookalikes("=", "꞊﹦"),
    **_lookalikes("<", "‹﹤"),  # noqa: RUF001
    **_lookalikes(">", "›﹥"),  # noqa: RUF001
    **_lookalikes("@", "﹫"),
    **_lookalikes("$", "﹩"),
    **_lookalikes("#", "﹟"),
    **_lookalikes("%", "﹪"),
    **_lookalikes("&", "﹠"),
    **_lookalikes("^", "ˆ"),  # noqa: RUF001
    **_lookalikes("_", "‗"),
    "‼": "!!",
    "⁇": "??",
    "¼": "1/4",
    "½": "1/2",
    "¾": "3/4",
}
_SMART_TABLE: Final = str.maketrans(SMART_ENCODING)


def smart_encode(text: str) -> str:
    """The text with look-alikes replaced (after NFC) if that makes it cheaper GSM-7, and
    never blank: a text of invisible characters alone stays as it is (and is priced so)."""
    if detect_encoding(text) == "GSM-7":
        return text
    encoded = unicodedata.normalize("NFC", text).translate(_SMART_TABLE)
    if detect_encoding(encoded) != "GSM-7" or not encoded.strip():
        return text
    saves = count_segments(encoded).segments <= count_segments(text).segments
    return encoded if saves else text
