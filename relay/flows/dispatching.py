"""The paid SMS handed to the provider: answered 200, never sent twice (SPEC §10)."""

from __future__ import annotations

import logging

from x402 import PaymentRequirements

from relay import metrics
from relay.flows.answers import (
    Outcome,
    answer_fields,
    failed_after_payment,
    not_confirmed,
    payment_headers,
    sent,
)
from relay.flows.leases import busy, hold, moved_while_held
from relay.flows.notifying import event_for, notify
from relay.flows.refunding import refunded_answer
from relay.payment_headers import ParsedPayment
from relay.payments import Settlement
from relay.phone import mask
from relay.records import MessageRecord, PaymentRecord
from relay.services import Services
from relay.sinch import SendResult, SmsDispatchError, compose_body
from relay.states import MessageState as M
from relay.states import PaymentState as P

log = logging.getLogger(__name__)

#: After an unconfirmed hand-over to Sinch, how long its batch list may lag before a
#: missing batch is taken as never created and the SMS is sent.
DISPATCH_QUIET_SECONDS = 60


def dispatch(services: Services, payment: PaymentRecord, settlement: Settlement) -> Outcome:
    """Hand the paid SMS to the provider; answer 200, or 502 with the refund (also when
    the recipient replied STOP since the payment was claimed: the registry is read again
    here, in the database, so no SMS follows a STOP whatever the payment waited for).

    The payment was moved to dispatching a moment ago, only while its lease was ours and
    renewing it: that was the check before the first attempt; each later attempt and
    look-up renews the lease again (or stops)."""
    assert payment.body is not None, "a payment being dispatched keeps its text"
    if services.ledger.is_opted_out(payment.destination):  # a STOP since it was paid for
        log.warning(
            "payment %s: %s opted out since; not sent", payment.id, mask(payment.destination)
        )
        opted_out = SmsDispatchError("The recipient replied STOP after the payment was made.")
        return dispatch_failed(services, payment, settlement, opted_out)
    body_text = compose_body(payment.body, services.settings.opt_out_line)
    first = True

    def keep_alive() -> None:
        nonlocal first
        if first:  # checked (and renewed) by the move to dispatching
            first = False
            return
        hold(services, payment)

    try:
        with metrics.timed(metrics.DISPATCH_SECONDS):
            handed = services.sms.send(
                payment.destination, body_text, payment.id, keep_alive=keep_alive
            )
    except SmsDispatchError as exc:
        return dispatch_failed(services, payment, settlement, exc)
    return dispatched(services, payment, handed, settlement)


def redispatch(
    services: Services, payment: PaymentRecord, parsed: ParsedPayment, req: PaymentRequirements
) -> Outcome:
    """After a crash or an unconfirmed hand-over: find the message the provider may hold
    (searching from the payment's creation) and send only when it certainly holds none,
    and only once its batch list has had DISPATCH_QUIET_SECONDS to catch up. A provider
    that cannot be asked leaves the payment as it is, never sent twice."""
    assert payment.tx_hash is not None and payment.log_index is not None
    settlement = services.payments.settlement_of(parsed, req, payment.tx_hash, payment.log_index)
    try:
        found = services.sms.lookup(payment.id, since=float(payment.created_at))
    except SmsDispatchError as exc:
        metrics.SMS_FAILURES.labels(kind="lookup").inc()
        raise not_confirmed(settlement) from exc
    if found is not None:
        return dispatched(services, payment, found, settlement)
    if services.clock() - float(payment.updated_at) < DISPATCH_QUIET_SECONDS:
        raise not_confirmed(settlement)
    sending = (P.DISPATCHING, P.DISPATCH_UNKNOWN)
    if not moved_while_held(services, payment, sending, P.DISPATCHING):
        raise busy()
    return dispatch(services, payment, settlement)


def dispatched(
    services: Services, payment: PaymentRecord, handed: SendResult, settlement: Settlement
) -> Outcome:
    """Record the accepted message, its events and the 200 that every replay will get, in
    one write."""
    now, message_id, tx = services.clock(), handed.message_id, settlement.transaction
    # No delivery report comes for a message delivered as it is handed over.
    statuses = (M.QUEUED, M.DELIVERED) if handed.delivered else (M.QUEUED,)
    message = message_record(payment, message_id, handed.provider, statuses[-1], now)
    told = [event_for(services, payment, message_id, status, tx) for status in statuses]
    log.info("sent %s message_id=%s tx=%s", mask(payment.destination), message_id, tx)
    outcome = sent(services, payment, message_id, settlement)
    if services.ledger.record_dispatch(
        message,
        statuses,
        [event for event in told if event is not None],
        payment.id,
        (P.DISPATCHING, P.DISPATCH_UNKNOWN),
        P.DISPATCHED,
        now,
        **answer_fields(outcome, P.DISPATCHED),
        message_id=message_id,
    ):
        metrics.finished(P.DISPATCHED)
    return outcome


def message_record(
    payment: PaymentRecord, message_id: str, provider: str, status: M, now: float
) -> MessageRecord:
    """The message of a payment."""
    return MessageRecord(
        message_id=message_id,
        payment_id=payment.id,
        destination=payment.destination,
        segments=payment.segments,
        status=status,
        provider=provider,
        created_at=now,
        updated_at=now,
    )


def dispatch_failed(
    services: Services,
    payment: PaymentRecord,
    settlement: Settlement,
    exc: SmsDispatchError,
) -> Outcome:
    """The provider refused after payment: record it, refund if we can, answer 502."""
    ledger = services.ledger
    headers = payment_headers(services, settlement, payment.version)
    log.warning("dispatch failed after payment %s: %s", payment.id, exc.message)
    metrics.SMS_FAILURES.labels(kind="unconfirmed" if exc.maybe_sent else "refused").inc()
    if exc.maybe_sent:
        ledger.transition(
            payment.id,
            (P.DISPATCHING,),
            P.DISPATCH_UNKNOWN,
            services.clock(),
            holder=payment.holder,
        )
        return Outcome.of_error(not_confirmed(settlement), headers)
    if not ledger.transition(
        payment.id,
        (P.DISPATCHING,),
        P.DISPATCH_FAILED,
        services.clock(),
        holder=payment.holder,
        error=exc.message[:200],
    ):
        raise busy()
    failed = message_record(payment, payment.id, "none", M.FAILED, services.clock())
    ledger.record_message(failed)
    tx = settlement.transaction
    notify(services, event_for(services, payment, payment.id, M.FAILED, tx))
    error = failed_after_payment(settlement.transaction, payment.id, provider_status=exc.status)
    return refunded_answer(services, payment, Outcome.of_error(error, headers))
