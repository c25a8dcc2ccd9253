"""A payment's settlement, committed step by step and judged by the chain (SPEC §9, §11).

Only a certain failure is final (402 settlement failed, the quote freed); when money may
have moved the answer is 202 settlement_pending, and the chain decides later. A settlement
transaction of ours that reverted moved nothing, but the authorization it carried stays
usable until it expires: the payment waits for the chain until then, and its payer is
refused for a while (``refuse_reverted_payer``).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from x402 import PaymentRequirements

from relay import metrics
from relay.errors import (
    ChainUnavailable,
    PaymentSettlementFailed,
    PaymentVerifyFailed,
    RelayError,
    SettlementPending,
)
from relay.facilitator import recording_broadcasts
from relay.flows.answers import Outcome, finish
from relay.flows.leases import busy, hold, moved_while_held
from relay.ledger import Conflict
from relay.payment_headers import ParsedPayment
from relay.payments import NOT_PAID, Settlement, settlement_pending
from relay.records import PaymentRecord
from relay.services import Services
from relay.states import SETTLING
from relay.states import PaymentState as P

log = logging.getLogger(__name__)

EXPIRY_MARGIN_SECONDS = 60
CANCELED = "authorization_canceled"
CREDITED_ELSEWHERE = "transfer_already_credited"
#: Facilitator reasons that say the authorization was (or may have been) used: never
#: certain failures, whatever their prefix; the chain decides.
_MAYBE_USED = ("nonce_already_used", "transfer_event")
#: The mark (the payment's ``error``) of a payment whose settlement transaction reverted.
SETTLEMENT_REVERTED = "settlement_reverted"
#: The reason a payer is refused after one of its settlements reverted.
PAYER_SETTLEMENT_REVERTED = "payer_settlement_reverted"
#: How long a contract payer is refused after its payment whose settlement reverted was
#: claimed: the revert cost the settler gas and the payer nothing; each further try now
#: needs another payer address, which costs its owner gas.
REVERTED_PAYER_SECONDS = 3600
#: Where a payment marked as reverted still stands so (it has not settled since).
_REVERT_STANDS = (P.SETTLE_PENDING, P.SETTLE_UNKNOWN, P.SETTLE_FAILED)


def refuse_reverted_payer(services: Services, payer: str) -> None:
    """402 payment_verify_failed (``payer_settlement_reverted``, Retry-After) within
    REVERTED_PAYER_SECONDS of the claim of a payment of ``payer`` marked as reverted, while
    that payment has not settled since (anyone may still submit its authorization)."""
    now = services.clock()
    since = now - REVERTED_PAYER_SECONDS
    last = services.ledger.last_marked(payer, SETTLEMENT_REVERTED, since, _REVERT_STANDS)
    if last is None:
        return
    raise PaymentVerifyFailed(
        "A settlement from this payer reverted on-chain; its payments are refused for a while.",
        details={"reason": PAYER_SETTLEMENT_REVERTED, "payer": payer},
        extra={"reason": PAYER_SETTLEMENT_REVERTED},
        retry_after=max(1, math.ceil(last + REVERTED_PAYER_SECONDS - now)),
    )


def settle(
    services: Services,
    payment: PaymentRecord,
    parsed: ParsedPayment,
    requirements: PaymentRequirements,
    *,
    first: bool = False,
) -> Settlement:
    """Settle on-chain, committing each outcome before anything else happens; the
    settlement is recorded with the move to dispatching while our lease holds
    (RequestInProgress when it was lost: the settlement is recorded for the next holder)."""
    ledger, payments = services.ledger, services.payments
    if payment.state == P.SETTLED and payment.tx_hash and payment.log_index is not None:
        found = payments.settlement_of(parsed, requirements, payment.tx_hash, payment.log_index)
        return dispatching(services, payment, found)
    try:
        settlement = attempt(services, payment, parsed, requirements, first=first)
    except SettlementPending as pending:
        tx = pending.details.get("transaction") or payment.tx_hash
        waiting = (P.SETTLING, P.SETTLE_PENDING)  # settle_unknown stays for review
        known = {"tx_hash": tx} if tx else {}  # never written over a hash recorded meanwhile
        ledger.transition(payment.id, waiting, P.SETTLE_PENDING, services.clock(), **known)
        raise
    except PaymentSettlementFailed as failed:
        raise settlement_failed(services, payment, failed) from None
    return dispatching(services, payment, settlement)


def dispatching(services: Services, payment: PaymentRecord, settlement: Settlement) -> Settlement:
    """Record the settlement with the move to dispatching, only while our lease holds (and
    renewing it); from settled too: a worker whose lease ran out may have recorded it
    meanwhile. A lease lost: the settlement recorded for its holder, RequestInProgress."""
    paid: dict[str, Any] = {"tx_hash": settlement.transaction, "log_index": settlement.log_index}
    before = (*SETTLING, P.SETTLED)
    try:
        ours = moved_while_held(services, payment, before, P.DISPATCHING, **paid)
        if not ours:
            services.ledger.transition(payment.id, before, P.SETTLED, services.clock(), **paid)
    except Conflict:
        log.warning("transfer %s already paid another payment", settlement.transaction)
        taken = PaymentSettlementFailed(
            details={"reason": CREDITED_ELSEWHERE, "transaction": settlement.transaction}
        )
        raise settlement_failed(services, payment, taken) from None
    if not ours:
        raise busy()
    return settlement


def attempt(
    services: Services,
    payment: PaymentRecord,
    parsed: ParsedPayment,
    req: PaymentRequirements,
    *,
    first: bool,
) -> Settlement:
    """Settle; after an earlier attempt, ask the chain first and never settle blindly again."""
    if first:  # verified (and simulated) by this very request a moment ago
        return broadcast(services, payment, parsed, req, verified=True)
    tx = payment.tx_hash  # the payment was read after its lease was taken
    reverted: PaymentSettlementFailed | None = None
    if tx:
        try:
            found = services.payments.confirm(parsed, req, tx)
        except PaymentSettlementFailed as failed:
            if failed.details.get("reason") == NOT_PAID:
                raise
            # Ours moved nothing of this payment (reverted, or some other call): as if
            # nothing had been sent, once the chain says the authorization is unused; a
            # revert waits for the authorization's expiry, as anyone may still use it.
            found, tx = None, None
            if services.payments.reverted(failed.details.get("transaction") or ""):
                reverted = failed
        if found is not None:
            return found
    found = chain_verdict(services, payment, parsed, req)
    if found is not None:
        return found
    if payment.state == P.SETTLE_UNKNOWN:  # a node said "used" before: never expire it
        raise settlement_pending(payment.tx_hash)
    if services.clock() > parsed.valid_before + EXPIRY_MARGIN_SECONDS:
        raise PaymentSettlementFailed(details={"reason": "expired", "transaction": tx})
    if reverted is not None:  # never broadcast again: it may revert again, at our cost
        raise reverted
    if tx:
        raise settlement_pending(tx)
    return broadcast(services, payment, parsed, req)


def broadcast(
    services: Services,
    payment: PaymentRecord,
    parsed: ParsedPayment,
    req: PaymentRequirements,
    *,
    verified: bool = False,
) -> Settlement:
    """Settle through the facilitator, storing the transaction hash before it is sent; a
    failure is checked against the chain (the authorization may have been used anyway).
    Unless ``verified`` just now, the transfer is simulated first."""

    def record(tx_hash: str, to: str) -> None:
        # The lease is renewed in the same write: a payment that another worker (or an
        # operator's forced repair) has taken over is never broadcast from here.
        if to.lower() != req.asset.lower():  # not the transfer (a wallet's deployment)
            hold(services, payment)
            return
        if not moved_while_held(
            services, payment, (P.SETTLING, P.SETTLE_PENDING), P.SETTLING, tx_hash=tx_hash
        ):
            log.warning("payment %s was taken over; this worker stops", payment.id)
            raise busy()

    if not services.payments.records_broadcasts:  # checked now, the last moment we can
        hold(services, payment)
    try:
        with recording_broadcasts(record), metrics.timed(metrics.SETTLEMENT_SECONDS):
            return services.payments.settle(parsed, req, verified=verified)
    except PaymentSettlementFailed as failed:
        try:
            found = chain_verdict(services, payment, parsed, req)
        except ChainUnavailable:  # the chain decides later; its transaction is kept meanwhile
            raise settlement_pending(failed.details.get("transaction")) from None
        if found is None:
            raise
        return found


def chain_verdict(
    services: Services, payment: PaymentRecord, parsed: ParsedPayment, req: PaymentRequirements
) -> Settlement | None:
    """What the chain did with the authorization, searched from the payment's claim block.

    Used: the Settlement if its own Transfer paid us (else a certain failure). Canceled by
    the payer: a certain failure. Used with no log found: settle_unknown, kept for review and
    never freed. Unused: None.
    """
    fate = services.payments.fate(parsed, payment.claim_block)
    if fate.state == "used" and fate.transaction is not None:
        found = services.payments.confirm(parsed, req, fate.transaction)
        if found is None:
            raise settlement_pending(fate.transaction)
        return found
    if fate.state == "canceled":
        raise PaymentSettlementFailed(details={"reason": CANCELED, "transaction": None})
    if fate.state == "unknown":
        services.ledger.transition(payment.id, SETTLING, P.SETTLE_UNKNOWN, services.clock())
        current = services.ledger.payment(payment.id) or payment
        raise settlement_pending(current.tx_hash)
    return None


def settlement_failed(
    services: Services, payment: PaymentRecord, failed: PaymentSettlementFailed
) -> RelayError:
    """A certain failure is final (402); an ambiguous one stays pending (202), and so does
    a reverted settlement while its authorization may still be used. A payment whose
    settlement transaction reverted is marked, so that its payer is refused for a while."""
    reason = str(failed.details.get("reason") or "")
    tx = failed.details.get("transaction")
    certain = (
        reason.startswith("invalid_") and not any(m in reason for m in _MAYBE_USED)
    ) or reason in ("expired", CANCELED, CREDITED_ELSEWHERE, NOT_PAID)
    mark = revert_mark(services, payment, tx)
    if not certain:
        known = {"tx_hash": tx} if tx else {}
        services.ledger.transition(
            payment.id,
            (P.SETTLING, P.SETTLE_PENDING),
            P.SETTLE_PENDING,
            services.clock(),
            **known,
            **mark,
        )
        return settlement_pending(tx)
    settle_failed(services, payment.id, failed, **mark)
    return failed


def revert_mark(services: Services, payment: PaymentRecord, tx: str | None) -> dict[str, Any]:
    """The mark of a payment whose settlement transaction (``tx``, else the one recorded
    before its broadcast) reverted, when its payer is a contract wallet: its signature
    check may pass the verify's simulation and fail on-chain at no cost to it. A payer
    without code can only make a settlement revert by spending gas of its own (a cancel,
    or moving its balance away), and is not marked. Nothing when the chain cannot say.
    (``payment`` may have been read before the broadcast: its hash is read again only
    when ``tx`` is not known.)"""
    if tx is None:
        current = services.ledger.payment(payment.id)
        tx = None if current is None else current.tx_hash
    if tx is None:
        return {}
    payments = services.payments
    try:
        if not payments.reverted(tx) or not payments.has_code(payment.payer):
            return {}
    except ChainUnavailable:
        return {}
    log.warning("settlement %s of payment %s reverted; its payer is a contract", tx, payment.id)
    return {"error": SETTLEMENT_REVERTED}


def settle_failed(services: Services, payment_id: str, failed: RelayError, **fields: Any) -> None:
    """Record a failed settlement (with ``fields``) and free the quote for another payment."""
    answer = Outcome.of_error(failed)
    released = f"released:{payment_id}"
    finish(services, payment_id, SETTLING, P.SETTLE_FAILED, answer, quote_id=released, **fields)
