"""What became of a message: the status document, Sinch delivery reports and STOP replies."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping
from typing import Any

from relay import metrics
from relay.errors import ReportTooEarly, Unauthorized
from relay.flows.notifying import event_for, notify
from relay.flows.refunding import refund_summary
from relay.ledger import Ledger
from relay.phone import mask
from relay.pricing import from_atomic
from relay.records import PaymentRecord
from relay.services import Services
from relay.sinch_webhooks import (
    SIGNATURE_TOLERANCE_SECONDS,
    DeliveryReport,
    InboundMessage,
    opt_out_action,
    parse_callback,
    verify_signature,
)
from relay.states import MessageState
from relay.states import PaymentState as P
from relay.wire import Event, MessageStatus, PaymentSummary

log = logging.getLogger(__name__)

#: What a report that came too early is told to wait (Sinch keeps its own schedule).
REPORT_RETRY_SECONDS = 5


def message_status(ledger: Ledger, message_id: str) -> dict[str, Any] | None:
    """The status document of GET /api/messages/{id} (and `relay status`)."""
    message = ledger.message(message_id)
    if message is None:
        return None
    payment = ledger.payment(message.payment_id)
    refund = ledger.refund(message.payment_id)
    return MessageStatus(
        message_id=message_id,
        status=message.status,
        to=mask(message.destination),
        segments=message.segments,
        provider=message.provider,
        created_at=message.created_at,
        updated_at=message.updated_at,
        events=[Event(**dataclasses.asdict(event)) for event in message.events],
        payment=payment_summary(payment),
        refund=None if refund is None else refund_summary(refund),
    ).model_dump()


def payment_summary(payment: PaymentRecord | None) -> PaymentSummary:
    """The payment behind a message, as its status document shows it."""
    if payment is None:
        return PaymentSummary(
            payer=None,
            amount_atomic="0",
            price_usd=from_atomic(0),
            network=None,
            transaction=None,
            state=None,
        )
    return PaymentSummary(
        payer=payment.payer,
        amount_atomic=str(payment.amount_atomic),
        price_usd=from_atomic(payment.amount_atomic),
        network=payment.network,
        transaction=payment.tx_hash,
        state=payment.state,
    )


def sinch_callback(
    services: Services, payload: dict[str, Any], raw: bytes, headers: Mapping[str, str]
) -> bool:
    """Apply a Sinch delivery report or inbound text; False for a replay of a signed call
    already applied (acknowledged, not applied twice)."""
    signing = services.settings.sinch_signing_secret
    now = services.clock()
    if not signing:
        apply_callback(services, payload, now)
        return True
    if not verify_signature(signing, raw, headers, now):
        raise Unauthorized("The callback signature is not valid.")
    signature = {k.lower(): v for k, v in headers.items()}["x-sinch-webhook-signature"]
    digest = hashlib.sha256(signature.encode()).hexdigest()
    forget = now - 2 * SIGNATURE_TOLERANCE_SECONDS
    if not services.ledger.first_sight(digest, now, forget):
        log.info("sinch callback replayed; ignored")
        return False
    try:
        apply_callback(services, payload, now)
    except Exception:  # not applied: Sinch's retry of it must not count as a replay
        services.ledger.forget_call(digest)
        raise
    return True


def report_to_agent(services: Services, message_id: str, status: MessageState) -> None:
    """A delivery report's outcome for the agent's callback URL, if it gave one."""
    message = services.ledger.message(message_id)
    payment = None if message is None else services.ledger.payment(message.payment_id)
    if payment is not None:
        notify(services, event_for(services, payment, message_id, status, payment.tx_hash))


def handed_over_unrecorded(services: Services, client_reference: str | None) -> bool:
    """Whether a report's client reference names a payment of ours whose message is not
    recorded yet: handed over, and then the write that records it failed (or has not
    happened yet), so its next holder records it. Sinch sends a report answered 5xx again
    (after 5 s, 10 s, 20 s... for about a day): it is applied then, not lost."""
    payment = None if client_reference is None else services.ledger.payment(client_reference)
    return payment is not None and payment.state in (P.DISPATCHING, P.DISPATCH_UNKNOWN)


def apply_callback(services: Services, payload: dict[str, Any], now: float) -> None:
    """A delivery report's status, or an inbound STOP/START."""
    event = parse_callback(payload)
    if isinstance(event, DeliveryReport):
        changed = services.ledger.update_message_status(
            event.batch_id, event.status, now, event.provider_status
        )
        if not changed and handed_over_unrecorded(services, event.client_reference):
            raise ReportTooEarly(retry_after=REPORT_RETRY_SECONDS)
        metrics.DELIVERY_REPORTS.labels(status=event.status).inc()
        if changed and event.status in ("delivered", "failed"):
            report_to_agent(services, event.batch_id, MessageState(event.status))
    elif isinstance(event, InboundMessage):
        action = opt_out_action(event.body)
        if action is not None:
            services.ledger.set_opt_out(event.sender, action == "stop", now)
            log.info("opt-%s from %s", "out" if action == "stop" else "in", mask(event.sender))
