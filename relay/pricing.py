"""Prices in Decimal dollars and integer atomic USDC units; never a float (SPEC §5)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

USDC_DECIMALS = 6
ATOMIC_PER_USD = Decimal(10) ** USDC_DECIMALS
MICRO = Decimal(1).scaleb(-USDC_DECIMALS)
PER_MILLION = Decimal(1_000_000)

# Dollars per million tokens: (input, output incl. thinking).
MODEL_PRICES: dict[str, tuple[Decimal, Decimal]] = {
    "gemini-2.5-flash": (Decimal("0.30"), Decimal("2.50")),
    "gemini-2.5-flash-lite": (Decimal("0.10"), Decimal("0.40")),
    "rules": (Decimal(0), Decimal(0)),
}


@dataclass(frozen=True)
class TokenPrices:
    """Dollars per million input and output tokens of one model."""

    input_per_m: Decimal
    output_per_m: Decimal


@dataclass(frozen=True)
class Price:
    """A quote's price: the parts and the total, in dollars and atomic units."""

    sms_usd: Decimal
    moderation_usd: Decimal
    total_usd: Decimal
    atomic: int


def token_prices(
    model: str, input_override: Decimal | None = None, output_override: Decimal | None = None
) -> TokenPrices:
    """The per-million token prices of a model, with operator overrides applied."""
    default_in, default_out = MODEL_PRICES.get(model, MODEL_PRICES["gemini-2.5-flash"])
    return TokenPrices(
        input_per_m=default_in if input_override is None else input_override,
        output_per_m=default_out if output_override is None else output_override,
    )


def moderation_cost(
    prices: TokenPrices, input_tokens: int, output_tokens: int, thinking_tokens: int
) -> Decimal:
    """The exact (unrounded) dollar cost of one moderation call."""
    billed_out = output_tokens + thinking_tokens
    return (input_tokens * prices.input_per_m + billed_out * prices.output_per_m) / PER_MILLION


def round_usd(amount: Decimal) -> Decimal:
    """Round half up to USDC precision (6 decimal places)."""
    return amount.quantize(MICRO, rounding=ROUND_HALF_UP)


def to_atomic(amount_usd: Decimal) -> int:
    """Dollars (already at 6 dp) to integer atomic USDC units."""
    return int((round_usd(amount_usd) * ATOMIC_PER_USD).to_integral_value())


def from_atomic(atomic: int) -> Decimal:
    """Integer atomic USDC units to dollars."""
    return (Decimal(atomic) / ATOMIC_PER_USD).quantize(MICRO)


def quote_price(segments: int, per_segment_usd: Decimal, moderation_usd: Decimal) -> Price:
    """Total = round_half_up(segments x per-segment + moderation cost, 6 dp)."""
    sms = segments * per_segment_usd
    total = round_usd(sms + moderation_usd)
    return Price(
        sms_usd=round_usd(sms),
        moderation_usd=round_usd(moderation_usd),
        total_usd=total,
        atomic=to_atomic(total),
    )
