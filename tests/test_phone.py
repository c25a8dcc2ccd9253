"""Tests for relay.phone: E.164 normalisation (reference §05), SMS eligibility, masking."""

from __future__ import annotations

import pytest

from relay.errors import InvalidInput, UnsupportedDestination
from relay.phone import mask, normalize_destination


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # Every example of reference §05, exactly.
        ("3012576365", "+13012576365"),
        ("301-257-6365", "+13012576365"),
        ("(301) 257-6365", "+13012576365"),
        ("+1 (301) 257-6365", "+13012576365"),
        ("13012576365", "+13012576365"),
        ("+13012576365", "+13012576365"),
        ("+442071838750", "+442071838750"),  # a London fixed line stays accepted
        # Other harmless formats.
        ("  301.257.6365 ", "+13012576365"),
        ("1 301 257 6365", "+13012576365"),
        ("+44 20 7183 8750", "+442071838750"),
        ("+44 7911 123456", "+447911123456"),  # UK mobile
        ("+39 312 345 6789", "+393123456789"),  # Italian mobile
        ("+1 876 555 0100", "+18765550100"),  # Jamaica (NANP) mobile
        ("+44 56 1234 5678", "+445612345678"),  # VOIP
        ("+44 70 1234 5678", "+447012345678"),  # personal number
        ("+1 800 234 5678", "+18002345678"),  # NANP toll-free: SMS-capable
    ],
)
def test_normalize_destination(raw: str, expected: str) -> None:
    assert normalize_destination(raw) == expected


@pytest.mark.parametrize(
    ("raw", "region", "expected"),
    [
        ("020 7183 8750", "GB", "+442071838750"),
        ("07911 123456", "GB", "+447911123456"),
        ("+13012576365", "GB", "+13012576365"),
    ],
)
def test_normalize_destination_default_region(raw: str, region: str, expected: str) -> None:
    assert normalize_destination(raw, default_region=region) == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("1" * 33, "too_long"),
        ("+1 (301) 257-6365 0000 0000 0000 00", "too_long"),
        ("1-800-FLOWERS", "characters"),  # letters (vanity numbers) are refused
        ("+1 301 257 6365 ext 5", "characters"),
        ("301+2576365", "characters"),
        ("+1 301 257 6365;", "characters"),
        ("\uff13\uff10\uff11\uff12\uff15\uff17\uff16\uff13\uff16\uff15", "characters"),  # fullwidth
        ("+1301\n2576365", "characters"),
        ("()", "unparsable"),
        ("+", "characters"),
        ("++13012576365", "characters"),
        ("+999 123 456 789", "unparsable"),  # no such country code
        ("123", "impossible"),
        ("+1 301 257 63", "impossible"),
        ("+1301257636512", "impossible"),
        ("+1 555 257 6365", "invalid"),  # 555 is not an area code
        ("+1 301 057 6365", "invalid"),  # exchange cannot start with 0
        ("+44 7700 900123", "invalid"),  # Ofcom drama range
    ],
)
def test_normalize_destination_rejects_invalid(raw: str, reason: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        normalize_destination(raw)
    assert caught.value.details == {"field": "to", "reason": reason}
    assert caught.value.code == "invalid_input"
    assert caught.value.status == 400


def test_normalize_destination_rejects_a_bogus_region() -> None:
    with pytest.raises(InvalidInput) as caught:
        normalize_destination("3012576365", default_region="XX")
    assert caught.value.details == {"field": "to", "reason": "unparsable"}


@pytest.mark.parametrize(
    ("raw", "number_type"),
    [
        ("+1 900 234 5678", "premium_rate"),
        ("+44 901 234 5678", "premium_rate"),
        ("+33 8 91 12 34 56", "premium_rate"),
        ("+49 180 12345", "shared_cost"),
        ("+33 8 84 01 23 45", "shared_cost"),
        ("+44 55 1234 5678", "uan"),
        ("+33 8 06 12 34 56", "uan"),
        ("+49 177 991234567", "voicemail"),
        ("+39 331 0123 4501", "voicemail"),
        ("+44 7640 123456", "pager"),
        ("+44 800 123 4567", "toll_free"),  # toll-free outside NANP
        ("+33 8 01 23 45 67", "toll_free"),
    ],
)
def test_normalize_destination_rejects_non_sms_types(raw: str, number_type: str) -> None:
    with pytest.raises(UnsupportedDestination) as caught:
        normalize_destination(raw)
    assert caught.value.details == {"field": "to", "number_type": number_type}
    assert caught.value.code == "unsupported_destination"
    assert caught.value.status == 422


@pytest.mark.parametrize(
    ("e164", "masked"),
    [
        ("+13012576365", "+1********65"),
        ("+442071838750", "+44********50"),
        ("+447911123456", "+44********56"),
        ("+3114020", "+31***20"),
        ("+4916412345", "+49******45"),
        ("not a number", "**********er"),
        ("13012576365", "*********65"),  # not E.164: only the last two characters
        ("", ""),
    ],
)
def test_mask(e164: str, masked: str) -> None:
    assert mask(e164) == masked


@pytest.mark.parametrize("e164", ["+13012576365", "+442071838750", "+393123456789"])
def test_mask_hides_at_least_five_digits(e164: str) -> None:
    masked = mask(e164)
    assert len(masked) == len(e164)
    assert masked.count("*") >= 5
    assert masked.endswith(e164[-2:])
