"""Events about a message for the agent's callback URL (SPEC §10): kept in the ledger beside
the change that caused them, then delivered by the worker, at least once, under a lease per
event, with backoff between attempts for about a day."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from relay.callbacks import CallbackFailed, Delivery, event_body
from relay.phone import mask
from relay.records import EventRecord, PaymentRecord
from relay.retry import Backoff
from relay.services import Services
from relay.states import MessageState
from relay.wire import EventData, EventType, Refund

log = logging.getLogger(__name__)

#: Attempts and the waits between them: up to 5 s, 10 s, 20 s, … then 4 h apart.
EVENT_BACKOFF = Backoff(attempts=16, first=5.0, cap=4 * 3600.0)
#: One attempt holds its event this long (well over the delivery timeouts).
EVENT_LEASE_SECONDS = 60.0
#: A worker pass spends at most this long on events: agents' endpoints that answer slowly
#: (or never) cannot hold back the reconciliation of payments that shares the loop.
EVENT_PASS_SECONDS = 10.0


#: The event each status of a message is told as.
EVENTS: dict[MessageState, EventType] = {
    MessageState.QUEUED: "message.dispatched",
    MessageState.DELIVERED: "message.delivered",
    MessageState.FAILED: "message.failed",
    MessageState.REFUNDED: "message.refunded",
}


def notify(services: Services, event: EventRecord | None) -> None:
    """Keep an event (event_for's: None when the payment has no callback URL) for delivery;
    an event is kept once per message and type (its id is stable, so agents can drop
    repeats)."""
    if event is not None:
        services.ledger.enqueue_event(event)


def event_for(
    services: Services,
    payment: PaymentRecord,
    message_id: str,
    status: MessageState,
    transaction: str | None,
    refund: Refund | None = None,
) -> EventRecord | None:
    """The event for a message's new status, or None when the payment has no callback URL
    (or the status is told as no event)."""
    event_type = EVENTS.get(status)
    if payment.callback_url is None or payment.callback_secret is None or event_type is None:
        return None
    now = services.clock()
    data = EventData(
        message_id=message_id,
        status=status,
        to=mask(payment.destination),
        transaction=transaction,
        refund=refund,
    )
    return EventRecord(
        id=f"evt_{payment.id}_{event_type.removeprefix('message.')}",
        payment_id=payment.id,
        type=event_type,
        url=payment.callback_url,
        secret=payment.callback_secret,
        body=event_body(event_type, now, data.model_dump()),
        next_attempt_at=now,
        created_at=now,
        updated_at=now,
    )


def deliver_events(
    services: Services,
    *,
    still_elected: Callable[[], bool] | None = None,
    budget_seconds: float = EVENT_PASS_SECONDS,
) -> dict[str, str]:
    """Send the events that are due and nobody else is sending, for at most
    ``budget_seconds`` (the rest wait for the next pass): event id → delivered, retrying or
    failed."""
    results: dict[str, str] = {}
    ends = time.monotonic() + budget_seconds
    for event in services.ledger.due_events(services.clock()):
        if time.monotonic() >= ends or (still_elected is not None and not still_elected()):
            break
        now = services.clock()
        if services.ledger.take_event(event.id, event.attempts, now, EVENT_LEASE_SECONDS):
            results[event.id] = deliver(services, event)
    return results


def deliver(services: Services, event: EventRecord) -> str:
    """One attempt at one event, its outcome recorded."""
    now = services.clock()
    try:
        services.callbacks.send(event.url, event.secret, Delivery(event.id, now, event.body))
    except CallbackFailed as failed:
        attempt = event.attempts + 1
        if attempt >= EVENT_BACKOFF.attempts:
            log.warning("event %s given up after %d attempts: %s", event.id, attempt, failed)
            services.ledger.record_attempt(event.id, "failed", now, str(failed), now)
            return "failed"
        retry_at = now + EVENT_BACKOFF.wait(attempt)
        services.ledger.record_attempt(event.id, "pending", retry_at, str(failed), now)
        log.info("event %s not taken (%s); attempt %d at %.0f", event.id, failed, attempt, retry_at)
        return "retrying"
    services.ledger.record_attempt(event.id, "delivered", now, None, now)
    return "delivered"
