"""SQL persistence (SQLAlchemy Core): verdicts, opt-outs, quotes, payments, messages, refunds."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import simplejson
from sqlalchemy import (
    Connection,
    Engine,
    Update,
    bindparam,
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
from relay.ledger_events import EventBook
from relay.ledger_messages import MessageBook
from relay.ledger_nonces import NonceBook
from relay.memo import Memo
from relay.moderation import Verdict
from relay.records import EventRecord, MessageRecord, PaymentRecord
from relay.retry import Backoff, retry
from relay.schema import (
    dialect_insert,
    leases,
    notices,
    opt_outs,
    payments,
    row_where,
    verdicts,
    webhook_calls,
)
from relay.states import check_move

log = logging.getLogger(__name__)

#: The PostgreSQL advisory lock an upgrade holds, so two at once run one after the other.
UPGRADE_LOCK = 0x72656C6179  # "relay"

#: Requests arrived with X-Forwarded-For while TRUSTED_PROXY_HOPS was 0.
FORWARDED_NOTICE = "forwarded_without_trusted_hops"
#: A reconciler finished a pass (how far behind it is, for /metrics).
RECONCILED_NOTICE = "reconciler_pass_finished"


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
        url,
        connect_args={"timeout": 30, "check_same_thread": False},
        # A connection for each serving thread, kept: not opened (and set up) per request.
        pool_size=SQLITE_POOL_SIZE,
        max_overflow=SQLITE_POOL_SIZE,
        **json_options,
    )
    event.listen(engine, "connect", _sqlite_pragmas)
    WriterQueue().attach(engine)
    return engine


class WriterQueue:
    """One writing transaction at a time per process, queued in Python.

    SQLite lets one transaction write at a time; a writer that finds the lock taken sleeps
    in SQLite's busy handler (1, 2, 5, 10... ms) and tries again, so under load writers wake
    late and out of order, and a burst of paid requests spreads out. Here a connection's
    first INSERT, UPDATE or DELETE takes a process-wide lock first, given back when the
    connection goes back to the pool (after its commit or rollback, whatever happened): the
    next writer of this process starts the moment the last one has ended, and only writers
    of different processes meet in the busy handler. Reads never wait for it. Every write of
    the ledger is one short ``engine.begin()`` block.
    """

    #: A writer waits this long for the lock at most, then goes on to SQLite's own wait.
    WAIT_SECONDS = 30.0

    def __init__(self) -> None:
        self._lock = FairLock()
        #: The pooled connection's info dictionary of the transaction holding the lock.
        self._owner: dict[Any, Any] | None = None

    def attach(self, engine: Engine) -> None:
        event.listen(engine, "before_cursor_execute", self._before_statement)
        event.listen(engine.pool, "checkin", self._checked_in)

    def _before_statement(self, conn: Connection, _cursor: Any, statement: str, *_: Any) -> None:
        info = conn.info
        if self._owner is info or statement.lstrip()[:6].upper() not in _WRITES:
            return
        if self._lock.acquire(timeout=self.WAIT_SECONDS):
            self._owner = info

    def _checked_in(self, _dbapi_connection: Any, record: Any) -> None:
        if record is not None and self._owner is record.info:
            self._owner = None
            self._lock.release()


class FairLock:
    """A lock handed to its waiters in the order they came (a plain Lock lets the thread
    that just released it take it again at once, and a waiter can starve under load)."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held = False
        self._waiters: deque[threading.Lock] = deque()

    def acquire(self, timeout: float) -> bool:
        """Take the lock, waiting at most ``timeout`` seconds; False if it did not come."""
        with self._mutex:
            if not self._held:
                self._held = True
                return True
            turn = threading.Lock()
            turn.acquire()
            self._waiters.append(turn)
        if turn.acquire(timeout=timeout):
            return True
        with self._mutex:
            if turn in self._waiters:  # gave up waiting
                self._waiters.remove(turn)
                return False
        return True  # handed over just as the wait ran out

    def release(self) -> None:
        """Hand the lock to the first waiter, or free it."""
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().release()
            else:
                self._held = False


_WRITES = ("INSERT", "UPDATE", "DELETE")


def _dump_json(value: Any) -> str:
    """JSON columns keep Decimal amounts exact."""
    return simplejson.dumps(value, use_decimal=True)


def _load_json(text: str) -> Any:
    return simplejson.loads(text, use_decimal=True)


#: Pooled SQLite connections per process (gunicorn runs 16 threads a worker by default).
SQLITE_POOL_SIZE = 20
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


#: How old a process's memory of an opt-out may be for a free answer (a quote, a 402).
OPT_OUT_MEMO_SECONDS = 5.0


#: A payment (:payment_id) whose lease is still ours (:holder).
_STILL_OURS = (
    payments.c.id == bindparam("payment_id"),
    payments.c.lease_holder == bindparam("holder"),
)
_HELD = select(payments.c.id).where(*_STILL_OURS)
#: The lease extended (:until), or given up.
_RENEW = update(payments).where(*_STILL_OURS).values(lease_until=bindparam("until"))
_RELEASE = update(payments).where(*_STILL_OURS).values(lease_until=None, lease_holder=None)
_OPTED_OUT = select(opt_outs.c.phone).where(opt_outs.c.phone == bindparam("phone"))


@lru_cache(maxsize=256)
def _transition(from_states: tuple[str, ...], names: tuple[str, ...], held: bool) -> Update:
    """The UPDATE of a state move from ``from_states`` setting the columns ``names`` too
    (and, when ``held``, only while the lease holder is the one given): built once."""
    query = (
        update(payments)
        .where(payments.c.id == bindparam("payment_id"), payments.c.state.in_(from_states))
        .values(
            state=bindparam("new_state"),
            updated_at=bindparam("now"),
            **{name: bindparam(f"new_{name}") for name in names},
        )
    )
    if held:
        query = query.where(payments.c.lease_holder == bindparam("holder"))
    return query


def _move(
    conn: Connection,
    payment_id: str,
    from_states: tuple[str, ...],
    to_state: str,
    now: float,
    holder: str | None,
    fields: dict[str, Any],
) -> bool:
    """A payment's state move (checked by the caller) within ``conn``'s transaction."""
    query = _transition(tuple(from_states), tuple(sorted(fields)), holder is not None)
    values = {f"new_{name}": value for name, value in fields.items()}
    params = {"payment_id": payment_id, "new_state": str(to_state), "now": now, **values}
    if holder is not None:
        params["holder"] = holder
    return bool(conn.execute(query, params).rowcount == 1)


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


class Ledger(MessageBook, NonceBook, EventBook):
    """The relay's one database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._opt_outs: Memo[str, bool] = Memo(100_000, max_age=OPT_OUT_MEMO_SECONDS)

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
            row = conn.execute(_VERDICT, {"key": key}).first()
        return None if row is None else dict(row.verdict)

    def put_verdict(
        self,
        key: str,
        verdict: dict[str, Any],
        now: float,
        *,
        lease: tuple[str, str] | None = None,
    ) -> bool:
        """Store a verdict; the first one stored for a key wins (False: not this one). With
        ``lease`` (name, holder), that lease is given up in the same transaction."""
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(verdicts), {"key": key, "verdict": verdict, "created_at": now})
                if lease is not None:
                    conn.execute(_RELEASE_LEASE, _held(*lease))
        except IntegrityError:
            if lease is not None:
                self.release_lease(*lease)
            return False
        return True

    # Opt-out registry ------------------------------------------------------------
    def remembered_opt_out(self, phone: str) -> bool | None:
        """What this process read of the number up to OPT_OUT_MEMO_SECONDS ago, if anything
        (no query)."""
        return self._opt_outs.get(phone)

    def is_opted_out(self, phone: str, *, recent: bool = False) -> bool:
        """Whether the number has asked for no more messages. ``recent``: an answer this
        process read up to OPT_OUT_MEMO_SECONDS ago will do (for answers that cost nothing:
        a paid request always reads the registry itself)."""
        if recent:
            known = self.remembered_opt_out(phone)
            if known is not None:
                return known
        with self.engine.connect() as conn:
            row = conn.execute(_OPTED_OUT, {"phone": phone}).first()
        return self._opt_outs.put(phone, row is not None)

    def set_opt_out(self, phone: str, opted_out: bool, now: float) -> None:
        """Add the number to the registry (STOP) or remove it (START)."""
        with self.engine.begin() as conn:
            conn.execute(opt_outs.delete().where(opt_outs.c.phone == phone))
            if opted_out:
                conn.execute(insert(opt_outs).values(phone=phone, opted_out_at=now))
        self._opt_outs.forget(phone)

    # Payments ----------------------------------------------------------------------
    def claim_payment(self, payment: PaymentRecord) -> None:
        """Insert a payment, claiming its quote, authorization and identifier atomically.

        Raises Conflict naming what was already claimed, with the existing payment.
        """
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(payments), payment.columns())
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

    def _payment(self, condition: Any) -> PaymentRecord | None:
        found = self._first(select(payments).where(condition))
        return None if found is None else PaymentRecord.from_row(found)

    def _payment_by(self, column: str, value: str) -> PaymentRecord | None:
        found = self._first(row_where(payments, column), {"value": value})
        return None if found is None else PaymentRecord.from_row(found)

    def quote_claim(self, quote_id: str) -> PaymentRecord | None:
        """The payment holding a claim on this quote, if any."""
        return self._payment_by("quote_id", quote_id)

    def payment(self, payment_id: str) -> PaymentRecord | None:
        """The payment with this id."""
        return self._payment_by("id", payment_id)

    def payment_by_key(self, payment_key: str) -> PaymentRecord | None:
        """The payment for this exact payment payload."""
        return self._payment_by("payment_key", payment_key)

    def payment_by_identifier(self, identifier: str) -> PaymentRecord | None:
        """The payment that used this payment-identifier."""
        return self._payment_by("payment_identifier", identifier)

    def last_marked(
        self, payer: str, error: str, since: float, states: tuple[str, ...]
    ) -> float | None:
        """When the latest payment of ``payer`` marked with ``error`` and now in one of
        ``states`` was claimed, if at or after ``since`` (the payer's payments are found by
        the authorization's unique index)."""
        query = select(func.max(payments.c.created_at)).where(
            payments.c.payer == payer,
            payments.c.error == error,
            payments.c.created_at >= since,
            payments.c.state.in_(states),
        )
        with self.engine.connect() as conn:
            last = conn.execute(query).scalar()
        return None if last is None else float(last)

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
        try:
            with self.engine.begin() as conn:
                return _move(conn, payment_id, from_states, to_state, now, holder, fields)
        except IntegrityError:
            if "log_index" not in fields:
                raise
            existing = self._payment(
                (payments.c.tx_hash == fields.get("tx_hash"))
                & (payments.c.log_index == fields["log_index"])
            )
            raise Conflict("transfer", existing) from None

    def record_dispatch(
        self,
        message: MessageRecord,
        statuses: tuple[str, ...],
        events: list[EventRecord],
        payment_id: str,
        from_states: tuple[str, ...],
        to_state: str,
        now: float,
        **fields: Any,
    ) -> bool:
        """What follows a message's hand-over, in one transaction: the message with its
        statuses (``statuses`` in order; one stored already stays as it is), the
        events for the callback URL (each kept once), and the payment's move with ``fields``
        (its answer). All of it or none: until it commits the payment is still dispatching,
        and whoever takes it next finds the message at the provider. False if the payment
        had already moved on (what is stored stays)."""
        check_move(from_states, to_state)
        with self.engine.begin() as conn:
            self._store_message(conn, message, statuses)
            for record in events:
                self._store_event(conn, record)
            return _move(conn, payment_id, from_states, to_state, now, None, fields)

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
        params = {"payment_id": payment_id, "holder": holder, "until": now + seconds}
        with self.engine.begin() as conn:
            return conn.execute(_RENEW, params).rowcount == 1

    def release(self, payment_id: str, holder: str) -> None:
        """End our lease on a payment (not someone else's): the next retry or repair may
        act at once. Read first: a lease already given up (a payment's final move gives it
        up with its answer) or lost costs no write. Nobody else ever sets our holder, so
        what the read finds ours stays ours until our write, or runs out."""
        params = {"payment_id": payment_id, "holder": holder}
        with self.engine.connect() as conn:
            held = conn.execute(_HELD, params).first() is not None
        if held:
            with self.engine.begin() as conn:
                conn.execute(_RELEASE, params)

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

    # Fleet leases ------------------------------------------------------------------
    def acquire_lease(self, name: str, holder: str, now: float, seconds: float) -> bool:
        """Take or renew the lease ``name`` for ``holder``; False while another holds it.
        One statement: inserted when new, taken over when ours or run out."""
        params = {**_held(name, holder), "until": now + seconds, "now": now}
        with self.engine.begin() as conn:
            taken = conn.execute(_take_lease(self.engine.dialect.name), params)
            return bool(taken.rowcount == 1)

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
            conn.execute(_RELEASE_LEASE, _held(name, holder))


def _held(name: str, holder: str) -> dict[str, str]:
    return {"lease": name, "holder": holder}


_RELEASE_LEASE = delete(leases).where(
    leases.c.name == bindparam("lease"), leases.c.holder == bindparam("holder")
)
_VERDICT = select(verdicts.c.verdict).where(verdicts.c.key == bindparam("key"))


@lru_cache(maxsize=4)
def _take_lease(dialect: str) -> Any:
    """The lease inserted when new, taken over when ours or run out (one statement)."""
    upsert = dialect_insert(dialect)(leases).values(
        name=bindparam("lease"), holder=bindparam("holder"), expires_at=bindparam("until")
    )
    return upsert.on_conflict_do_update(
        index_elements=[leases.c.name],
        set_={"holder": bindparam("holder"), "expires_at": bindparam("until")},
        where=(leases.c.holder == bindparam("holder")) | (leases.c.expires_at <= bindparam("now")),
    ).execution_options(preserve_rowcount=True)


class Conflict(Exception):
    """A claim lost to an existing row; ``kind`` says which uniqueness it hit."""

    def __init__(self, kind: str, existing: PaymentRecord | None) -> None:
        super().__init__(kind)
        self.kind = kind
        self.existing = existing


class LedgerVerdictCache:
    """The moderation verdict cache, shared by every process through the database.

    A verdict never changes once stored, so each process keeps the ones it has read or
    stored in memory too, and a cached text is not read from the database again.
    """

    def __init__(
        self, ledger: Ledger, clock: Callable[[], float], max_in_memory: int = 10_000
    ) -> None:
        self._ledger = ledger
        self._clock = clock
        self._memory: Memo[str, Verdict] = Memo(max_in_memory)

    def get(self, key: str) -> Verdict | None:
        """The verdict stored under KEY, if any."""
        known = self.remembered(key)
        if known is not None:
            return known
        stored = self._ledger.get_verdict(key)
        if stored is None:
            return None
        # JSON columns load numbers as Decimal; a confidence score is a plain float.
        verdict = Verdict.from_dict({**stored, "confidence": float(stored["confidence"])})
        return self._memory.put(key, verdict)

    def remembered(self, key: str) -> Verdict | None:
        """A verdict this process has read or stored already."""
        return self._memory.get(key)

    def put(self, key: str, verdict: Verdict, *, releasing: str | None = None) -> None:
        """Remember a verdict (unless another was stored first: that one stays); with
        ``releasing``, that holder's claim is given up in the same transaction."""
        lease = None if releasing is None else (_lease_name(key), releasing)
        if self._ledger.put_verdict(key, verdict.to_dict(), self._clock(), lease=lease):
            self._memory.put(key, verdict)

    def claim(self, key: str, holder: str, seconds: float) -> Verdict | bool:
        """The verdict if one is stored by now, else the fleet-wide right to moderate KEY
        (a lease in the database): read again once taken, in case the verdict was stored
        just before, and then given back."""
        taken = self._ledger.acquire_lease(_lease_name(key), holder, self._clock(), seconds)
        try:
            found = self.get(key)
        except BaseException:
            if taken:  # nobody else would wait for a claim whose holder gave up
                self.release(key, holder)
            raise
        if found is None:
            return taken
        if taken:
            self.release(key, holder)
        return found

    def release(self, key: str, holder: str) -> None:
        """Give the right to moderate KEY up."""
        self._ledger.release_lease(_lease_name(key), holder)


def _lease_name(key: str) -> str:
    return "moderation:" + hashlib.sha256(key.encode()).hexdigest()[:48]
