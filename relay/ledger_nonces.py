"""Transaction nonces shared by every process that signs with one key (the settler, the
refund wallet): reservations in the database, part of the Ledger."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, delete, func, insert, select, update
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
