"""Typed ledger records: what the code reads back about a payment, its message and refund."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

from relay.states import MessageState, PaymentState, RefundState


class _Record:
    """Built from a database row (unknown columns ignored) and back to column values."""

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Self:
        """The record of one row."""
        return cls(**{name: row[name] for name in _names(cls) if name in row})

    def columns(self) -> dict[str, Any]:
        """The record as column values (the values themselves, not copies)."""
        return {name: getattr(self, name) for name in _names(type(self))}


_NAMES: dict[type[_Record], tuple[str, ...]] = {}


def _names(record: type[_Record]) -> tuple[str, ...]:
    """The record's field names, in order (read once per class)."""
    names = _NAMES.get(record)
    if names is None:
        names = tuple(f.name for f in dataclasses.fields(record))  # type: ignore[arg-type]
        _NAMES[record] = names
    return names


@dataclass(frozen=True)
class PaymentRecord(_Record):
    """One paid request: its authorization, its order, where it is in its life, its answer."""

    id: str
    payment_key: str
    payment_identifier: str | None
    quote_id: str
    payer: str
    nonce: str
    amount_atomic: int
    network: str
    asset: str
    pay_to: str
    destination: str
    segments: int
    body: str | None  # the SMS text, dropped once the payment is finished
    version: int
    state: PaymentState
    payload: dict[str, Any]
    header: str | None
    requirements: dict[str, Any]
    claim_block: int | None
    tx_hash: str | None
    log_index: int | None
    lease_until: float | None
    lease_holder: str | None
    callback_url: str | None
    callback_secret: str | None
    message_id: str | None
    error: str | None
    response_status: int | None
    response_body: dict[str, Any] | None
    response_headers: dict[str, str] | None
    created_at: float
    updated_at: float
    request_sha256: str | None = None  # the request it pays for (None: claimed before 0004)

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", PaymentState(self.state))

    def held_by(self, holder: str) -> PaymentRecord:
        """This payment as seen by the holder of its lease."""
        return dataclasses.replace(self, lease_holder=holder)

    @property
    def holder(self) -> str:
        """The lease token of whoever acts on this payment now."""
        assert self.lease_holder is not None, "acting on a payment without its lease"
        return self.lease_holder


@dataclass(frozen=True)
class EventRecord(_Record):
    """An event about a message for the agent's callback URL, until it is delivered."""

    id: str
    payment_id: str
    type: str
    url: str
    secret: str = dataclasses.field(repr=False)
    body: str = dataclasses.field(repr=False)
    state: str = "pending"
    attempts: int = 0
    next_attempt_at: float = 0.0
    lease_until: float | None = None
    last_error: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass(frozen=True)
class MessageEvent(_Record):
    """One status a message went through."""

    status: MessageState
    at: float
    detail: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", MessageState(self.status))


@dataclass(frozen=True)
class MessageRecord(_Record):
    """An SMS handed to the provider (or refused by it) for a payment."""

    message_id: str
    payment_id: str
    destination: str
    segments: int
    status: MessageState
    provider: str
    created_at: float
    updated_at: float
    events: tuple[MessageEvent, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", MessageState(self.status))


@dataclass(frozen=True)
class RefundRecord(_Record):
    """The transfer that sends a payer's USDC back, signed before it is broadcast."""

    payment_id: str
    tx_hash: str | None
    raw_tx: str | None
    nonce: int | None
    amount_atomic: int
    state: RefundState
    error: str | None
    created_at: float
    updated_at: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", RefundState(self.state))
