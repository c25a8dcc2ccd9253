"""The order of steps of each operation; the only place it is written."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from x402 import PaymentRequirements

from relay.errors import (
    IdempotencyKeyReused,
    MessageTooLong,
    PaymentRequired,
    PaymentSettlementFailed,
    PaymentVerifyFailed,
    QuoteAlreadyUsed,
    RateLimited,
    RecipientOptedOut,
    Rejected,
    RelayError,
    RequestInProgress,
    SettlementPending,
    SinchSendFailedAfterPayment,
    Unauthorized,
)
from relay.facilitator import recording_broadcasts
from relay.inputs import MessageRequest
from relay.ledger import Conflict
from relay.moderation import Verdict
from relay.payment_headers import ParsedPayment
from relay.payments import NOT_PAID, Settlement, settlement_pending
from relay.phone import mask, normalize_destination
from relay.pricing import (
    Price,
    from_atomic,
    moderation_cost,
    quote_price,
    to_atomic,
    token_prices,
)
from relay.quote_tokens import QuoteClaims, message_sha256
from relay.refunds import SignedRefund
from relay.segments import SegmentInfo, count_segments, smart_encode, validate_text
from relay.services import Services
from relay.sinch import SmsDispatchError, compose_body
from relay.sinch_webhooks import (
    SIGNATURE_TOLERANCE_SECONDS,
    DeliveryReport,
    InboundMessage,
    opt_out_action,
    parse_callback,
    verify_signature,
)
from relay.states import (
    ANSWERED_STATES,
    SETTLING,
    UNFINISHED,
)
from relay.states import PaymentState as P
from relay.states import RefundState as R

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
    services: Services, req: MessageRequest
) -> tuple[str, str, SegmentInfo, SegmentInfo]:
    """Validate and normalise: (destination, text to send, its segments, submitted segments)."""
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
    if services.ledger.is_opted_out(to):
        raise RecipientOptedOut(details={"to": mask(to)})
    return to, text, info, original


def moderate(services: Services, text: str) -> Verdict:
    """The verdict on the text; a rejection is raised as 422 rejected."""
    verdict = services.moderator.moderate(text)
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


def quote(services: Services, req: MessageRequest, *, one_shot: bool = False) -> Quote:
    """Normalise, count, moderate, price and sign (SPEC §2 step 1).

    A quote for /api/quote charges nothing for a cached verdict. A one-shot send always
    charges the verdict's original cost, so the unpaid and the paid request agree on the price.
    """
    to, text, info, original = prepare_text(services, req)
    verdict = moderate(services, text)
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


# Paid send ---------------------------------------------------------------------------
#
# A payment's life is relay/states.py: its states and the moves each step may make.
#
# Whoever acts on a payment (the first request, a replay, the reconciler) holds its lease
# (Ledger.take); a crash leaves the lease to run out, and anyone may then take over.

IN_PROGRESS_RETRY_SECONDS = 2
EXPIRY_MARGIN_SECONDS = 60
#: Blocks below the chain's height (read before verify) where a payment's log search starts.
CLAIM_BLOCK_MARGIN = 100
#: After an unconfirmed hand-over to Sinch, how long its batch list may lag before a
#: missing batch is taken as never created and the SMS is sent.
DISPATCH_QUIET_SECONDS = 60
#: How often the reconciler searches the logs again for a settle_unknown payment.
SETTLE_UNKNOWN_RETRY_SECONDS = 600
CANCELED = "authorization_canceled"
CREDITED_ELSEWHERE = "transfer_already_credited"


@dataclass(frozen=True)
class Order:
    """What a paid request buys: one SMS of this text to this number at this price."""

    to: str
    text: str
    segments: int
    amount_atomic: int
    quote_id: str | None


@dataclass(frozen=True)
class Outcome:
    """An HTTP answer for /api/send: status, JSON body and headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str]


def order_for(services: Services, req: MessageRequest) -> Order:
    """The order a send request stands for: from its quote token, or quoted on the spot."""
    if req.quote_token is None:
        q = quote(services, req, one_shot=True)
        return Order(q.to, q.text, q.segments.segments, q.price.atomic, None)
    to = normalize_destination(req.to)
    claims = services.signer.verify(
        req.quote_token, message=req.message, to=to, now=services.clock()
    )
    if services.ledger.is_opted_out(to):
        raise RecipientOptedOut(details={"to": mask(to)})
    text = smart_encode(req.message) if claims.smart_encoding else req.message
    return Order(to, text, claims.segments, claims.price_atomic, claims.quote_id)


def limit_model_calls(services: Services, client: str) -> None:
    """QUOTE_RATE_LIMIT per client: every request that may call the model (a quote, a
    one-shot send, paid or not) and every unpaid send counts, in the shared storage."""
    wait = services.quote_limiter.hit("quote", client)
    if wait is not None:
        raise RateLimited(retry_after=wait, details={"limit": services.settings.quote_rate_limit})


def send(
    services: Services,
    req: MessageRequest,
    headers: Mapping[str, str],
    resource_url: str,
    client: str,
) -> Outcome:
    """Challenge, or verify → claim → settle → dispatch (SPEC §2, §9, §11).

    A payment seen before gets its stored answer first, even once its quote has expired;
    anything else that is unpaid or may call the model counts against the client's limit.
    """
    payments = services.payments
    parsed = payments.parse_payment(headers)
    stored = None if parsed is None else replay(services, parsed)
    if stored is not None:
        return stored
    if parsed is None or req.quote_token is None:
        limit_model_calls(services, client)
    order = order_for(services, req)
    requirements = payments.requirements(order.amount_atomic)
    if parsed is None:
        return challenge(services, requirements, order.amount_atomic, resource_url)
    if order.quote_id is not None:
        claimed = services.ledger.quote_claim(order.quote_id)
        if claimed is not None:
            if claimed["payment_key"] == parsed.payment_key:  # a copy of this very payment
                return resume(services, claimed, parsed)
            raise QuoteAlreadyUsed(details={"message_id": claimed.get("message_id")})
    payments.match(parsed, requirements, services.clock())
    # Read before verify, less a margin: a settlement (even one the payer sends itself as
    # soon as it has signed) can never be older, so its logs are searched from here.
    height = payments.block_number()
    claim_block = None if height is None else max(0, height - CLAIM_BLOCK_MARGIN)
    try:
        payer = payments.verify(parsed, requirements)
    except PaymentVerifyFailed:
        # A concurrent copy of this payment may have claimed and settled it meanwhile.
        stored = replay(services, parsed)
        if stored is not None:
            return stored
        raise
    row = claim(services, order, parsed, requirements, payer, claim_block)
    return advance(services, row, parsed, requirements, first=True)


def challenge(
    services: Services,
    requirements: PaymentRequirements,
    amount_atomic: int,
    resource_url: str,
) -> Outcome:
    """The 402: v2 PAYMENT-REQUIRED header, v1 accepts and the reference's fields in the body."""
    price = from_atomic(amount_atomic)
    header, v1 = services.payments.challenge(
        requirements,
        resource_url=resource_url,
        description=f"One SMS, moderated and sent via Sinch: {price} USDC",
        error="Payment required",
    )
    body = PaymentRequired(
        details={"amount_atomic": str(amount_atomic)},
        extra={
            "protocol": "x402",
            "price_usd": price,
            "how_to_pay": HOW_TO_PAY,
            **v1,
        },
    ).body()
    return Outcome(402, body, {"PAYMENT-REQUIRED": header})


HOW_TO_PAY = (
    "Resubmit POST /api/send with the same body and a PAYMENT-SIGNATURE (x402 v2) or "
    "X-PAYMENT (v1) header signed for the requested amount."
)


def replay(services: Services, parsed: ParsedPayment) -> Outcome | None:
    """The answer for a payment seen before, or None for a new one."""
    row = services.ledger.payment_by_key(parsed.payment_key)
    if row is None:
        if parsed.payment_identifier is not None:
            other = services.ledger.payment_by_identifier(parsed.payment_identifier)
            if other is not None:
                raise IdempotencyKeyReused(
                    details={"payment_identifier": other["payment_identifier"]}
                )
        return None
    return resume(services, row, parsed)


def resume(services: Services, row: dict[str, Any], parsed: ParsedPayment) -> Outcome:
    """Report a payment already in the ledger, or continue it when nobody else is."""
    if row["response_status"] is not None and row["state"] in ANSWERED_STATES:
        return stored_answer(row)
    holder = services.ledger.take(row["id"], services.clock(), lease_seconds(services))
    if holder is None:
        if row["state"] in (P.SETTLE_PENDING, P.SETTLE_UNKNOWN):
            raise settlement_pending(row["tx_hash"])
        raise RequestInProgress(
            retry_after=IN_PROGRESS_RETRY_SECONDS, details={"state": row["state"]}
        )
    current = services.ledger.payment(row["id"]) or row
    requirements = PaymentRequirements.model_validate(current["requirements"])
    return advance(services, {**current, "lease_holder": holder}, parsed, requirements)


def stored_answer(row: dict[str, Any]) -> Outcome:
    """The answer stored with a payment's final state."""
    return Outcome(row["response_status"], row["response_body"], row["response_headers"] or {})


def legacy_answer(row: dict[str, Any]) -> Outcome:
    """The answer of a finished payment stored before answers were kept with it."""
    if row["state"] == P.DISPATCHED:
        return Outcome(200, sent_body(row, row["message_id"], row["tx_hash"]), {})
    if row["state"] == P.REFUNDED:
        error: RelayError = failed_after_payment(row["tx_hash"], row["id"])
    else:
        error = PaymentSettlementFailed(details={"reason": "settlement_failed"})
    return Outcome(error.status, error.body(), error.response_headers())


def lease_seconds(services: Services) -> float:
    """How long one holder may act on a payment before others may take it over: longer
    than any one step (Settings checks RECONCILE_AFTER_SECONDS against the settlement wait
    and Sinch's retries), and renewed before each."""
    return services.settings.reconcile_after_seconds


def hold(services: Services, row: dict[str, Any]) -> None:
    """Renew our lease before a step with an outside effect; RequestInProgress (and no
    effect) if another worker has taken the payment over."""
    now = services.clock()
    if not services.ledger.renew(row["id"], row["lease_holder"], now, lease_seconds(services)):
        log.warning("payment %s was taken over; this worker stops", row["id"])
        raise RequestInProgress(retry_after=IN_PROGRESS_RETRY_SECONDS)


def claim(
    services: Services,
    order: Order,
    parsed: ParsedPayment,
    requirements: PaymentRequirements,
    payer: str,
    claim_block: int | None,
) -> dict[str, Any]:
    """Claim quote, authorization and identifier in one insert, leased to this request."""
    now = services.clock()
    row: dict[str, Any] = {
        "id": secrets.token_hex(12),
        "payment_key": parsed.payment_key,
        "payment_identifier": parsed.payment_identifier,
        "quote_id": order.quote_id or f"auth:{payer}:{parsed.nonce}",
        "payer": payer,
        "nonce": parsed.nonce,
        "amount_atomic": order.amount_atomic,
        "network": services.settings.x402_network,
        "asset": requirements.asset,
        "pay_to": requirements.pay_to,
        "destination": order.to,
        "segments": order.segments,
        "body": order.text,
        "version": parsed.version,
        "state": P.SETTLING,
        "payload": parsed.as_dict(),
        "header": parsed.header,
        "requirements": requirements.model_dump(mode="json", by_alias=True),
        "claim_block": claim_block,
        "tx_hash": None,
        "log_index": None,
        "message_id": None,
        "error": None,
        "response_status": None,
        "response_body": None,
        "response_headers": None,
        "lease_until": now + lease_seconds(services),
        "lease_holder": secrets.token_hex(8),
        "created_at": now,
        "updated_at": now,
    }
    try:
        services.ledger.claim_payment(row)
    except Conflict as conflict:
        raise claim_error(conflict, parsed) from None
    return row


def claim_error(conflict: Conflict, parsed: ParsedPayment) -> RelayError:
    """Why a claim lost: the same payment running, a reused identifier, or a used quote."""
    existing = conflict.existing or {}
    if conflict.kind == "same_payment":
        return RequestInProgress(retry_after=IN_PROGRESS_RETRY_SECONDS)
    if conflict.kind == "identifier":
        return IdempotencyKeyReused(details={"payment_identifier": parsed.payment_identifier})
    if conflict.kind == "authorization":
        return PaymentVerifyFailed(
            "This authorization was already used for another request.",
            details={"reason": "authorization_already_used"},
            extra={"reason": "authorization_already_used"},
        )
    return QuoteAlreadyUsed(details={"message_id": existing.get("message_id")})


def advance(
    services: Services,
    row: dict[str, Any],
    parsed: ParsedPayment,
    requirements: PaymentRequirements,
    *,
    first: bool = False,
) -> Outcome:
    """Drive a payment whose lease we hold from its state to its end; the lease is given up
    whatever happens, so that the next retry or repair can act at once."""
    try:
        return drive(services, row, parsed, requirements, first=first)
    finally:
        services.ledger.release(row["id"], row["lease_holder"])


def drive(
    services: Services,
    row: dict[str, Any],
    parsed: ParsedPayment,
    requirements: PaymentRequirements,
    *,
    first: bool,
) -> Outcome:
    """One payment from its current state as far as it can go now (we hold its lease)."""
    state = row["state"]
    if state in (P.DISPATCHING, P.DISPATCH_UNKNOWN):
        return redispatch(services, row, parsed, requirements)
    if state == P.DISPATCH_FAILED:
        return finish_refund(services, row, parsed, requirements)
    if state not in (*SETTLING, P.SETTLED):
        return stored_answer(row) if row["response_status"] is not None else legacy_answer(row)
    settlement = settle(services, row, parsed, requirements, first=first)
    moved = services.ledger.transition(  # only while the lease is still ours
        row["id"], (P.SETTLED,), P.DISPATCHING, services.clock(), holder=row["lease_holder"]
    )
    if not moved:
        raise RequestInProgress(retry_after=IN_PROGRESS_RETRY_SECONDS)
    return dispatch(services, row, parsed, settlement)


def settle(
    services: Services,
    row: dict[str, Any],
    parsed: ParsedPayment,
    requirements: PaymentRequirements,
    *,
    first: bool = False,
) -> Settlement:
    """Settle on-chain, committing each outcome before anything else happens.

    Only a certain failure is final (402 settlement failed, the quote freed); when money may
    have moved the answer is 202 settlement_pending, and the chain decides later.
    """
    ledger, payments, payment_id = services.ledger, services.payments, row["id"]
    if row["state"] == P.SETTLED and row["tx_hash"] and row["log_index"] is not None:
        return payments.settlement_of(parsed, requirements, row["tx_hash"], row["log_index"])
    try:
        settlement = attempt(services, row, parsed, requirements, first=first)
    except SettlementPending as pending:
        tx = pending.details.get("transaction") or row.get("tx_hash")
        waiting = (P.SETTLING, P.SETTLE_PENDING)  # settle_unknown stays for review
        ledger.transition(payment_id, waiting, P.SETTLE_PENDING, services.clock(), tx_hash=tx)
        raise
    except PaymentSettlementFailed as failed:
        raise settlement_failed(services, payment_id, failed) from None
    try:
        recorded = ledger.transition(
            payment_id,
            (*SETTLING, P.SETTLED),
            P.SETTLED,
            services.clock(),
            tx_hash=settlement.transaction,
            log_index=settlement.log_index,
        )
    except Conflict:
        log.warning("transfer %s already paid another payment", settlement.transaction)
        taken = PaymentSettlementFailed(
            details={"reason": CREDITED_ELSEWHERE, "transaction": settlement.transaction}
        )
        raise settlement_failed(services, payment_id, taken) from None
    if not recorded:  # another worker moved it on (e.g. a forced repair)
        raise RequestInProgress(retry_after=IN_PROGRESS_RETRY_SECONDS)
    return settlement


def attempt(
    services: Services,
    row: dict[str, Any],
    parsed: ParsedPayment,
    req: PaymentRequirements,
    *,
    first: bool,
) -> Settlement:
    """Settle; after an earlier attempt, ask the chain first and never settle blindly again."""
    if first:
        return broadcast(services, row, parsed, req)
    tx = row["tx_hash"]  # the row was read after its lease was taken
    reverted: PaymentSettlementFailed | None = None
    if tx:
        try:
            found = services.payments.confirm(parsed, req, tx)
        except PaymentSettlementFailed as failed:
            if failed.details.get("reason") == NOT_PAID:
                raise
            # Ours moved nothing of this payment (reverted, or some other call): as if
            # nothing had been sent, once the chain says the authorization is unused.
            found, tx = None, None
            if services.payments.reverted(failed.details.get("transaction") or ""):
                reverted = failed
        if found is not None:
            return found
    found = chain_verdict(services, row, parsed, req)
    if found is not None:
        return found
    if reverted is not None:
        raise reverted
    if row["state"] == P.SETTLE_UNKNOWN:  # a node said "used" before: never expire it
        raise settlement_pending(row["tx_hash"])
    if services.clock() > parsed.valid_before + EXPIRY_MARGIN_SECONDS:
        raise PaymentSettlementFailed(details={"reason": "expired", "transaction": tx})
    if tx:
        raise settlement_pending(tx)
    return broadcast(services, row, parsed, req)


def broadcast(
    services: Services, row: dict[str, Any], parsed: ParsedPayment, req: PaymentRequirements
) -> Settlement:
    """Settle through the facilitator, storing the transaction hash before it is sent; a
    failure is checked against the chain (the authorization may have been used anyway)."""
    payment_id = row["id"]

    def record(tx_hash: str, to: str) -> None:
        if to.lower() == req.asset.lower():  # not, e.g., a smart wallet's deployment
            services.ledger.transition(
                payment_id,
                (P.SETTLING, P.SETTLE_PENDING),
                P.SETTLING,
                services.clock(),
                tx_hash=tx_hash,
            )

    hold(services, row)
    try:
        with recording_broadcasts(record):
            return services.payments.settle(parsed, req)
    except PaymentSettlementFailed:
        found = chain_verdict(services, row, parsed, req)
        if found is None:
            raise
        return found


def chain_verdict(
    services: Services, row: dict[str, Any], parsed: ParsedPayment, req: PaymentRequirements
) -> Settlement | None:
    """What the chain did with the authorization, searched from the payment's claim block.

    Used: the Settlement if its own Transfer paid us (else a certain failure). Canceled by
    the payer: a certain failure. Used with no log found: settle_unknown, kept for review and
    never freed. Unused: None.
    """
    fate = services.payments.fate(parsed, row["claim_block"])
    if fate.state == "used" and fate.transaction is not None:
        found = services.payments.confirm(parsed, req, fate.transaction)
        if found is None:
            raise settlement_pending(fate.transaction)
        return found
    if fate.state == "canceled":
        raise PaymentSettlementFailed(details={"reason": CANCELED, "transaction": None})
    if fate.state == "unknown":
        services.ledger.transition(row["id"], SETTLING, P.SETTLE_UNKNOWN, services.clock())
        current = services.ledger.payment(row["id"]) or row
        raise settlement_pending(current["tx_hash"])
    return None


#: Facilitator reasons that say the authorization was (or may have been) used: never
#: certain failures, whatever their prefix; the chain decides.
_MAYBE_USED = ("nonce_already_used", "transfer_event")


def settlement_failed(
    services: Services, payment_id: str, failed: PaymentSettlementFailed
) -> RelayError:
    """A certain failure is final (402); an ambiguous one stays pending (202)."""
    reason = str(failed.details.get("reason") or "")
    tx = failed.details.get("transaction")
    certain = (
        (reason.startswith("invalid_") and not any(m in reason for m in _MAYBE_USED))
        or reason in ("expired", CANCELED, CREDITED_ELSEWHERE, NOT_PAID)
        or (tx is not None and services.payments.reverted(tx))
    )
    if not certain:
        known = {"tx_hash": tx} if tx else {}
        services.ledger.transition(
            payment_id, (P.SETTLING, P.SETTLE_PENDING), P.SETTLE_PENDING, services.clock(), **known
        )
        return settlement_pending(tx)
    settle_failed(services, payment_id, failed)
    return failed


def dispatch(
    services: Services, row: dict[str, Any], parsed: ParsedPayment, settlement: Settlement
) -> Outcome:
    """Hand the paid SMS to the provider; answer 200, or 502 with the refund."""
    body_text = compose_body(row["body"], services.settings.opt_out_line)
    try:
        sent = services.sms.send(
            row["destination"], body_text, row["id"], keep_alive=lambda: hold(services, row)
        )
    except SmsDispatchError as exc:
        return dispatch_failed(services, row, settlement, exc)
    return dispatched(services, row, sent.message_id, sent.provider, settlement)


def redispatch(
    services: Services, row: dict[str, Any], parsed: ParsedPayment, req: PaymentRequirements
) -> Outcome:
    """After a crash or an unconfirmed hand-over: find the message the provider may hold
    (searching from the payment's creation) and send only when it certainly holds none,
    and only once its batch list has had DISPATCH_QUIET_SECONDS to catch up. A provider
    that cannot be asked leaves the payment as it is, never sent twice."""
    settlement = services.payments.settlement_of(parsed, req, row["tx_hash"], row["log_index"])
    try:
        sent = services.sms.lookup(row["id"], since=float(row["created_at"]))
    except SmsDispatchError as exc:
        raise not_confirmed(settlement) from exc
    if sent is not None:
        return dispatched(services, row, sent.message_id, sent.provider, settlement)
    if services.clock() - float(row["updated_at"]) < DISPATCH_QUIET_SECONDS:
        raise not_confirmed(settlement)
    sending = (P.DISPATCHING, P.DISPATCH_UNKNOWN)  # only while the lease is still ours
    now = services.clock()
    if not services.ledger.transition(
        row["id"], sending, P.DISPATCHING, now, holder=row["lease_holder"]
    ):
        raise RequestInProgress(retry_after=IN_PROGRESS_RETRY_SECONDS)
    return dispatch(services, row, parsed, settlement)


def not_confirmed(settlement: Settlement) -> SinchSendFailedAfterPayment:
    """502: the provider could not confirm the message yet; it will be reconciled."""
    return SinchSendFailedAfterPayment(
        "The SMS provider could not confirm the message; it will be reconciled.",
        details={"transaction": settlement.transaction, "status": "unknown"},
        extra={"transaction": settlement.transaction, "refund": None},
    )


def dispatched(
    services: Services, row: dict[str, Any], message_id: str, provider: str, settlement: Settlement
) -> Outcome:
    """Record the accepted message and store the 200 that every replay will get."""
    now = services.clock()
    services.ledger.record_message(message_row(row, message_id, provider, "queued", now))
    log.info(
        "sent %s message_id=%s tx=%s", mask(row["destination"]), message_id, settlement.transaction
    )
    body = sent_body(row, message_id, settlement.transaction)
    outcome = Outcome(200, body, payment_headers(services, settlement, row["version"]))
    states = (P.DISPATCHING, P.DISPATCH_UNKNOWN)
    return finish(services, row["id"], states, P.DISPATCHED, outcome, message_id=message_id)


def sent_body(row: dict[str, Any], message_id: str, transaction: str) -> dict[str, Any]:
    """The 200 of a paid send: the message handed to the provider."""
    return {
        "sent": True,
        "message_id": message_id,
        "status": "queued",
        "to": row["destination"],
        "segments": row["segments"],
        "price_usd": from_atomic(row["amount_atomic"]),
        "paid_by": row["payer"],
        "transaction": transaction,
    }


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


def message_row(
    payment: dict[str, Any], message_id: str, provider: str, status: str, now: float
) -> dict[str, Any]:
    """A messages row for a payment."""
    return {
        "message_id": message_id,
        "payment_id": payment["id"],
        "destination": payment["destination"],
        "segments": payment["segments"],
        "status": status,
        "provider": provider,
        "created_at": now,
        "updated_at": now,
    }


def dispatch_failed(
    services: Services,
    row: dict[str, Any],
    settlement: Settlement,
    exc: SmsDispatchError,
) -> Outcome:
    """The provider refused after payment: record it, refund if we can, answer 502."""
    ledger, payment_id = services.ledger, row["id"]
    payment_header = payment_headers(services, settlement, row["version"])
    log.warning("dispatch failed after payment %s: %s", payment_id, exc.message)
    holder = row["lease_holder"]
    if exc.maybe_sent:
        error = not_confirmed(settlement)
        ledger.transition(
            payment_id, (P.DISPATCHING,), P.DISPATCH_UNKNOWN, services.clock(), holder=holder
        )
        return Outcome(error.status, error.body(), payment_header)
    if not ledger.transition(
        payment_id,
        (P.DISPATCHING,),
        P.DISPATCH_FAILED,
        services.clock(),
        holder=holder,
        error=exc.message[:200],
    ):
        raise RequestInProgress(retry_after=IN_PROGRESS_RETRY_SECONDS)
    ledger.record_message(message_row(row, payment_id, "none", "failed", services.clock()))
    error = failed_after_payment(settlement.transaction, payment_id, provider_status=exc.status)
    return refunded_answer(services, row, Outcome(error.status, error.body(), payment_header))


def finish_refund(
    services: Services, row: dict[str, Any], parsed: ParsedPayment, req: PaymentRequirements
) -> Outcome:
    """Finish a refund that a crash, an outage or a slow chain left unconfirmed, and update
    the stored answer so that a replay reports it."""
    if row["response_status"] is not None:
        return refunded_answer(services, row, stored_answer(row))
    settlement = services.payments.settlement_of(parsed, req, row["tx_hash"], row["log_index"])
    error = failed_after_payment(settlement.transaction, row["id"])
    header = payment_headers(services, settlement, parsed.version)
    return refunded_answer(services, row, Outcome(error.status, error.body(), header))


def refunded_answer(services: Services, row: dict[str, Any], outcome: Outcome) -> Outcome:
    """Refund the payment (if a refund key is set) and store the 502 with the refund."""
    refund = refund_payment(services, row)
    body = dict(outcome.body)
    body["refund"] = refund
    body["details"] = {**(body.get("details") or {}), "refund": refund}
    state = P.REFUNDED if refund and refund["state"] == R.CONFIRMED else P.DISPATCH_FAILED
    answer = Outcome(outcome.status, body, outcome.headers)
    return finish(services, row["id"], (P.DISPATCH_FAILED,), state, answer)


def refund_payment(services: Services, row: dict[str, Any]) -> dict[str, Any] | None:
    """Send the payer's USDC back when a refund key is configured; the refund's summary.

    The signed transaction is recorded before it is broadcast, so a retry after a crash or
    a lost answer re-sends that same transaction; a new one is signed only when the chain
    shows the old one can never be mined (reverted, or its nonce long taken by another),
    and the swap is a compare-and-set, so two workers never both sign one: a payment is
    refunded at most once.
    """
    if services.refunder is None:
        return None
    payment_id = row["id"]
    record = services.ledger.refund(payment_id)
    for _ in range(2):
        if record is None or record["state"] in (R.REVERTED, R.REPLACED, R.FAILED):
            record = new_refund(services, row, record)
        if record["state"] in (R.CONFIRMED, R.FAILED):
            break
        hold(services, row)
        signed = SignedRefund(record["tx_hash"], record["raw_tx"], record["nonce"])
        state = services.refunder.send(signed)
        services.ledger.update_refund(
            payment_id,
            record["tx_hash"],
            record["state"],
            state=state,
            updated_at=services.clock(),
        )
        record = services.ledger.refund(payment_id) or record
        if record["state"] != R.REPLACED:
            break
    assert record is not None
    if record["state"] == R.CONFIRMED:
        services.ledger.update_message_status(payment_id, P.REFUNDED, record["updated_at"])
    return {
        "transaction": record["tx_hash"],
        "amount_atomic": str(row["amount_atomic"]),
        "state": record["state"],
    }


def new_refund(
    services: Services, row: dict[str, Any], replacing: dict[str, Any] | None
) -> dict[str, Any]:
    """Sign a refund and record it (state "signed", or "failed" when it cannot be signed)
    before anything is broadcast, in place of ``replacing`` if given; the record that won
    (ours, or another worker's that got there first)."""
    assert services.refunder is not None
    now = services.clock()
    hold(services, row)
    try:
        signed = services.refunder.sign(row["payer"], row["amount_atomic"])
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
        services.ledger.create_refund(
            {
                "payment_id": row["id"],
                "amount_atomic": row["amount_atomic"],
                "created_at": now,
                "updated_at": now,
                **fields,
            }
        )
    else:
        services.ledger.update_refund(
            row["id"], replacing["tx_hash"], replacing["state"], updated_at=now, **fields
        )
    found = services.ledger.refund(row["id"])
    assert found is not None
    return found


def finish(
    services: Services,
    payment_id: str,
    from_states: tuple[str, ...],
    state: str,
    outcome: Outcome,
    **fields: Any,
) -> Outcome:
    """Store the final answer with the final state; the stored answer is replayed after."""
    services.ledger.transition(
        payment_id,
        from_states,
        state,
        services.clock(),
        response_status=outcome.status,
        response_body=outcome.body,
        response_headers=outcome.headers,
        body=None,
        **fields,
    )
    return outcome


def settle_failed(services: Services, payment_id: str, failed: RelayError) -> None:
    """Record a failed settlement and free the quote for another payment."""
    finish(
        services,
        payment_id,
        SETTLING,
        P.SETTLE_FAILED,
        Outcome(failed.status, failed.body(), failed.response_headers()),
        quote_id=f"released:{payment_id}",
    )


def probe(services: Services, resource_url: str) -> Outcome:
    """A bare POST /api/send: a 402 at the one-segment price, describing the price rule."""
    settings = services.settings
    per_segment = to_atomic(settings.price_per_segment_usd)
    outcome = challenge(
        services, services.payments.requirements(per_segment), per_segment, resource_url
    )
    outcome.body["price_rule"] = {
        "per_segment_usd": settings.price_per_segment_usd,
        "plus": "the moderation call's token cost",
        "max_segments": settings.max_segments,
        "how_to_quote": "POST /api/quote {message, to}, or POST /api/send {message, to}",
    }
    return outcome


def message_status(services: Services, message_id: str) -> dict[str, Any] | None:
    """The status document of GET /api/messages/{id}."""
    message = services.ledger.message(message_id)
    if message is None:
        return None
    payment = services.ledger.payment(message["payment_id"]) or {}
    refund = services.ledger.refund(message["payment_id"])
    return {
        "message_id": message_id,
        "status": message["status"],
        "to": mask(message["destination"]),
        "segments": message["segments"],
        "provider": message["provider"],
        "created_at": message["created_at"],
        "updated_at": message["updated_at"],
        "events": message["events"],
        "payment": {
            "payer": payment.get("payer"),
            "amount_atomic": str(payment.get("amount_atomic")),
            "price_usd": from_atomic(int(payment.get("amount_atomic") or 0)),
            "network": payment.get("network"),
            "transaction": payment.get("tx_hash"),
            "state": payment.get("state"),
        },
        "refund": None
        if refund is None
        else {
            "transaction": refund["tx_hash"],
            "amount_atomic": str(refund["amount_atomic"]),
            "state": refund["state"],
        },
    }


def sinch_callback(
    services: Services, payload: dict[str, Any], raw: bytes, headers: Mapping[str, str]
) -> bool:
    """Apply a Sinch delivery report or inbound text; False for a replay of a signed call
    already applied (acknowledged, not applied twice)."""
    signing = services.settings.sinch_signing_secret
    now = services.clock()
    if signing:
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
    apply_callback(services, payload, now)
    return True


def apply_callback(services: Services, payload: dict[str, Any], now: float) -> None:
    """A delivery report's status, or an inbound STOP/START."""
    event = parse_callback(payload)
    if isinstance(event, DeliveryReport):
        services.ledger.update_message_status(
            event.batch_id, event.status, now, event.provider_status
        )
    elif isinstance(event, InboundMessage):
        action = opt_out_action(event.body)
        if action is not None:
            services.ledger.set_opt_out(event.sender, action == "stop", now)
            log.info("opt-%s from %s", "out" if action == "stop" else "in", mask(event.sender))


# Reconciliation ----------------------------------------------------------------------


def reconcile(
    services: Services,
    *,
    force: bool = False,
    progress: Callable[[str, str], None] | None = None,
    still_elected: Callable[[], bool] | None = None,
) -> dict[str, str]:
    """Finish every unfinished payment nobody holds, from the chain's truth: settle,
    dispatch or refund (SPEC §11). ``force`` ignores leases (only with nothing else running);
    ``still_elected`` is asked before each payment (the worker renews its own lease).
    """
    results: dict[str, str] = {}
    now = services.clock()
    for row in services.ledger.unfinished_payments(UNFINISHED):
        if row["state"] == P.DISPATCH_FAILED and services.refunder is None:
            continue  # nothing to do without a refund key
        lease = row["lease_until"]
        if not force and lease is not None and lease > now:
            continue
        if (
            not force
            and row["state"] == P.SETTLE_UNKNOWN
            and now - float(row["updated_at"]) < SETTLE_UNKNOWN_RETRY_SECONDS
        ):
            continue  # a full log search each time: now and then is enough
        if still_elected is not None and not still_elected():
            break
        try:
            results[row["id"]] = repair(services, row, force=force)
        except Exception:  # one broken payment must not stop the others being finished
            log.exception("reconciling payment %s failed", row["id"])
            results[row["id"]] = "error"
        if progress is not None:
            progress(row["id"], results[row["id"]])
    return results


def repair(services: Services, row: dict[str, Any], *, force: bool = False) -> str:
    """Take over one payment and drive it as far as it goes now; the state it reached."""
    ledger = services.ledger
    holder = ledger.take(row["id"], services.clock(), lease_seconds(services), force=force)
    if holder is None:
        return "busy"
    current = {**(ledger.payment(row["id"]) or row), "lease_holder": holder}
    try:
        parsed = services.payments.stored(stored_header(current), current["version"])
        requirements = PaymentRequirements.model_validate(current["requirements"])
        advance(services, current, parsed, requirements)
    except RelayError as exc:
        log.info("payment %s not finished yet: %s", row["id"], exc.code)
    except SmsDispatchError as exc:
        log.info("payment %s not finished yet: %s", row["id"], exc.message)
    finally:
        ledger.release(row["id"], holder)
    return str((ledger.payment(row["id"]) or {}).get("state"))


def stored_header(row: dict[str, Any]) -> str:
    """The payment header as received (rows from before it was kept: re-encoded payload)."""
    if row.get("header"):
        return str(row["header"])
    return base64.b64encode(json.dumps(row["payload"], default=str).encode()).decode()
