"""The payer's money sent back when the provider refuses a paid SMS (SPEC §11).

The signed transaction is recorded before it is broadcast, so a retry after a crash or a
lost answer re-sends that same transaction; a new one is signed only when the chain shows
the old one can never be mined (reverted, or its nonce long taken by another), and the swap
is a compare-and-set, so two workers never both sign one: a payment is refunded at most once.
"""

from __future__ import annotations

from typing import Any

from x402 import PaymentRequirements

from relay import metrics
from relay.errors import RelayError
from relay.flows.answers import (
    Outcome,
    failed_after_payment,
    finish,
    payment_headers,
    stored_answer,
)
from relay.flows.leases import hold
from relay.flows.notifying import event_for, notify
from relay.payment_headers import ParsedPayment
from relay.records import PaymentRecord, RefundRecord
from relay.refunds import SignedRefund
from relay.services import Services
from relay.states import MessageState
from relay.states import PaymentState as P
from relay.states import RefundState as R
from relay.wire import Refund

#: Refunds that will never be mined: a new one is signed in their place.
_DEAD = (R.REVERTED, R.REPLACED, R.FAILED)


def finish_refund(
    services: Services, payment: PaymentRecord, parsed: ParsedPayment, req: PaymentRequirements
) -> Outcome:
    """Finish a refund that a crash, an outage or a slow chain left unconfirmed, and update
    the stored answer so that a replay reports it."""
    if payment.response_status is not None:
        return refunded_answer(services, payment, stored_answer(payment))
    assert payment.tx_hash is not None and payment.log_index is not None
    settlement = services.payments.settlement_of(parsed, req, payment.tx_hash, payment.log_index)
    error = failed_after_payment(settlement.transaction, payment.id)
    headers = payment_headers(services, settlement, parsed.version)
    return refunded_answer(services, payment, Outcome.of_error(error, headers))


def refunded_answer(services: Services, payment: PaymentRecord, outcome: Outcome) -> Outcome:
    """Refund the payment (if a refund key is set) and store the 502 with the refund."""
    refund = refund_payment(services, payment)
    summary = None if refund is None else refund_summary(refund).model_dump()
    body = dict(outcome.body)
    body["refund"] = summary
    body["details"] = {**(body.get("details") or {}), "refund": summary}
    state = P.REFUNDED if refund and refund.state == R.CONFIRMED else P.DISPATCH_FAILED
    answer = Outcome(outcome.status, body, outcome.headers)
    return finish(services, payment.id, (P.DISPATCH_FAILED,), state, answer)


def refund_summary(refund: RefundRecord) -> Refund:
    """A refund as answers and the status document show it."""
    return Refund(
        transaction=refund.tx_hash,
        amount_atomic=str(refund.amount_atomic),
        state=refund.state,
    )


def refund_payment(services: Services, payment: PaymentRecord) -> RefundRecord | None:
    """Send the payer's USDC back when a refund key is configured; the refund as it stands."""
    if services.refunder is None:
        return None
    record = services.ledger.refund(payment.id)
    for _ in range(2):
        if record is None or record.state in _DEAD:
            record = new_refund(services, payment, record)
        if record.state in (R.CONFIRMED, R.FAILED):
            break
        hold(services, payment)
        assert record.tx_hash is not None and record.raw_tx is not None
        signed = SignedRefund(record.tx_hash, record.raw_tx, record.nonce)
        state = services.refunder.send(signed)
        moved = services.ledger.update_refund(
            payment.id, record.tx_hash, record.state, state=state, updated_at=services.clock()
        )
        if moved and R(state) != record.state:
            metrics.refund_reached(state, record.amount_atomic)
        record = services.ledger.refund(payment.id) or record
        if record.state != R.REPLACED:
            break
    assert record is not None
    if record.state == R.CONFIRMED:
        services.ledger.update_message_status(payment.id, MessageState.REFUNDED, record.updated_at)
        refunded = MessageState.REFUNDED
        summary = refund_summary(record)
        notify(
            services, event_for(services, payment, payment.id, refunded, payment.tx_hash, summary)
        )
    return record


def new_refund(
    services: Services, payment: PaymentRecord, replacing: RefundRecord | None
) -> RefundRecord:
    """Sign a refund and record it (state "signed", or "failed" when it cannot be signed)
    before anything is broadcast, in place of ``replacing`` if given; the record that won
    (ours, or another worker's that got there first)."""
    assert services.refunder is not None
    now = services.clock()
    hold(services, payment)
    try:
        signed = services.refunder.sign(payment.payer, payment.amount_atomic)
        fields: dict[str, Any] = {
            "tx_hash": signed.tx_hash,
            "raw_tx": signed.raw,
            "nonce": signed.nonce,
            "state": R.SIGNED,
            "error": None,
        }
    except RelayError as exc:
        fields = {"tx_hash": None, "raw_tx": None, "nonce": None, "state": R.FAILED}
        fields["error"] = exc.code
    if replacing is None:
        won = services.ledger.create_refund(
            RefundRecord(
                payment_id=payment.id,
                amount_atomic=payment.amount_atomic,
                created_at=now,
                updated_at=now,
                **fields,
            )
        )
    else:
        won = services.ledger.update_refund(
            payment.id, replacing.tx_hash, replacing.state, updated_at=now, **fields
        )
    if won:
        metrics.refund_reached(fields["state"], payment.amount_atomic)
    found = services.ledger.refund(payment.id)
    assert found is not None
    return found
