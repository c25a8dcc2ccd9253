"""SQL persistence (SQLAlchemy Core): verdicts, opt-outs, quotes, payments, messages, refunds."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import simplejson
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Connection,
    Engine,
    Float,
    Integer,
    MetaData,
    Row,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    insert,
    inspect,
    make_url,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError

from relay.moderation import Verdict

SCHEMA_VERSION = 1
UPGRADE_ATTEMPTS = 5
NONCE_GAP_SECONDS = 5.0
MAX_NONCE_AHEAD = 256

metadata = MetaData()

schema_info = Table(
    "relay_schema",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("version", Integer, nullable=False),
)

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
    Column("requirements", JSON, nullable=False),
    Column("tx_hash", String(66)),
    Column("message_id", String(64)),
    Column("error", String(200)),
    Column("response_status", Integer),
    Column("response_body", JSON),
    Column("response_headers", JSON),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    UniqueConstraint("payer", "nonce", name="uq_payments_authorization"),
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

settler_nonces = Table(
    "settler_nonces",
    metadata,
    Column("address", String(42), primary_key=True),
    Column("next_nonce", BigInteger, nullable=False),
    Column("updated_at", Float, nullable=False),
)


def make_engine(url: str) -> Engine:
    """An engine for the URL; SQLite gets WAL and a busy timeout so threads can share it."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    json_options: dict[str, Any] = {
        "json_serializer": _dump_json,
        "json_deserializer": _load_json,
    }
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, **json_options)
    engine = create_engine(
        url, connect_args={"timeout": 30, "check_same_thread": False}, **json_options
    )
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _dump_json(value: Any) -> str:
    """JSON columns keep Decimal amounts exact."""
    return simplejson.dumps(value, use_decimal=True)


def _load_json(text: str) -> Any:
    return simplejson.loads(text, use_decimal=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


class SchemaMissing(Exception):
    """The database has no relay schema yet (or its SQLite file does not exist)."""


def missing_sqlite_file(url: str) -> str | None:
    """The path of a SQLite database file that does not exist (connecting would create it)."""
    parsed = make_url(url)
    path = parsed.database or ""
    if (
        parsed.get_backend_name() != "sqlite"
        or path in ("", ":memory:")
        or path.startswith("file:")
    ):
        return None
    return None if Path(path).is_file() else path


class Ledger:
    """The relay's one database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def from_url(cls, url: str) -> Ledger:
        """A ledger on the database at URL (the schema is not touched)."""
        return cls(make_engine(url))

    @classmethod
    def open_existing(cls, url: str) -> Ledger:
        """A ledger on a database that already has the relay schema; SchemaMissing if not."""
        missing = missing_sqlite_file(url)
        if missing is not None:
            raise SchemaMissing(f"SQLite file {missing} does not exist (run `relay db upgrade`)")
        ledger = cls.from_url(url)
        if ledger.schema_version() is None:
            ledger.engine.dispose()
            raise SchemaMissing("the database has no relay schema (run `relay db upgrade`)")
        return ledger

    def schema_version(self) -> int | None:
        """The schema version recorded in the database, None before the first upgrade."""
        if not inspect(self.engine).has_table(schema_info.name):
            return None
        with self.engine.connect() as conn:
            version = conn.execute(select(schema_info.c.version)).scalar()
        return None if version is None else int(version)

    def upgrade(self) -> int:
        """Create or migrate the schema; returns the schema version.

        Several workers or hosts may start on a new database at once: whoever loses the race
        to create a table or the version row simply looks again.
        """
        for attempt in range(UPGRADE_ATTEMPTS):
            try:
                return self._upgrade_once()
            except DBAPIError:
                if attempt == UPGRADE_ATTEMPTS - 1:
                    raise
                time.sleep(0.1 * (attempt + 1))
        raise AssertionError("unreachable")

    def _upgrade_once(self) -> int:
        metadata.create_all(self.engine)
        with self.engine.begin() as conn:
            row = conn.execute(select(schema_info.c.version)).first()
            if row is None:
                conn.execute(insert(schema_info).values(id=1, version=SCHEMA_VERSION))
                return SCHEMA_VERSION
            return int(row.version)

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A transaction."""
        with self.engine.begin() as conn:
            yield conn

    def ping(self) -> None:
        """Raise if the database cannot be reached."""
        with self.engine.connect() as conn:
            conn.execute(select(1))

    # Verdict cache -----------------------------------------------------------------
    def get_verdict(self, key: str) -> dict[str, Any] | None:
        """The cached verdict stored under KEY, if any."""
        with self.engine.connect() as conn:
            row = conn.execute(select(verdicts.c.verdict).where(verdicts.c.key == key)).first()
        return None if row is None else dict(row.verdict)

    def put_verdict(self, key: str, verdict: dict[str, Any], now: float) -> None:
        """Store a verdict; the first one stored for a key wins."""
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(verdicts).values(key=key, verdict=verdict, created_at=now))
        except IntegrityError:
            pass

    # Opt-out registry ------------------------------------------------------------
    def is_opted_out(self, phone: str) -> bool:
        """Whether the number has asked for no more messages."""
        with self.engine.connect() as conn:
            row = conn.execute(select(opt_outs.c.phone).where(opt_outs.c.phone == phone)).first()
        return row is not None

    def set_opt_out(self, phone: str, opted_out: bool, now: float) -> None:
        """Add the number to the registry (STOP) or remove it (START)."""
        with self.engine.begin() as conn:
            conn.execute(opt_outs.delete().where(opt_outs.c.phone == phone))
            if opted_out:
                conn.execute(insert(opt_outs).values(phone=phone, opted_out_at=now))

    # Payments ----------------------------------------------------------------------
    def claim_payment(self, row: dict[str, Any]) -> None:
        """Insert a payment, claiming its quote, authorization and identifier atomically.

        Raises Conflict naming what was already claimed, with the existing row.
        """
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(payments).values(**row))
        except IntegrityError:
            raise self._conflict(row) from None

    def _conflict(self, row: dict[str, Any]) -> Conflict:
        checks: list[tuple[str, Any]] = [
            ("same_payment", payments.c.payment_key == row["payment_key"])
        ]
        if row.get("payment_identifier"):
            identifier = payments.c.payment_identifier == row["payment_identifier"]
            checks.append(("identifier", identifier))
        same_authorization = (payments.c.payer == row["payer"]) & (payments.c.nonce == row["nonce"])
        checks.append(("authorization", same_authorization))
        checks.append(("quote", payments.c.quote_id == row["quote_id"]))
        for kind, condition in checks:
            existing = self._first(select(payments).where(condition))
            if existing is not None:
                return Conflict(kind, existing)
        return Conflict("unknown", None)

    def _first(self, query: Any) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row: Row[Any] | None = conn.execute(query).first()
        return None if row is None else dict(row._mapping)

    def quote_claim(self, quote_id: str) -> dict[str, Any] | None:
        """The payment holding a claim on this quote, if any."""
        return self._first(select(payments).where(payments.c.quote_id == quote_id))

    def payment(self, payment_id: str) -> dict[str, Any] | None:
        """The payment row with this id."""
        return self._first(select(payments).where(payments.c.id == payment_id))

    def payment_by_key(self, payment_key: str) -> dict[str, Any] | None:
        """The payment row for this exact payment payload."""
        return self._first(select(payments).where(payments.c.payment_key == payment_key))

    def payment_by_identifier(self, identifier: str) -> dict[str, Any] | None:
        """The payment row that used this payment-identifier."""
        return self._first(select(payments).where(payments.c.payment_identifier == identifier))

    def transition(
        self,
        payment_id: str,
        from_states: tuple[str, ...],
        to_state: str,
        now: float,
        **fields: Any,
    ) -> bool:
        """Move a payment between states; False if another worker moved it first."""
        query = (
            update(payments)
            .where(payments.c.id == payment_id, payments.c.state.in_(from_states))
            .values(state=to_state, updated_at=now, **fields)
        )
        with self.engine.begin() as conn:
            return conn.execute(query).rowcount == 1

    def take_over(self, payment_id: str, state: str, seen_at: float, now: float) -> bool:
        """Claim a stalled payment for repair; False if anyone touched it since ``seen_at``."""
        query = (
            update(payments)
            .where(
                payments.c.id == payment_id,
                payments.c.state == state,
                payments.c.updated_at == seen_at,
            )
            .values(updated_at=now)
        )
        with self.engine.begin() as conn:
            return conn.execute(query).rowcount == 1

    def unfinished_payments(self, states: tuple[str, ...]) -> list[dict[str, Any]]:
        """Payments still in one of these states, oldest first."""
        query = select(payments).where(payments.c.state.in_(states)).order_by(payments.c.created_at)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def list_payments(self, limit: int = 50) -> list[dict[str, Any]]:
        """The most recent payments."""
        query = select(payments).order_by(payments.c.created_at.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    # Settler nonces ----------------------------------------------------------------
    def reserve_nonce(self, address: str, pending: int, latest: int, now: float) -> int:
        """Reserve the settler's next transaction nonce, shared by every process.

        The chain's pending count wins when it is ahead (another sender, a reset chain); a
        reservation ahead of the chain while its mempool is empty for a while is a gap (a
        reservation never broadcast) and falls back to the chain's count.
        """
        while True:
            row = self._first(select(settler_nonces).where(settler_nonces.c.address == address))
            if row is None:
                if self._insert_nonce(address, pending + 1, now):
                    return pending
                continue
            stored = int(row["next_nonce"])
            gap = stored > pending == latest and now - float(row["updated_at"]) > NONCE_GAP_SECONDS
            nonce = (
                pending if stored < pending or gap or stored > pending + MAX_NONCE_AHEAD else stored
            )
            query = (
                update(settler_nonces)
                .where(settler_nonces.c.address == address, settler_nonces.c.next_nonce == stored)
                .values(next_nonce=nonce + 1, updated_at=now)
            )
            with self.engine.begin() as conn:
                if conn.execute(query).rowcount == 1:
                    return nonce

    def _insert_nonce(self, address: str, next_nonce: int, now: float) -> bool:
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(settler_nonces).values(
                        address=address, next_nonce=next_nonce, updated_at=now
                    )
                )
        except IntegrityError:
            return False
        return True

    # Messages ----------------------------------------------------------------------
    def record_message(self, row: dict[str, Any]) -> None:
        """Store a dispatched message and its first status event (idempotent)."""
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(messages).values(**row))
                conn.execute(
                    insert(message_events).values(
                        message_id=row["message_id"], status=row["status"], at=row["created_at"]
                    )
                )
        except IntegrityError:
            pass

    def message(self, message_id: str) -> dict[str, Any] | None:
        """A message row with its status history."""
        found = self._first(select(messages).where(messages.c.message_id == message_id))
        if found is None:
            return None
        query = (
            select(message_events.c.status, message_events.c.at, message_events.c.detail)
            .where(message_events.c.message_id == message_id)
            .order_by(message_events.c.id)
        )
        with self.engine.connect() as conn:
            found["events"] = [dict(row._mapping) for row in conn.execute(query)]
        return found

    def update_message_status(
        self, message_id: str, status: str, now: float, detail: str | None = None
    ) -> bool:
        """Record a delivery report; False for an unknown message."""
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(messages)
                .where(messages.c.message_id == message_id)
                .values(status=status, updated_at=now)
            ).rowcount
            if changed:
                conn.execute(
                    insert(message_events).values(
                        message_id=message_id, status=status, at=now, detail=detail
                    )
                )
        return bool(changed)

    def list_messages(self, limit: int = 50) -> list[dict[str, Any]]:
        """The most recent messages."""
        query = select(messages).order_by(messages.c.created_at.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    # Refunds -----------------------------------------------------------------------
    def record_refund(self, row: dict[str, Any]) -> None:
        """Insert or replace the refund of a payment."""
        with self.engine.begin() as conn:
            conn.execute(refunds.delete().where(refunds.c.payment_id == row["payment_id"]))
            conn.execute(insert(refunds).values(**row))

    def refund(self, payment_id: str) -> dict[str, Any] | None:
        """The refund of a payment, if any."""
        return self._first(select(refunds).where(refunds.c.payment_id == payment_id))

    def list_refunds(self, limit: int = 50) -> list[dict[str, Any]]:
        """The most recent refunds."""
        query = select(refunds).order_by(refunds.c.created_at.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    # Development outbox ------------------------------------------------------------
    def outbox_put(self, row: dict[str, Any]) -> dict[str, Any]:
        """Store an outgoing SMS once per client reference; returns the stored row."""
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(outbox).values(**row))
        except IntegrityError:
            pass
        found = self.outbox_find(row["client_reference"])
        assert found is not None
        return found

    def outbox_find(self, client_reference: str) -> dict[str, Any] | None:
        """The outbox message stored under a client reference."""
        return self._first(select(outbox).where(outbox.c.client_reference == client_reference))

    def outbox_messages(self) -> list[dict[str, Any]]:
        """Every message in the development outbox, oldest first."""
        with self.engine.connect() as conn:
            query = select(outbox).order_by(outbox.c.created_at)
            return [dict(row._mapping) for row in conn.execute(query)]


class Conflict(Exception):
    """A claim lost to an existing row; ``kind`` says which uniqueness it hit."""

    def __init__(self, kind: str, existing: dict[str, Any] | None) -> None:
        super().__init__(kind)
        self.kind = kind
        self.existing = existing


class LedgerVerdictCache:
    """The moderation verdict cache, shared by every process through the database."""

    def __init__(self, ledger: Ledger, clock: Callable[[], float]) -> None:
        self._ledger = ledger
        self._clock = clock

    def get(self, key: str) -> Verdict | None:
        """The verdict stored under KEY, if any."""
        stored = self._ledger.get_verdict(key)
        if stored is None:
            return None
        # JSON columns load numbers as Decimal; a confidence score is a plain float.
        return Verdict.from_dict({**stored, "confidence": float(stored["confidence"])})

    def put(self, key: str, verdict: Verdict) -> None:
        """Remember a verdict."""
        self._ledger.put_verdict(key, verdict.to_dict(), self._clock())
