"""A payment's life, in one place: its states, and which state each step may move to.

    settling ──► settle_pending ──► settled ──► dispatching ──► dispatched
       │  ▲            │               ▲             │   └──────► dispatch_unknown ─┐
       │  └────────────┤ settle_unknown┘             └──► dispatch_failed ──► refunded
       └──► settle_failed (certain: nothing moved; the quote is free again)

A settlement found while the payment's lease is still ours moves it from any settling
state straight to dispatching (one write); settled is where it waits when the lease was
lost meanwhile, for whoever holds it next.

`Ledger.transition` refuses any move the table does not name, so a step and this table
cannot disagree; tests/test_states.py walks it.
"""

from __future__ import annotations

from enum import StrEnum


class PaymentState(StrEnum):
    """Where a paid request stands (stored as its value)."""

    SETTLING = "settling"
    SETTLE_PENDING = "settle_pending"
    SETTLE_UNKNOWN = "settle_unknown"
    SETTLED = "settled"
    DISPATCHING = "dispatching"
    DISPATCH_UNKNOWN = "dispatch_unknown"
    DISPATCH_FAILED = "dispatch_failed"
    DISPATCHED = "dispatched"
    REFUNDED = "refunded"
    SETTLE_FAILED = "settle_failed"


class RefundState(StrEnum):
    """Where a refund stands: signed (recorded, not yet broadcast), pending, confirmed,
    reverted or replaced (a new one is signed), failed (could not be signed)."""

    SIGNED = "signed"
    PENDING = "pending"
    CONFIRMED = "confirmed"
    REVERTED = "reverted"
    REPLACED = "replaced"
    FAILED = "failed"


class MessageState(StrEnum):
    """Where an SMS stands (a message's status): queued with the provider, dispatched,
    delivered, failed, or refunded (its payment went back)."""

    QUEUED = "queued"
    DISPATCHED = "dispatched"
    DELIVERED = "delivered"
    FAILED = "failed"
    REFUNDED = "refunded"


P = PaymentState

#: Every move a step may make: state → the states it may move to (itself included where a
#: step records something without moving on).
TRANSITIONS: dict[PaymentState, frozenset[PaymentState]] = {
    P.SETTLING: frozenset(
        {P.SETTLING, P.SETTLE_PENDING, P.SETTLE_UNKNOWN, P.SETTLED, P.DISPATCHING, P.SETTLE_FAILED}
    ),
    P.SETTLE_PENDING: frozenset(
        {P.SETTLING, P.SETTLE_PENDING, P.SETTLE_UNKNOWN, P.SETTLED, P.DISPATCHING, P.SETTLE_FAILED}
    ),
    P.SETTLE_UNKNOWN: frozenset({P.SETTLE_UNKNOWN, P.SETTLED, P.DISPATCHING, P.SETTLE_FAILED}),
    P.SETTLED: frozenset({P.SETTLED, P.DISPATCHING}),
    P.DISPATCHING: frozenset({P.DISPATCHING, P.DISPATCHED, P.DISPATCH_UNKNOWN, P.DISPATCH_FAILED}),
    P.DISPATCH_UNKNOWN: frozenset({P.DISPATCHING, P.DISPATCHED}),
    P.DISPATCH_FAILED: frozenset({P.DISPATCH_FAILED, P.REFUNDED}),
    P.DISPATCHED: frozenset(),
    P.REFUNDED: frozenset(),
    P.SETTLE_FAILED: frozenset(),
}

#: The states a payment is created in, and those it ends in.
INITIAL = P.SETTLING
FINAL_STATES: tuple[PaymentState, ...] = tuple(s for s, nexts in TRANSITIONS.items() if not nexts)
#: States with a stored answer that replays get.
ANSWERED_STATES: tuple[PaymentState, ...] = (*FINAL_STATES, P.DISPATCH_FAILED)
#: Before the money is known to have moved.
SETTLING: tuple[PaymentState, ...] = (P.SETTLING, P.SETTLE_PENDING, P.SETTLE_UNKNOWN)
#: Everything the reconciler finishes.
UNFINISHED: tuple[PaymentState, ...] = tuple(s for s, nexts in TRANSITIONS.items() if nexts)


def check_move(from_states: tuple[str, ...], to_state: str) -> None:
    """Raise ValueError unless every state in ``from_states`` may move to ``to_state``."""
    target = PaymentState(to_state)
    for state in from_states:
        if target not in TRANSITIONS[PaymentState(state)]:
            raise ValueError(f"no step moves a payment from {state} to {to_state}")
