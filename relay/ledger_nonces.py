"""Transaction nonces shared by every process that signs with one key (the settler, the
refund wallet): reservations in the database, part of the Ledger."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, Update, bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from relay.retry import Backoff, retry
from relay.schema import nonce_reservations, settler_nonces

#: A reserved transaction nonce the chain has not seen this long after its reservation (or
#: its broadcast) was never sent, or was dropped: the next reservation re-uses it. Hosts
#: keep their clocks in sync (NTP) well within this.
NONCE_GAP_SECONDS = 15.0
MAX_NONCE_AHEAD = 256
NONCE_ATTEMPTS = 100
#: A reservation lost to another process is tried again a random moment later, so that the
#: two do not collide again.
NONCE_BACKOFF = Backoff(NONCE_ATTEMPTS, 0.002, 0.05)


_reservations, _marks = nonce_reservations, settler_nonces
_theirs = _reservations.c.address == bindparam("account")
#: The statements of a reservation, built once.
_FORGET_MINED = delete(_reservations).where(_theirs, _reservations.c.nonce < bindparam("latest"))
_FORGET_ALL = delete(_reservations).where(_theirs)
_RESERVED = (
    select(_reservations.c.nonce, _reservations.c.reserved_at)
    .where(_theirs)
    .order_by(_reservations.c.nonce)
)
_MARK = select(_marks.c.next_nonce).where(_marks.c.address == bindparam("account"))
_RESET_MARK = (
    update(_marks)
    .where(_marks.c.address == bindparam("account"))
    .values(next_nonce=bindparam("restart"))
)
_OURS = (
    _reservations.c.nonce == bindparam("number"),
    _reservations.c.reserved_at == bindparam("was"),
)
_RELEASE = update(_reservations).where(_theirs, *_OURS).values(reserved_at=0.0)
_TOUCH = (
    update(_reservations)
    .where(_theirs, _reservations.c.nonce == bindparam("number"))
    .values(reserved_at=bindparam("now"))
)
#: A reservation stamped anew while it is still the one stamped :was (a retake, or a
#: stamp before broadcast).
_RESTAMP = _TOUCH.where(_reservations.c.reserved_at == bindparam("was"))


def _raise_mark_to(higher: Any) -> Update:
    return (
        update(_marks)
        .where(_marks.c.address == bindparam("account"))
        .values(next_nonce=higher, updated_at=bindparam("now"))
    )


_RAISE_MARK = _raise_mark_to(func.max(_marks.c.next_nonce, bindparam("at_least")))
_RAISE_MARK_POSTGRESQL = _raise_mark_to(func.greatest(_marks.c.next_nonce, bindparam("at_least")))


class NonceRace(RuntimeError):
    """Another process reserved the nonce this one was about to take."""


class NonceBook:
    """The Ledger's transaction nonce reservations."""

    engine: Engine

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
        mine = {"account": address}
        stale = now - NONCE_GAP_SECONDS
        try:
            with self.engine.begin() as conn:
                conn.execute(_FORGET_MINED, {**mine, "latest": latest})
                rows = conn.execute(_RESERVED, mine).all()
                mark = conn.execute(_MARK, mine).scalar()
                high = pending if mark is None else int(mark)
                if high > pending + MAX_NONCE_AHEAD:  # the chain was reset: start over
                    conn.execute(_FORGET_ALL, mine)
                    conn.execute(_RESET_MARK, {**mine, "restart": pending})
                    rows, high = [], pending
                lowest = rows[0] if rows else None
                if lowest is not None and lowest.nonce == pending and lowest.reserved_at < stale:
                    retake = {**mine, "number": pending, "was": lowest.reserved_at, "now": now}
                    return pending if conn.execute(_RESTAMP, retake).rowcount == 1 else None
                gap = lowest is not None and lowest.nonce > pending and lowest.reserved_at < stale
                given_back = next(
                    (r.nonce for r in rows if r.nonce >= pending and r.reserved_at == 0.0), None
                )
                if given_back is not None and not gap:  # never broadcast: its hole filled first
                    retake = {**mine, "number": given_back, "was": 0.0, "now": now}
                    return given_back if conn.execute(_RESTAMP, retake).rowcount == 1 else None
                after = rows[-1].nonce + 1 if rows else pending
                nonce = pending if gap else max(high, pending, after)
                row = {"address": address, "nonce": nonce, "reserved_at": now}
                conn.execute(insert(nonce_reservations), row)
                self._raise_mark(conn, address, mark, max(high, nonce + 1), now)
        except IntegrityError:
            return None
        return nonce

    @staticmethod
    def _raise_mark(conn: Connection, address: str, mark: Any, next_nonce: int, now: float) -> None:
        """Raise (never lower) the account's high-water mark, whatever others wrote since."""
        if mark is None:
            row = {"address": address, "next_nonce": next_nonce, "updated_at": now}
            conn.execute(insert(settler_nonces), row)
            return
        raised = {"account": address, "at_least": next_nonce, "now": now}
        postgresql = conn.dialect.name == "postgresql"
        conn.execute(_RAISE_MARK_POSTGRESQL if postgresql else _RAISE_MARK, raised)

    def nonce_gap(self, address: str, pending: int, latest: int, now: float) -> bool:
        """Whether the account's next nonce (``pending``: not even in the mempool) was
        reserved longer than NONCE_GAP_SECONDS ago, or skipped, while a reservation above it
        waits: its transactions cannot be mined until that nonce is used."""
        mine = {"account": address}
        with self.engine.begin() as conn:
            conn.execute(_FORGET_MINED, {**mine, "latest": latest})
            rows = conn.execute(_RESERVED, mine).all()
        if not rows:
            return False
        lowest, highest = rows[0], rows[-1]
        stale = lowest.reserved_at < now - NONCE_GAP_SECONDS
        return bool(lowest.nonce >= pending and stale and highest.nonce > pending)

    def release_nonce(self, address: str, nonce: int, reserved_at: float) -> None:
        """A reserved nonce that will never be broadcast: the next reservation takes it
        at once (as if its age had run out). Only while the reservation is still the one
        stamped ``reserved_at``: one that aged out and was taken over by another process
        (which may have broadcast it) stays as it is."""
        with self.engine.begin() as conn:
            conn.execute(_RELEASE, {"account": address, "number": nonce, "was": reserved_at})

    def touch_nonce(
        self, address: str, nonce: int, now: float, *, reserved_at: float | None = None
    ) -> bool:
        """A reserved nonce is being broadcast now: its age starts again. With
        ``reserved_at``, only while the reservation is still that one (False: it was taken
        over, and must not be broadcast from here)."""
        params = {"account": address, "number": nonce, "now": now, "was": reserved_at}
        with self.engine.begin() as conn:
            touched = conn.execute(_TOUCH if reserved_at is None else _RESTAMP, params)
            return bool(touched.rowcount == 1)
