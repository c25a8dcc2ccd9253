"""What became of a message: the status document, Sinch delivery reports and STOP replies."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping
from typing import Any

from relay import metrics
from relay.errors import Unauthorized
from relay.flows.refunding import refund_summary
from relay.phone import mask
from relay.pricing import from_atomic
from relay.services import Services
from relay.sinch import (
    SIGNATURE_TOLERANCE_SECONDS,
    DeliveryReport,
    InboundMessage,
    opt_out_action,
    parse_callback,
    verify_signature,
)

log = logging.getLogger(__name__)


def message_status(services: Services, message_id: str) -> dict[str, Any] | None:
    """The status document of GET /api/messages/{id}."""
    message = services.ledger.message(message_id)
    if message is None:
        return None
    payment = services.ledger.payment(message.payment_id)
    refund = services.ledger.refund(message.payment_id)
    amount = None if payment is None else payment.amount_atomic
    return {
        "message_id": message_id,
        "status": message.status,
        "to": mask(message.destination),
        "segments": message.segments,
        "provider": message.provider,
        "created_at": message.created_at,
        "updated_at": message.updated_at,
        "events": [dataclasses.asdict(event) for event in message.events],
        "payment": {
            "payer": payment and payment.payer,
            "amount_atomic": str(amount),
            "price_usd": from_atomic(amount or 0),
            "network": payment and payment.network,
            "transaction": payment and payment.tx_hash,
            "state": payment and payment.state,
        },
        "refund": None if refund is None else refund_summary(refund),
    }


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


def apply_callback(services: Services, payload: dict[str, Any], now: float) -> None:
    """A delivery report's status, or an inbound STOP/START."""
    event = parse_callback(payload)
    if isinstance(event, DeliveryReport):
        metrics.DELIVERY_REPORTS.labels(status=event.status).inc()
        services.ledger.update_message_status(
            event.batch_id, event.status, now, event.provider_status
        )
    elif isinstance(event, InboundMessage):
        action = opt_out_action(event.body)
        if action is not None:
            services.ledger.set_opt_out(event.sender, action == "stop", now)
            log.info("opt-%s from %s", "out" if action == "stop" else "in", mask(event.sender))
