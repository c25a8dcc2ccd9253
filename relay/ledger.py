"""SQL persistence (SQLAlchemy Core): verdicts, opt-outs, quotes, payments, messages, refunds."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
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
    Index,
    Integer,
    MetaData,
    Row,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    insert,
    make_url,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from relay import migrations
from relay.moderation import Verdict
from relay.records import EventRecord, MessageEvent, MessageRecord, PaymentRecord, RefundRecord
from relay.retry import Backoff, retry
from relay.states import check_move

log = logging.getLogger(__name__)

#: The PostgreSQL advisory lock an upgrade holds, so two at once run one after the other.
UPGRADE_LOCK = 0x72656C6179  # "relay"
#: A reserved transaction nonce the chain has not seen this long after its reservation (or
#: its broadcast) was never sent, or was dropped: the next reservation re-uses it. Hosts
#: keep their clocks in sync (NTP) well within this.
NONCE_GAP_SECONDS = 15.0
MAX_NONCE_AHEAD = 256
NONCE_ATTEMPTS = 100
#: A reservation lost to another process is tried again a random moment later, so that the
#: two do not collide again.
NONCE_BACKOFF = Backoff(NONCE_ATTEMPTS, 0.002, 0.05)

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

#: Requests arrived with X-Forwarded-For while TRUSTED_PROXY_HOPS was 0.
FORWARDED_NOTICE = "forwarded_without_trusted_hops"
#: A reconciler finished a pass (how far behind it is, for /metrics).
RECONCILED_NOTICE = "reconciler_pass_finished"

#: Fleet-wide leases (e.g. which process runs the reconciler now).
leases = Table(
    "leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(64), nullable=False),
    Column("expires_at", Float, nullable=False),
)


def make_engine(url: str) -> Engine:
    """An engine for the URL; SQLite gets WAL and a busy timeout so threads can share it."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    json_options: dict[str, Any] = {
        "json_serializer": _dump_json,
        "json_deserializer": _load_json,
    }
    # Errors never carry bound parameters (message texts, phone numbers) into logs.
    json_options["hide_parameters"] = True
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


#: Switching a new SQLite file to WAL while another connection writes to it fails at once
#: ("database is locked", the busy timeout does not apply): it is tried again briefly.
WAL_SWITCH = Backoff(attempts=50, first=0.02, cap=0.25, budget=15.0)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=30000")
    if cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        retry(
            lambda _attempt: cursor.execute("PRAGMA journal_mode=WAL"),
            WAL_SWITCH,
            retryable=lambda error: "locked" in str(error),
        )
    cursor.close()


class SchemaMissing(Exception):
    """The database is not at this release's schema revision (or its SQLite file does not
    exist): `relay db upgrade` has not run on it yet."""


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
        """A ledger on a database at this release's schema revision; SchemaMissing if it is
        behind (the service, the worker and operator commands never create or migrate it)."""
        missing = missing_sqlite_file(url)
        if missing is not None:
            raise SchemaMissing(f"SQLite file {missing} does not exist (run `relay db upgrade`)")
        ledger = cls.from_url(url)
        found, head = ledger.schema_revision(), migrations.head()
        if found == head:
            return ledger
        if found is None or migrations.known(found):
            ledger.engine.dispose()
            at = "has no schema revision" if found is None else f"is at schema revision {found}"
            raise SchemaMissing(
                f"the database {at}; this release needs {head} (run `relay db upgrade`)"
            )
        log.warning("the database is at schema revision %s, newer than this release's", found)
        return ledger

    def schema_revision(self) -> str | None:
        """The schema revision the database is at, None before its first upgrade."""
        with self.engine.connect() as conn:
            return migrations.current(conn)

    @classmethod
    def upgrade_database(cls, url: str) -> str:
        """Create or migrate the schema of the database at URL; returns its revision."""
        book = cls.from_url(url)
        try:
            return book.upgrade()
        finally:
            book.engine.dispose()

    def upgrade(self) -> str:
        """Create or migrate the schema to this release's revision (`relay db upgrade`);
        returns that revision. The whole upgrade is one transaction, and two at once run one
        after the other (PostgreSQL: an advisory lock; SQLite: BEGIN IMMEDIATE)."""
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(select(func.pg_advisory_xact_lock(UPGRADE_LOCK)))
            elif conn.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            migrations.upgrade(conn)
        return migrations.head()

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
    def claim_payment(self, payment: PaymentRecord) -> None:
        """Insert a payment, claiming its quote, authorization and identifier atomically.

        Raises Conflict naming what was already claimed, with the existing payment.
        """
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(payments).values(**payment.columns()))
        except IntegrityError:
            raise self._conflict(payment) from None

    def _conflict(self, payment: PaymentRecord) -> Conflict:
        checks: list[tuple[str, Any]] = [
            ("same_payment", payments.c.payment_key == payment.payment_key)
        ]
        if payment.payment_identifier:
            identifier = payments.c.payment_identifier == payment.payment_identifier
            checks.append(("identifier", identifier))
        same_authorization = (payments.c.payer == payment.payer) & (
            payments.c.nonce == payment.nonce
        )
        checks.append(("authorization", same_authorization))
        checks.append(("quote", payments.c.quote_id == payment.quote_id))
        for kind, condition in checks:
            existing = self._payment(condition)
            if existing is not None:
                return Conflict(kind, existing)
        return Conflict("unknown", None)

    def _first(self, query: Any) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row: Row[Any] | None = conn.execute(query).first()
        return None if row is None else dict(row._mapping)

    def _payment(self, condition: Any) -> PaymentRecord | None:
        found = self._first(select(payments).where(condition))
        return None if found is None else PaymentRecord.from_row(found)

    def quote_claim(self, quote_id: str) -> PaymentRecord | None:
        """The payment holding a claim on this quote, if any."""
        return self._payment(payments.c.quote_id == quote_id)

    def payment(self, payment_id: str) -> PaymentRecord | None:
        """The payment with this id."""
        return self._payment(payments.c.id == payment_id)

    def payment_by_key(self, payment_key: str) -> PaymentRecord | None:
        """The payment for this exact payment payload."""
        return self._payment(payments.c.payment_key == payment_key)

    def payment_by_identifier(self, identifier: str) -> PaymentRecord | None:
        """The payment that used this payment-identifier."""
        return self._payment(payments.c.payment_identifier == identifier)

    def transition(
        self,
        payment_id: str,
        from_states: tuple[str, ...],
        to_state: str,
        now: float,
        *,
        holder: str | None = None,
        **fields: Any,
    ) -> bool:
        """Move a payment between states; False if another worker moved it first, or (with
        ``holder``) if our lease on it was lost.

        Raises Conflict("transfer") when the settling (transaction, log) already paid for
        another payment.
        """
        check_move(from_states, to_state)
        query = (
            update(payments)
            .where(payments.c.id == payment_id, payments.c.state.in_(from_states))
            .values(state=str(to_state), updated_at=now, **fields)
        )
        if holder is not None:
            query = query.where(payments.c.lease_holder == holder)
        try:
            with self.engine.begin() as conn:
                return conn.execute(query).rowcount == 1
        except IntegrityError:
            if "log_index" not in fields:
                raise
            existing = self._payment(
                (payments.c.tx_hash == fields.get("tx_hash"))
                & (payments.c.log_index == fields["log_index"])
            )
            raise Conflict("transfer", existing) from None

    def take(
        self, payment_id: str, now: float, seconds: float, *, force: bool = False
    ) -> str | None:
        """Lease a payment for ``seconds``: the holder's token, or None while someone else's
        lease runs. ``force`` takes it whatever the lease (only with no other process)."""
        holder = secrets.token_hex(8)
        query = update(payments).where(payments.c.id == payment_id)
        if not force:
            free = payments.c.lease_until.is_(None) | (payments.c.lease_until <= now)
            query = query.where(free)
        values = {"lease_until": now + seconds, "lease_holder": holder}
        with self.engine.begin() as conn:
            return holder if conn.execute(query.values(**values)).rowcount == 1 else None

    def renew(self, payment_id: str, holder: str, now: float, seconds: float) -> bool:
        """Extend our lease before a step that takes time; False if it was lost."""
        query = (
            update(payments)
            .where(payments.c.id == payment_id, payments.c.lease_holder == holder)
            .values(lease_until=now + seconds)
        )
        with self.engine.begin() as conn:
            return conn.execute(query).rowcount == 1

    def release(self, payment_id: str, holder: str) -> None:
        """End our lease on a payment (not someone else's): the next retry or repair may
        act at once."""
        query = (
            update(payments)
            .where(payments.c.id == payment_id, payments.c.lease_holder == holder)
            .values(lease_until=None, lease_holder=None)
        )
        with self.engine.begin() as conn:
            conn.execute(query)

    def unfinished_payments(self, states: tuple[str, ...]) -> list[PaymentRecord]:
        """Payments still in one of these states, oldest first."""
        query = select(payments).where(payments.c.state.in_(states)).order_by(payments.c.created_at)
        with self.engine.connect() as conn:
            return [PaymentRecord.from_row(row._mapping) for row in conn.execute(query)]

    def payment_counts(self) -> dict[str, int]:
        """How many payments are in each state (states with none are left out)."""
        query = select(payments.c.state, func.count()).group_by(payments.c.state)
        with self.engine.connect() as conn:
            return {str(state): int(count) for state, count in conn.execute(query)}

    def oldest_unheld(self, states: tuple[str, ...], now: float) -> float | None:
        """When the oldest payment in one of these states that nobody holds was created."""
        free = payments.c.lease_until.is_(None) | (payments.c.lease_until <= now)
        query = select(func.min(payments.c.created_at)).where(payments.c.state.in_(states), free)
        with self.engine.connect() as conn:
            oldest = conn.execute(query).scalar()
        return None if oldest is None else float(oldest)

    def list_payments(self, limit: int = 50) -> list[PaymentRecord]:
        """The most recent payments."""
        query = select(payments).order_by(payments.c.created_at.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [PaymentRecord.from_row(row._mapping) for row in conn.execute(query)]

    # Transaction nonces -----------------------------------------------------------
    def reserve_nonce(self, address: str, pending: int, latest: int, now: float) -> int:
        """Reserve the next transaction nonce of ``address``, shared by every process.

        ``pending`` is the chain's count of the account's transactions including its
        mempool, ``latest`` the mined count. A reservation is kept until its nonce is mined,
        so a process that read the chain a moment late never hands out a nonce already in
        the mempool. One at ``pending`` (not even in the mempool) that is older than
        NONCE_GAP_SECONDS was never broadcast, or was dropped: it is handed out again,
        judged by its own age, however busy the account is.
        """

        def attempt(_number: int) -> int:
            nonce = self._try_reserve(address, pending, latest, now)
            if nonce is None:
                raise NonceRace("no transaction nonce could be reserved")
            return nonce

        return retry(attempt, NONCE_BACKOFF, retryable=lambda error: isinstance(error, NonceRace))

    def _try_reserve(self, address: str, pending: int, latest: int, now: float) -> int | None:
        table, marks = nonce_reservations, settler_nonces
        mine = table.c.address == address
        stale = now - NONCE_GAP_SECONDS
        try:
            with self.engine.begin() as conn:
                conn.execute(delete(table).where(mine, table.c.nonce < latest))
                query = select(table.c.nonce, table.c.reserved_at).where(mine)
                rows = conn.execute(query.order_by(table.c.nonce)).all()
                mark = conn.execute(
                    select(marks.c.next_nonce).where(marks.c.address == address)
                ).scalar()
                high = pending if mark is None else int(mark)
                if high > pending + MAX_NONCE_AHEAD:  # the chain was reset: start over
                    conn.execute(delete(table).where(mine))
                    conn.execute(
                        update(marks).where(marks.c.address == address).values(next_nonce=pending)
                    )
                    rows, high = [], pending
                lowest = rows[0] if rows else None
                if lowest is not None and lowest.nonce == pending and lowest.reserved_at < stale:
                    retake = (
                        update(table)
                        .where(mine, table.c.nonce == pending)
                        .where(table.c.reserved_at == lowest.reserved_at)
                        .values(reserved_at=now)
                    )
                    return pending if conn.execute(retake).rowcount == 1 else None
                gap = lowest is not None and lowest.nonce > pending and lowest.reserved_at < stale
                after = rows[-1].nonce + 1 if rows else pending
                nonce = pending if gap else max(high, pending, after)
                conn.execute(insert(table).values(address=address, nonce=nonce, reserved_at=now))
                self._raise_mark(conn, address, mark, max(high, nonce + 1), now)
        except IntegrityError:
            return None
        return nonce

    @staticmethod
    def _raise_mark(conn: Connection, address: str, mark: Any, next_nonce: int, now: float) -> None:
        """Raise (never lower) the account's high-water mark, whatever others wrote since."""
        marks = settler_nonces
        if mark is None:
            conn.execute(
                insert(marks).values(address=address, next_nonce=next_nonce, updated_at=now)
            )
            return
        higher = (
            func.greatest(marks.c.next_nonce, next_nonce)
            if conn.dialect.name == "postgresql"
            else func.max(marks.c.next_nonce, next_nonce)
        )
        conn.execute(
            update(marks)
            .where(marks.c.address == address)
            .values(next_nonce=higher, updated_at=now)
        )

    # Notices for the operator --------------------------------------------------------
    def note(self, name: str, now: float) -> None:
        """Remember that ``name`` was noticed (the latest time wins)."""
        with self.engine.begin() as conn:
            if conn.execute(
                update(notices).where(notices.c.name == name).values(noted_at=now)
            ).rowcount:
                return
        with contextlib.suppress(IntegrityError), self.engine.begin() as conn:
            conn.execute(insert(notices).values(name=name, noted_at=now))

    def noted(self, name: str) -> float | None:
        """When ``name`` was last noticed, if ever."""
        row = self._first(select(notices.c.noted_at).where(notices.c.name == name))
        return None if row is None else float(row["noted_at"])

    # Webhook replays ---------------------------------------------------------------
    def forget_call(self, digest: str) -> None:
        """Unrecord a call that could not be applied (its retry is not a replay)."""
        with self.engine.begin() as conn:
            conn.execute(delete(webhook_calls).where(webhook_calls.c.digest == digest))

    def first_sight(self, digest: str, now: float, forget_before: float) -> bool:
        """Record a signed call; False if it was seen already (a replay). Calls seen before
        ``forget_before`` are forgotten (their signatures have expired)."""
        with self.engine.begin() as conn:
            conn.execute(delete(webhook_calls).where(webhook_calls.c.seen_at < forget_before))
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(webhook_calls).values(digest=digest, seen_at=now))
        except IntegrityError:
            return False
        return True

    def release_nonce(self, address: str, nonce: int) -> None:
        """A reserved nonce that will never be broadcast: the next reservation takes it
        at once (as if its age had run out)."""
        table = nonce_reservations
        with self.engine.begin() as conn:
            conn.execute(
                update(table)
                .where(table.c.address == address, table.c.nonce == nonce)
                .values(reserved_at=0.0)
            )

    def touch_nonce(self, address: str, nonce: int, now: float) -> None:
        """A reserved nonce is being broadcast now: its age starts again."""
        table = nonce_reservations
        with self.engine.begin() as conn:
            conn.execute(
                update(table)
                .where(table.c.address == address, table.c.nonce == nonce)
                .values(reserved_at=now)
            )

    # Fleet leases ------------------------------------------------------------------
    def acquire_lease(self, name: str, holder: str, now: float, seconds: float) -> bool:
        """Take or renew the lease ``name`` for ``holder``; False while another holds it."""
        renew = (
            update(leases)
            .where(
                leases.c.name == name,
                (leases.c.holder == holder) | (leases.c.expires_at <= now),
            )
            .values(holder=holder, expires_at=now + seconds)
        )
        with self.engine.begin() as conn:
            if conn.execute(renew).rowcount == 1:
                return True
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(leases).values(name=name, holder=holder, expires_at=now + seconds)
                )
        except IntegrityError:
            return False
        return True

    def busy_leases(self, now: float) -> int:
        """How many leases (fleet-wide or on payments) someone holds now: a sign of live
        processes."""
        with self.engine.connect() as conn:
            fleet = conn.execute(
                select(func.count()).select_from(leases).where(leases.c.expires_at > now)
            ).scalar_one()
            held = conn.execute(
                select(func.count()).select_from(payments).where(payments.c.lease_until > now)
            ).scalar_one()
        return int(fleet) + int(held)

    def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up (if still held by ``holder``)."""
        with self.engine.begin() as conn:
            conn.execute(delete(leases).where(leases.c.name == name, leases.c.holder == holder))

    # Messages ----------------------------------------------------------------------
    def record_message(self, message: MessageRecord) -> None:
        """Store a dispatched message and its first status event (idempotent)."""
        columns = {k: v for k, v in message.columns().items() if k != "events"}
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(messages).values(**columns))
                conn.execute(
                    insert(message_events).values(
                        message_id=message.message_id, status=message.status, at=message.created_at
                    )
                )
        except IntegrityError:
            pass

    def message(self, message_id: str) -> MessageRecord | None:
        """A message with its status history."""
        found = self._first(select(messages).where(messages.c.message_id == message_id))
        if found is None:
            return None
        query = (
            select(message_events.c.status, message_events.c.at, message_events.c.detail)
            .where(message_events.c.message_id == message_id)
            .order_by(message_events.c.id)
        )
        with self.engine.connect() as conn:
            events = tuple(MessageEvent.from_row(row._mapping) for row in conn.execute(query))
        return MessageRecord.from_row({**found, "events": events})

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

    def list_messages(self, limit: int = 50) -> list[MessageRecord]:
        """The most recent messages (without their history)."""
        query = select(messages).order_by(messages.c.created_at.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [MessageRecord.from_row(row._mapping) for row in conn.execute(query)]

    # Refunds -----------------------------------------------------------------------
    def create_refund(self, refund: RefundRecord) -> bool:
        """Record a payment's refund; False if it already has one (another worker's)."""
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(refunds).values(**refund.columns()))
        except IntegrityError:
            return False
        return True

    def update_refund(
        self, payment_id: str, expected_tx: str | None, expected_state: str, **fields: Any
    ) -> bool:
        """Change a refund that still has this transaction and state; False if another
        worker changed it first."""
        tx = refunds.c.tx_hash
        query = (
            update(refunds)
            .where(
                refunds.c.payment_id == payment_id,
                refunds.c.state == expected_state,
                tx.is_(None) if expected_tx is None else tx == expected_tx,
            )
            .values(**fields)
        )
        with self.engine.begin() as conn:
            return conn.execute(query).rowcount == 1

    def refund(self, payment_id: str) -> RefundRecord | None:
        """The refund of a payment, if any."""
        found = self._first(select(refunds).where(refunds.c.payment_id == payment_id))
        return None if found is None else RefundRecord.from_row(found)

    def list_refunds(self, limit: int = 50) -> list[RefundRecord]:
        """The most recent refunds."""
        query = select(refunds).order_by(refunds.c.created_at.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [RefundRecord.from_row(row._mapping) for row in conn.execute(query)]

    # Events for agents -------------------------------------------------------------
    def enqueue_event(self, event: EventRecord) -> bool:
        """Keep an event for delivery; False if it is already kept (its id is stable)."""
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(webhook_events).values(**event.columns()))
        except IntegrityError:
            return False
        return True

    def due_events(self, now: float, limit: int = 100) -> list[EventRecord]:
        """Pending events whose next attempt is due and that nobody is sending, oldest first."""
        query = (
            select(webhook_events)
            .where(
                webhook_events.c.state == "pending",
                webhook_events.c.next_attempt_at <= now,
                webhook_events.c.lease_until.is_(None) | (webhook_events.c.lease_until <= now),
            )
            .order_by(webhook_events.c.next_attempt_at)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [EventRecord.from_row(row._mapping) for row in conn.execute(query)]

    def take_event(self, event_id: str, attempts: int, now: float, seconds: float) -> bool:
        """Lease an event for one attempt; False if another process took it first."""
        query = (
            update(webhook_events)
            .where(
                webhook_events.c.id == event_id,
                webhook_events.c.state == "pending",
                webhook_events.c.attempts == attempts,
                webhook_events.c.lease_until.is_(None) | (webhook_events.c.lease_until <= now),
            )
            .values(lease_until=now + seconds)
        )
        with self.engine.begin() as conn:
            return conn.execute(query).rowcount == 1

    def record_attempt(
        self, event_id: str, state: str, next_attempt_at: float, error: str | None, now: float
    ) -> None:
        """The outcome of one attempt: delivered, failed for good, or pending until later."""
        query = (
            update(webhook_events)
            .where(webhook_events.c.id == event_id)
            .values(
                state=state,
                attempts=webhook_events.c.attempts + 1,
                next_attempt_at=next_attempt_at,
                last_error=None if error is None else error[:200],
                lease_until=None,
                updated_at=now,
            )
        )
        with self.engine.begin() as conn:
            conn.execute(query)

    def event(self, event_id: str) -> EventRecord | None:
        """An event by its id."""
        found = self._first(select(webhook_events).where(webhook_events.c.id == event_id))
        return None if found is None else EventRecord.from_row(found)

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

    def __init__(self, kind: str, existing: PaymentRecord | None) -> None:
        super().__init__(kind)
        self.kind = kind
        self.existing = existing


class NonceRace(RuntimeError):
    """Another process reserved the nonce this one was about to take."""


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

    def claim(self, key: str, holder: str, seconds: float) -> bool:
        """The fleet-wide right to moderate KEY now (a lease in the database)."""
        return self._ledger.acquire_lease(_lease_name(key), holder, self._clock(), seconds)

    def release(self, key: str, holder: str) -> None:
        """Give the right to moderate KEY up."""
        self._ledger.release_lease(_lease_name(key), holder)


def _lease_name(key: str) -> str:
    return "moderation:" + hashlib.sha256(key.encode()).hexdigest()[:48]
