"""Destination numbers: normalisation to E.164, SMS eligibility and masking (SPEC §13, ref §05).

Accepted number types: MOBILE, FIXED_LINE, FIXED_LINE_OR_MOBILE (the reference's
London example is a fixed line; many carriers text-enable landlines), VOIP and
PERSONAL_NUMBER. TOLL_FREE is accepted only in the North American Numbering Plan
(+1), where toll-free texting is an established service; elsewhere toll-free
numbers cannot receive SMS. PREMIUM_RATE, SHARED_COST, UAN, VOICEMAIL and PAGER
(and UNKNOWN, which a valid number never has) are `unsupported_destination`.
"""

from __future__ import annotations

import functools
import re
from typing import Final

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberFormat, PhoneNumberType

from relay.errors import InvalidInput, UnsupportedDestination
from relay.memo import Memo

MAX_RAW_LENGTH: Final = 32
# ASCII digits, common separators, and "+" only in front.
_PLAUSIBLE: Final = re.compile(r"\+?[0-9 ().\-/]+")

_SMS_TYPES: Final = frozenset(
    {
        PhoneNumberType.MOBILE,
        PhoneNumberType.FIXED_LINE,
        PhoneNumberType.FIXED_LINE_OR_MOBILE,
        PhoneNumberType.VOIP,
        PhoneNumberType.PERSONAL_NUMBER,
    }
)
_TYPE_NAMES: Final = {
    value: name.lower() for name, value in vars(PhoneNumberType).items() if name.isupper()
}
_NANP_COUNTRY_CODE: Final = 1
#: Valid destinations as submitted, and their E.164 form: parsing is the costly part of a
#: repeated request (a refused number is parsed again each time, and never remembered).
_NORMALIZED: Final[Memo[tuple[str, str], str]] = Memo(10_000)


def normalize_destination(raw: str, default_region: str = "US") -> str:
    """The E.164 form of a destination, or InvalidInput / UnsupportedDestination."""
    known = _NORMALIZED.get((raw, default_region))
    if known is not None:
        return known
    return _NORMALIZED.put((raw, default_region), _normalize(raw, default_region))


def _normalize(raw: str, default_region: str) -> str:
    number = _parse(raw, default_region)
    if not phonenumbers.is_possible_number(number):
        raise _invalid("The phone number has the wrong length.", "impossible")
    if not phonenumbers.is_valid_number(number):
        raise _invalid("The phone number is not a valid number.", "invalid")
    _require_sms_capable(number)
    return str(phonenumbers.format_number(number, PhoneNumberFormat.E164))


def _parse(raw: str, default_region: str) -> phonenumbers.PhoneNumber:
    """Parse a plausible-looking string, rejecting absurd input before phonenumbers sees it."""
    if not isinstance(raw, str) or not raw.strip():
        raise _invalid("The phone number is missing.", "empty")
    text = raw.strip()
    if len(text) > MAX_RAW_LENGTH:
        raise _invalid(f"The phone number is longer than {MAX_RAW_LENGTH} characters.", "too_long")
    if not _PLAUSIBLE.fullmatch(text):
        raise _invalid("Use digits, spaces and + ( ) - . / only.", "characters")
    try:
        return phonenumbers.parse(text, default_region)
    except NumberParseException as exc:
        raise _invalid("The phone number could not be parsed.", "unparsable") from exc


def _require_sms_capable(number: phonenumbers.PhoneNumber) -> None:
    """Raise UnsupportedDestination for number types that cannot take an SMS."""
    number_type = phonenumbers.number_type(number)
    if number_type in _SMS_TYPES:
        return
    if number_type == PhoneNumberType.TOLL_FREE and number.country_code == _NANP_COUNTRY_CODE:
        return
    name = _TYPE_NAMES.get(number_type, "unknown")
    raise UnsupportedDestination(
        f"This number type ({name}) cannot receive SMS from the relay.",
        details={"field": "to", "number_type": name},
    )


def _invalid(message: str, reason: str) -> InvalidInput:
    """An invalid_input error about the `to` field."""
    return InvalidInput(message, details={"field": "to", "reason": reason})


@functools.lru_cache(maxsize=4096)
def mask(e164: str) -> str:
    """A log-safe form: "+13012576365" -> "+1********65": the country code and the last two
    digits, nothing that narrows down a region or a subscriber."""
    country = _country_code(e164)
    if country is None:
        return "*" * max(len(e164) - 2, 0) + e164[-2:]
    rest = e164[len(country) + 1 :]
    return f"+{country}{'*' * max(len(rest) - 2, 0)}{rest[-2:]}"


def _country_code(e164: str) -> str | None:
    """The country calling code of an E.164 string, or None if it is not one."""
    if not re.fullmatch(r"\+[0-9]{2,15}", e164):
        return None
    try:
        return str(phonenumbers.parse(e164, None).country_code)
    except NumberParseException:
        return None
