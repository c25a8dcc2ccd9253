"""Events for agents' callback URLs, kept until delivered: part of the Ledger."""

from __future__ import annotations

from sqlalchemy import Connection, Engine, select, update

from relay.records import EventRecord
from relay.schema import insert_new, webhook_events


class EventBook:
    """The Ledger's events for callback URLs."""

    engine: Engine

    def enqueue_event(self, event: EventRecord) -> bool:
        """Keep an event for delivery; False if it is already kept (its id is stable)."""
        with self.engine.begin() as conn:
            return self._store_event(conn, event)

    @staticmethod
    def _store_event(conn: Connection, event: EventRecord) -> bool:
        """Keep an event within ``conn``'s transaction; False if it is already kept."""
        stored = conn.execute(insert_new(webhook_events, conn.dialect.name), event.columns())
        return bool(stored.rowcount == 1)

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
        with self.engine.connect() as conn:
            found = conn.execute(select(webhook_events).where(webhook_events.c.id == event_id))
            row = found.first()
        return None if row is None else EventRecord.from_row(row._mapping)
