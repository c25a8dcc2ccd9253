"""A quote: normalise, count, moderate, price and sign a message (SPEC §2 step 1)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal

from relay import metrics
from relay.errors import MessageTooLong, RateLimited, RecipientOptedOut, Rejected
from relay.inputs import MessageRequest
from relay.moderation import Verdict, admitted
from relay.phone import mask, normalize_destination
from relay.pricing import Price, moderation_cost, quote_price, token_prices
from relay.quote_tokens import QuoteClaims, message_sha256
from relay.segments import SegmentInfo, count_segments, smart_encode, validate_text
from relay.services import Services

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Quote:
    """An approved, priced message ready to be paid for."""

    message: str
    to: str
    text: str
    segments: SegmentInfo
    original_segments: SegmentInfo
    verdict: Verdict
    price: Price
    claims: QuoteClaims
    token: str


def prepare_text(
    services: Services,
    req: MessageRequest,
    *,
    paying: bool = False,
    admit: Callable[[], None] = admitted,
) -> tuple[str, str, SegmentInfo, SegmentInfo]:
    """Validate and normalise: (destination, text to send, its segments, submitted segments);
    ``admit`` runs before the opt-out registry is read."""
    validate_text(req.message)
    to = normalize_destination(req.to)
    text = smart_encode(req.message) if req.smart_encoding else req.message
    original = count_segments(req.message)
    info = count_segments(text) if text != req.message else original
    limit = services.settings.max_segments
    if info.segments > limit:
        raise MessageTooLong(
            f"The message needs {info.segments} segments; the limit is {limit}.",
            details={"segments": info.segments, "max_segments": limit, "encoding": info.encoding},
        )
    refuse_opted_out(services, to, paying=paying, admit=admit)
    return to, text, info, original


def refuse_opted_out(
    services: Services, to: str, *, paying: bool, admit: Callable[[], None] = admitted
) -> None:
    """Raise recipient_opted_out for a number that replied STOP. An answer that costs
    nothing (a quote, a 402) may rely on what this process read a few seconds ago; a paid
    request reads the registry, so nobody pays for a message to a number that said STOP.
    ``admit`` runs before the registry is read."""
    known = None if paying else services.ledger.remembered_opt_out(to)
    if known is None:
        admit()
        known = services.ledger.is_opted_out(to, recent=not paying)
    if known:
        raise RecipientOptedOut(details={"to": mask(to)})


def moderate(services: Services, text: str, admit: Callable[[], None] = admitted) -> Verdict:
    """The verdict on the text; a rejection is raised as 422 rejected. ``admit`` runs
    before anything but this process's memory is used, and before the verdict counts."""
    refused: list[BaseException] = []

    def admitting() -> None:
        try:
            admit()
        except BaseException as exc:
            refused.append(exc)
            raise

    # A refusal by the limit (or its storage) is not moderation that failed.
    with metrics.counted_errors(metrics.MODEL_ERRORS, unless=lambda: bool(refused)):
        verdict = services.moderator.moderate(text, admitting)
    admit()
    metrics.moderated(verdict, verdict_cost(services, verdict))
    if not verdict.approved:
        raise Rejected(
            verdict.reason or "Moderation rejected the message.",
            details={"category": verdict.category},
            extra={
                "approved": False,
                "category": verdict.category,
                "confidence": verdict.confidence,
                "reason": verdict.reason,
            },
        )
    return verdict


def verdict_cost(services: Services, verdict: Verdict) -> Decimal:
    """The dollar cost of the moderation call that produced this verdict."""
    settings = services.settings
    prices = token_prices(
        verdict.model, settings.gemini_price_input_per_m, settings.gemini_price_output_per_m
    )
    return moderation_cost(
        prices, verdict.input_tokens, verdict.output_tokens, verdict.thinking_tokens
    )


def quote(
    services: Services,
    req: MessageRequest,
    *,
    one_shot: bool = False,
    paying: bool = False,
    admit: Callable[[], None] = admitted,
) -> Quote:
    """Normalise, count, moderate, price and sign.

    A quote for /api/quote charges nothing for a cached verdict. A one-shot send always
    charges the verdict's original cost, so the unpaid and the paid request agree on the price.
    """
    to, text, info, original = prepare_text(services, req, paying=paying, admit=admit)
    verdict = moderate(services, text, admit)
    cost = verdict_cost(services, verdict) if one_shot or not verdict.cached else Decimal(0)
    price = quote_price(info.segments, services.settings.price_per_segment_usd, cost)
    claims = QuoteClaims.new(
        message_sha256=message_sha256(req.message),
        to=to,
        segments=info.segments,
        encoding=info.encoding,
        price_atomic=price.atomic,
        verdict_id=verdict.verdict_id,
        smart_encoding=req.smart_encoding,
        issued_at=int(services.clock()),
    )
    log.info("quoted %s segments=%d atomic=%d", mask(to), info.segments, price.atomic)
    token = services.signer.sign(claims)
    return Quote(req.message, to, text, info, original, verdict, price, claims, token)


def limit_model_calls(services: Services, client: str) -> None:
    """QUOTE_RATE_LIMIT per client: every request that may call the model (a quote, a
    one-shot send, paid or not) counts, in the shared storage."""
    refuse_over_limit(services, services.quote_limiter.hit("quote", client))


@contextmanager
def model_calls_counted(services: Services, client: str) -> Iterator[Callable[[], None]]:
    """limit_model_calls counted as the block starts, its answer awaited by the function
    given to the block (to run before anything but this process's memory is used: a
    query, a model call, a metric, a log line) or when the block ends: the shared storage's
    round trip overlaps the block's parsing and look-ups in memory. A client over its
    limit gets 429 whatever the block did or raised, and nothing the block made leaves."""
    with services.quote_limiter.counting("quote", client) as answer:

        def admit() -> None:
            refuse_over_limit(services, answer())

        try:
            yield admit
        except BaseException:
            admit()
            raise
        admit()


def refuse_over_limit(services: Services, wait: int | None) -> None:
    """429 rate_limited with the seconds to wait, when there are any."""
    if wait is not None:
        raise RateLimited(retry_after=wait, details={"limit": services.settings.quote_rate_limit})
