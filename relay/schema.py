"""The ledger's tables (SQLAlchemy Core): the one description of the schema, which the
migrations in relay/migrations/ must match (a test compares them); and the look-up of a row
by one column."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql import Select

metadata = MetaData()

verdicts = Table(
    "verdicts",
    metadata,
    Column("key", String(128), primary_key=True),
    Column("verdict", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
)

opt_outs = Table(
    "opt_outs",
    metadata,
    Column("phone", String(32), primary_key=True),
    Column("opted_out_at", Float, nullable=False),
)

payments = Table(
    "payments",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("payment_key", String(64), nullable=False, unique=True),
    Column("payment_identifier", String(128), unique=True),
    Column("quote_id", String(160), nullable=False, unique=True),
    Column("payer", String(42), nullable=False),
    Column("nonce", String(66), nullable=False),
    Column("amount_atomic", BigInteger, nullable=False),
    Column("network", String(32), nullable=False),
    Column("asset", String(42), nullable=False),
    Column("pay_to", String(42), nullable=False),
    Column("destination", String(32), nullable=False),
    Column("segments", Integer, nullable=False),
    Column("body", Text),
    Column("version", Integer, nullable=False),
    Column("state", String(24), nullable=False),
    Column("payload", JSON, nullable=False),
    # The payment header exactly as received: what reconciliation parses again.
    Column("header", Text),
    Column("requirements", JSON, nullable=False),
    # The chain's height when the payment was claimed: its settlement cannot be older.
    Column("claim_block", BigInteger),
    Column("tx_hash", String(66)),
    # The index of the Transfer log that paid: one (transaction, log) pays one payment.
    Column("log_index", Integer),
    # Who may act on the payment: lease_holder (a request or a repair) until lease_until.
    Column("lease_until", Float),
    Column("lease_holder", String(32)),
    # Where the agent wants to hear of the message, and the secret its events are signed with.
    Column("callback_url", String(2048)),
    Column("callback_secret", String(64)),
    # SHA-256 of the destination and the message the payment was made for: only a request
    # for them gets the payment's stored answer (its payload is public once settled).
    Column("request_sha256", String(64)),
    Column("message_id", String(64)),
    Column("error", String(200)),
    Column("response_status", Integer),
    Column("response_body", JSON),
    Column("response_headers", JSON),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    UniqueConstraint("payer", "nonce", name="uq_payments_authorization"),
    Index("uq_payments_transfer", "tx_hash", "log_index", unique=True),
)

messages = Table(
    "messages",
    metadata,
    Column("message_id", String(64), primary_key=True),
    Column("payment_id", String(32), nullable=False, unique=True),
    Column("destination", String(32), nullable=False),
    Column("segments", Integer, nullable=False),
    Column("status", String(24), nullable=False),
    Column("provider", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

message_events = Table(
    "message_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("message_id", String(64), nullable=False, index=True),
    Column("status", String(24), nullable=False),
    Column("at", Float, nullable=False),
    Column("detail", String(200)),
)

refunds = Table(
    "refunds",
    metadata,
    Column("payment_id", String(32), primary_key=True),
    Column("tx_hash", String(66)),
    Column("raw_tx", Text),
    Column("nonce", BigInteger),
    Column("amount_atomic", BigInteger, nullable=False),
    Column("state", String(16), nullable=False),
    Column("error", String(200)),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

outbox = Table(
    "outbox",
    metadata,
    Column("message_id", String(64), primary_key=True),
    Column("client_reference", String(64), nullable=False, unique=True),
    Column("destination", String(32), nullable=False),
    Column("body", Text, nullable=False),
    Column("created_at", Float, nullable=False),
)

#: The next transaction nonce per account (a high-water mark: never lower than any nonce
#: handed out, so a process that read the chain a moment late cannot go back).
settler_nonces = Table(
    "settler_nonces",
    metadata,
    Column("address", String(42), primary_key=True),
    Column("next_nonce", BigInteger, nullable=False),
    Column("updated_at", Float, nullable=False),
)

#: Every transaction nonce handed out and not yet mined, one row each, so a reservation
#: that was never broadcast is found by its own age.
nonce_reservations = Table(
    "nonce_reservations",
    metadata,
    Column("address", String(42), primary_key=True),
    Column("nonce", BigInteger, primary_key=True),
    Column("reserved_at", Float, nullable=False),
)

#: Events for agents' callback URLs, kept until delivered (or given up on): the worker
#: sends each, at least once, under a lease, with backoff between attempts.
webhook_events = Table(
    "webhook_events",
    metadata,
    Column("id", String(80), primary_key=True),
    Column("payment_id", String(32), nullable=False, index=True),
    Column("type", String(32), nullable=False),
    Column("url", String(2048), nullable=False),
    Column("secret", String(64), nullable=False),
    Column("body", Text, nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", Float, nullable=False),
    Column("lease_until", Float),
    Column("last_error", String(200)),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("ix_webhook_events_due", "state", "next_attempt_at"),
)

#: Signed webhook calls seen recently: a captured call replayed inside its time window is
#: recognised by every process.
webhook_calls = Table(
    "webhook_calls",
    metadata,
    Column("digest", String(64), primary_key=True),
    Column("seen_at", Float, nullable=False, index=True),
)

#: Things a process noticed for the operator (shown by `relay doctor`), by name.
notices = Table(
    "notices",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("noted_at", Float, nullable=False),
)


#: Fleet-wide leases (e.g. which process runs the reconciler now).
leases = Table(
    "leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(64), nullable=False),
    Column("expires_at", Float, nullable=False),
)


@lru_cache(maxsize=64)
def row_where(table: Table, column: str) -> Select[Any]:
    """SELECT * FROM table WHERE column = :value, built once per table and column (a
    statement built anew for every look-up costs more than the look-up)."""
    return select(table).where(table.c[column] == bindparam("value"))


def dialect_insert(dialect: str) -> Any:
    """INSERT with ON CONFLICT for this database (PostgreSQL or SQLite)."""
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


@lru_cache(maxsize=32)
def insert_new(table: Table, dialect: str) -> Any:
    """INSERT of a row unless one with the same key is stored (ON CONFLICT DO NOTHING, its
    rowcount 0 then): a repeat inside a larger transaction does not abort it."""
    statement = dialect_insert(dialect)(table).on_conflict_do_nothing()
    return statement.execution_options(preserve_rowcount=True)
