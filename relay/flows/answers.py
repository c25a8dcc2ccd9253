"""The HTTP answers of /api/send, and the final answer stored with a payment for replays."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from x402 import PaymentRequirements

from relay import metrics
from relay.discovery import discovery_extension
from relay.errors import (
    PaymentRequired,
    PaymentSettlementFailed,
    RelayError,
    SinchSendFailedAfterPayment,
)
from relay.payments import Settlement
from relay.pricing import from_atomic, to_atomic
from relay.records import PaymentRecord
from relay.services import Services
from relay.states import FINAL_STATES, MessageState
from relay.states import PaymentState as P
from relay.wire import (
    EventType,
    PaymentRequiredError,
    PriceRule,
    SendResult,
    WebhookInfo,
    to_json,
)

HOW_TO_PAY = (
    "Resubmit POST /api/send with the same body and a PAYMENT-SIGNATURE (x402 v2) or "
    "X-PAYMENT (v1) header signed for the requested amount."
)


@dataclass(frozen=True)
class Outcome:
    """An HTTP answer for /api/send: status, JSON body and headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str]
    #: The body's JSON, when written once for an answer given many times.
    encoded: str | None = field(default=None, compare=False)

    def json(self) -> str:
        """The body as JSON text."""
        return self.encoded if self.encoded is not None else to_json(self.body)

    @classmethod
    def of_error(cls, error: RelayError, headers: dict[str, str] | None = None) -> Outcome:
        """The answer that reports an error (with these headers, or the error's own)."""
        return cls(
            error.status, error.body(), error.response_headers() if headers is None else headers
        )


def challenge(
    services: Services, requirements: PaymentRequirements, amount_atomic: int, resource_url: str
) -> Outcome:
    """The 402: v2 PAYMENT-REQUIRED header, v1 accepts and the reference's fields in the body.

    A 402 depends on nothing but the amount and the URL, so each is built once per process
    (an odd Host header costs one build and an entry in a bounded memo).
    """
    return services.challenges.get_or_make(
        (amount_atomic, resource_url, False),
        lambda: _challenge(services, requirements, amount_atomic, resource_url),
    )


def probe(services: Services, resource_url: str) -> Outcome:
    """A bare POST /api/send: a 402 at the one-segment price, describing the price rule."""
    settings = services.settings
    per_segment = to_atomic(settings.price_per_segment_usd)

    def build() -> Outcome:
        rule = PriceRule(
            per_segment_usd=settings.price_per_segment_usd,
            plus="the moderation call's token cost",
            max_segments=settings.max_segments,
            how_to_quote="POST /api/quote {message, to}, or POST /api/send {message, to}",
        )
        requirements = services.payments.requirements(per_segment)
        return _challenge(services, requirements, per_segment, resource_url, rule)

    return services.challenges.get_or_make((per_segment, resource_url, True), build)


def _challenge(
    services: Services,
    requirements: PaymentRequirements,
    amount_atomic: int,
    resource_url: str,
    price_rule: PriceRule | None = None,
) -> Outcome:
    price = from_atomic(amount_atomic)
    header, v1 = services.payments.challenge(
        requirements,
        resource_url=resource_url,
        description=f"One SMS, moderated and sent via Sinch: {price} USDC",
        error="Payment required",
        discovery=discovery_extension(services.settings.max_message_chars),
    )
    body = PaymentRequiredError(
        **PaymentRequired(details={"amount_atomic": str(amount_atomic)}).body(),
        protocol="x402",
        price_usd=price,
        how_to_pay=HOW_TO_PAY,
        x402Version=v1["x402Version"],
        accepts=v1["accepts"],
        price_rule=price_rule,
    )
    answer = body.model_dump()
    return Outcome(402, answer, {"PAYMENT-REQUIRED": header}, encoded=to_json(answer))


def sent(
    services: Services, payment: PaymentRecord, message_id: str, settlement: Settlement
) -> Outcome:
    """The 200 of a paid send: the message handed to the provider."""
    headers = payment_headers(services, settlement, payment.version)
    return Outcome(200, sent_body(payment, message_id, settlement.transaction), headers)


def sent_body(payment: PaymentRecord, message_id: str, transaction: str) -> dict[str, Any]:
    """The body of a paid send's 200."""
    return SendResult(
        sent=True,
        message_id=message_id,
        status=MessageState.QUEUED,
        to=payment.destination,
        segments=payment.segments,
        price_usd=from_atomic(payment.amount_atomic),
        paid_by=payment.payer,
        transaction=transaction,
        webhook=webhook_info(payment),
    ).model_dump()


def webhook_info(payment: PaymentRecord) -> WebhookInfo | None:
    """Where the message's events go and the secret that signs them (only in the paid answer)."""
    if payment.callback_url is None or payment.callback_secret is None:
        return None
    events: list[EventType] = [
        "message.dispatched",
        "message.delivered",
        "message.failed",
        "message.refunded",
    ]
    return WebhookInfo(url=payment.callback_url, secret=payment.callback_secret, events=events)


def payment_headers(services: Services, settlement: Settlement, version: int) -> dict[str, str]:
    """PAYMENT-RESPONSE (v2) or X-PAYMENT-RESPONSE (v1) for an answer about a settlement."""
    return dict([services.payments.response_header(settlement, version)])


def failed_after_payment(
    transaction: str, message_id: str, **details: Any
) -> SinchSendFailedAfterPayment:
    """502: paid, but the provider refused the message (the refund is added to it)."""
    return SinchSendFailedAfterPayment(
        details={"transaction": transaction, **details},
        extra={"transaction": transaction, "message_id": message_id},
    )


def not_confirmed(settlement: Settlement) -> SinchSendFailedAfterPayment:
    """502: the provider could not confirm the message yet; it will be reconciled."""
    return SinchSendFailedAfterPayment(
        "The SMS provider could not confirm the message; it will be reconciled.",
        details={"transaction": settlement.transaction, "status": "unknown"},
        extra={"transaction": settlement.transaction, "refund": None},
    )


def stored_answer(payment: PaymentRecord) -> Outcome:
    """The answer stored with a payment's final state (or rebuilt for one stored before
    answers were kept with payments)."""
    if payment.response_status is not None and payment.response_body is not None:
        return Outcome(
            payment.response_status, payment.response_body, payment.response_headers or {}
        )
    if payment.state == P.DISPATCHED:
        body = sent_body(payment, str(payment.message_id), str(payment.tx_hash))
        return Outcome(200, body, {})
    if payment.state == P.REFUNDED:
        return Outcome.of_error(failed_after_payment(str(payment.tx_hash), payment.id))
    return Outcome.of_error(PaymentSettlementFailed(details={"reason": "settlement_failed"}))


def finish(
    services: Services,
    payment_id: str,
    from_states: tuple[P, ...],
    state: P,
    outcome: Outcome,
    **fields: Any,
) -> Outcome:
    """Store the final answer with the final state; the stored answer is replayed after."""
    now = services.clock()
    moved = services.ledger.transition(
        payment_id, from_states, state, now, **answer_fields(outcome, state), **fields
    )
    if moved:
        metrics.finished(state)
    return outcome


def answer_fields(outcome: Outcome, state: P) -> dict[str, Any]:
    """What a move that stores the answer every replay gets writes: the answer, the text
    dropped; into a final state, the lease given up too (nothing is left to do)."""
    fields: dict[str, Any] = {
        "response_status": outcome.status,
        "response_body": outcome.body,
        "response_headers": outcome.headers,
        "body": None,
    }
    if state in FINAL_STATES:
        fields.update(lease_until=None, lease_holder=None)
    return fields
