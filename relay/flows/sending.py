"""A paid /api/send: challenge, or verify → claim → drive the payment to its end (SPEC §2, §9).

A payment's life is relay/states.py: its states and the moves each step may make. `STEPS`
below says which step carries a payment on from each unfinished state; the first request,
a replay of it and the reconciler all go through `advance`.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from x402 import PaymentRequirements

from relay.callbacks import new_secret
from relay.chain import chain_unavailable
from relay.errors import (
    IdempotencyKeyReused,
    PaymentVerifyFailed,
    QuoteAlreadyUsed,
    RelayError,
)
from relay.flows.answers import Outcome, challenge, stored_answer
from relay.flows.dispatching import dispatch, redispatch
from relay.flows.leases import busy, lease_seconds
from relay.flows.quoting import limit_model_calls, quote, refuse_opted_out
from relay.flows.refunding import finish_refund
from relay.flows.settling import refuse_reverted_payer, settle
from relay.inputs import MessageRequest
from relay.ledger import Conflict
from relay.payment_headers import ParsedPayment
from relay.payments import settlement_pending
from relay.phone import normalize_destination
from relay.records import PaymentRecord
from relay.segments import smart_encode
from relay.services import Services
from relay.states import ANSWERED_STATES, INITIAL, SETTLING
from relay.states import PaymentState as P
from relay.wire import SendRequest

#: Blocks below the chain's height (read before verify) where a payment's log search starts.
CLAIM_BLOCK_MARGIN = 100


@dataclass(frozen=True)
class Order:
    """What a paid request buys: one SMS of this text to this number at this price."""

    to: str
    text: str
    segments: int
    amount_atomic: int
    quote_id: str | None


def send(
    services: Services,
    req: MessageRequest,
    headers: Mapping[str, str],
    resource_url: str,
    client: str,
) -> Outcome:
    """Challenge, or verify → claim → settle → dispatch.

    A payment seen before gets its stored answer first, even once its quote has expired;
    a request without a quote token (it may call the model, paid or not) counts against
    the client's limit. The 402 of a quoted send calls no model: its verdict is in the
    token, and its answer is built once.
    """
    payments = services.payments
    parsed = payments.parse_payment(headers)
    stored = None if parsed is None else replay(services, parsed, req)
    if stored is not None:
        return stored
    if parsed is not None:
        refuse_reverted_payer(services, parsed.payer)
    if req.quote_token is None:
        limit_model_calls(services, client)
    order = order_for(services, req, paying=parsed is not None)
    if isinstance(req, SendRequest) and req.callback_url is not None:
        services.callbacks.policy.check(req.callback_url)  # refused before anything is paid
    requirements = payments.requirements(order.amount_atomic)
    if parsed is None:
        return challenge(services, requirements, order.amount_atomic, resource_url)
    if order.quote_id is not None:
        claimed = services.ledger.quote_claim(order.quote_id)
        if claimed is not None:
            if claimed.payment_key == parsed.payment_key:  # a copy of this very payment
                return resume(services, claimed, parsed)
            raise QuoteAlreadyUsed(details={"message_id": claimed.message_id})
    payments.match(parsed, requirements, services.clock())
    # Read before verify, less a margin: a settlement (even one the payer sends itself as
    # soon as it has signed) can never be older, so its logs are searched from here.
    height = payments.block_number()
    if height is None:  # a payment is claimed with the height its settlement is searched from
        raise chain_unavailable()
    claim_block = max(0, height - CLAIM_BLOCK_MARGIN)
    try:
        payer = payments.verify(parsed, requirements)
    except PaymentVerifyFailed:
        # A concurrent copy of this payment may have claimed and settled it meanwhile.
        stored = replay(services, parsed, req)
        if stored is not None:
            return stored
        raise
    payment = claim(services, order, parsed, requirements, payer, claim_block, req)
    return advance(services, payment, parsed, requirements, first=True)


def order_for(services: Services, req: MessageRequest, *, paying: bool) -> Order:
    """The order a send request stands for: from its quote token, or quoted on the spot."""
    if req.quote_token is None:
        q = quote(services, req, one_shot=True, paying=paying)
        return Order(q.to, q.text, q.segments.segments, q.price.atomic, None)
    to = normalize_destination(req.to)
    claims = services.signer.verify(
        req.quote_token, message=req.message, to=to, now=services.clock()
    )
    refuse_opted_out(services, to, paying=paying)
    text = smart_encode(req.message) if claims.smart_encoding else req.message
    return Order(to, text, claims.segments, claims.price_atomic, claims.quote_id)


def replay(services: Services, parsed: ParsedPayment, req: MessageRequest) -> Outcome | None:
    """The answer for a payment seen before, or None for a new one. Only a request for the
    destination and message it paid for gets it: the payment's payload is public on-chain
    once settled, and its answer holds the full number and the callback's secret."""
    payment = services.ledger.payment_by_key(parsed.payment_key)
    if payment is None:
        if parsed.payment_identifier is not None:
            other = services.ledger.payment_by_identifier(parsed.payment_identifier)
            if other is not None:
                raise IdempotencyKeyReused(details={"payment_identifier": other.payment_identifier})
        return None
    asked = request_sha256(normalize_destination(req.to), req.message)
    if payment.request_sha256 is not None and payment.request_sha256 != asked:
        raise authorization_used()
    return resume(services, payment, parsed)


def request_sha256(to: str, message: str) -> str:
    """SHA-256 of a normalised destination and a message, as a payment keeps them."""
    return hashlib.sha256(f"{to}\n{message}".encode()).hexdigest()


def resume(services: Services, payment: PaymentRecord, parsed: ParsedPayment) -> Outcome:
    """Report a payment already in the ledger, or continue it when nobody else is."""
    if payment.response_status is not None and payment.state in ANSWERED_STATES:
        return stored_answer(payment)
    holder = services.ledger.take(payment.id, services.clock(), lease_seconds(services))
    if holder is None:
        if payment.state in (P.SETTLE_PENDING, P.SETTLE_UNKNOWN):
            raise settlement_pending(payment.tx_hash)
        raise busy(state=payment.state)
    current = (services.ledger.payment(payment.id) or payment).held_by(holder)
    requirements = PaymentRequirements.model_validate(current.requirements)
    return advance(services, current, parsed, requirements)


def claim(
    services: Services,
    order: Order,
    parsed: ParsedPayment,
    requirements: PaymentRequirements,
    payer: str,
    claim_block: int | None,
    req: MessageRequest,
) -> PaymentRecord:
    """Claim quote, authorization and identifier in one insert, leased to this request."""
    now = services.clock()
    callback_url = req.callback_url if isinstance(req, SendRequest) else None
    payment = PaymentRecord(
        id=secrets.token_hex(12),
        payment_key=parsed.payment_key,
        payment_identifier=parsed.payment_identifier,
        quote_id=order.quote_id or f"auth:{payer}:{parsed.nonce}",
        payer=payer,
        nonce=parsed.nonce,
        amount_atomic=order.amount_atomic,
        network=services.settings.x402_network,
        asset=requirements.asset,
        pay_to=requirements.pay_to,
        destination=order.to,
        segments=order.segments,
        body=order.text,
        version=parsed.version,
        state=INITIAL,
        payload=parsed.as_dict(),
        header=parsed.header,
        requirements=requirements.model_dump(mode="json", by_alias=True),
        claim_block=claim_block,
        tx_hash=None,
        log_index=None,
        lease_until=now + lease_seconds(services),
        lease_holder=secrets.token_hex(8),
        callback_url=callback_url,
        callback_secret=None if callback_url is None else new_secret(),
        message_id=None,
        error=None,
        response_status=None,
        response_body=None,
        response_headers=None,
        created_at=now,
        updated_at=now,
        request_sha256=request_sha256(order.to, req.message),
    )
    try:
        services.ledger.claim_payment(payment)
    except Conflict as conflict:
        raise claim_error(conflict, parsed) from None
    return payment


def claim_error(conflict: Conflict, parsed: ParsedPayment) -> RelayError:
    """Why a claim lost: the same payment running, a reused identifier, or a used quote."""
    if conflict.kind == "same_payment":
        return busy()
    if conflict.kind == "identifier":
        return IdempotencyKeyReused(details={"payment_identifier": parsed.payment_identifier})
    if conflict.kind == "authorization":
        return authorization_used()
    existing = conflict.existing
    return QuoteAlreadyUsed(details={"message_id": existing and existing.message_id})


def authorization_used() -> PaymentVerifyFailed:
    """402: this authorization paid (or pays) for another request."""
    return PaymentVerifyFailed(
        "This authorization was already used for another request.",
        details={"reason": "authorization_already_used"},
        extra={"reason": "authorization_already_used"},
    )


def advance(
    services: Services,
    payment: PaymentRecord,
    parsed: ParsedPayment,
    requirements: PaymentRequirements,
    *,
    first: bool = False,
) -> Outcome:
    """Drive a payment whose lease we hold from its state as far as it can go now; the lease
    is given up whatever happens, so that the next retry or repair can act at once."""
    try:
        step = STEPS.get(payment.state)
        if step is None:  # final: nothing is left to do
            return stored_answer(payment)
        return step(services, payment, parsed, requirements, first)
    finally:
        services.ledger.release(payment.id, payment.holder)


def settle_and_dispatch(
    services: Services,
    payment: PaymentRecord,
    parsed: ParsedPayment,
    requirements: PaymentRequirements,
    first: bool,
) -> Outcome:
    """Settle (or find the settlement), then hand the SMS over."""
    settlement = settle(services, payment, parsed, requirements, first=first)
    return dispatch(services, payment, settlement)


def dispatch_again(
    services: Services,
    payment: PaymentRecord,
    parsed: ParsedPayment,
    requirements: PaymentRequirements,
    first: bool,
) -> Outcome:
    """A hand-over that crashed or was not confirmed: look before sending."""
    return redispatch(services, payment, parsed, requirements)


def refund(
    services: Services,
    payment: PaymentRecord,
    parsed: ParsedPayment,
    requirements: PaymentRequirements,
    first: bool,
) -> Outcome:
    """The provider refused: finish the refund."""
    return finish_refund(services, payment, parsed, requirements)


Step = Callable[[Services, PaymentRecord, ParsedPayment, PaymentRequirements, bool], Outcome]

#: The step that carries a payment on from each state that is not final.
STEPS: dict[P, Step] = {
    **dict.fromkeys(SETTLING, settle_and_dispatch),
    P.SETTLED: settle_and_dispatch,
    P.DISPATCHING: dispatch_again,
    P.DISPATCH_UNKNOWN: dispatch_again,
    P.DISPATCH_FAILED: refund,
}
