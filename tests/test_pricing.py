from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.pricing import (
    TokenPrices,
    from_atomic,
    moderation_cost,
    quote_price,
    round_usd,
    to_atomic,
    token_prices,
)

FLASH = token_prices("gemini-2.5-flash")


def test_reference_example_prices_exactly() -> None:
    cost = moderation_cost(FLASH, input_tokens=412, output_tokens=144, thinking_tokens=57)
    assert cost == Decimal("0.0006261")
    price = quote_price(1, Decimal("0.05"), cost)
    assert price.total_usd == Decimal("0.050626")
    assert price.atomic == 50626
    assert price.moderation_usd == Decimal("0.000626")
    assert price.sms_usd == Decimal("0.050000")


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gemini-2.5-flash", TokenPrices(Decimal("0.30"), Decimal("2.50"))),
        ("gemini-2.5-flash-lite", TokenPrices(Decimal("0.10"), Decimal("0.40"))),
    ],
)
def test_model_table(model: str, expected: TokenPrices) -> None:
    assert token_prices(model) == expected


def test_overrides_replace_defaults() -> None:
    prices = token_prices("gemini-2.5-flash", Decimal("1"), Decimal("4"))
    assert moderation_cost(prices, 1_000_000, 500_000, 500_000) == Decimal("5")


@pytest.mark.parametrize(
    ("amount", "rounded"),
    [
        ("0.0000005", "0.000001"),
        ("0.0000004999", "0.000000"),
        ("0.0506265", "0.050627"),
        ("0.0506264999", "0.050626"),
    ],
)
def test_round_half_up(amount: str, rounded: str) -> None:
    assert round_usd(Decimal(amount)) == Decimal(rounded)


def test_segments_multiply() -> None:
    assert quote_price(3, Decimal("0.05"), Decimal(0)).atomic == 150_000


@given(st.integers(min_value=0, max_value=10**15))
def test_atomic_round_trip(atomic: int) -> None:
    assert to_atomic(from_atomic(atomic)) == atomic
