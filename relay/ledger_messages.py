"""Messages, their status history, refunds and the development outbox: part of the Ledger."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, Row, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError

from relay.records import MessageEvent, MessageRecord, RefundRecord
from relay.schema import insert_new, message_events, messages, outbox, refunds, row_where

_NEW_STATUS = (
    update(messages)
    .where(messages.c.message_id == bindparam("id"))
    .values(status=bindparam("new"), updated_at=bindparam("now"))
)


def _set_status(
    conn: Connection, message_id: str, status: str, now: float, detail: str | None
) -> bool:
    """A message's new status and its event; False for an unknown message."""
    changed = conn.execute(_NEW_STATUS, {"id": message_id, "new": status, "now": now})
    if changed.rowcount:
        event = {"message_id": message_id, "status": status, "at": now, "detail": detail}
        conn.execute(insert(message_events), event)
    return bool(changed.rowcount)


class MessageBook:
    """The Ledger's messages, refunds and outbox."""

    engine: Engine

    def _first(self, query: Any, params: dict[str, Any] | None = None) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row: Row[Any] | None = conn.execute(query, params).first()
        return None if row is None else dict(row._mapping)

    # Messages ----------------------------------------------------------------------
    def record_message(self, message: MessageRecord) -> None:
        """Store a dispatched message and its first status event (idempotent)."""
        with self.engine.begin() as conn:
            self._store_message(conn, message, (message.status,))

    @staticmethod
    def _store_message(conn: Connection, message: MessageRecord, statuses: tuple[str, ...]) -> None:
        """The message with its status history, ``statuses`` in order (the last its status);
        a message stored already stays as it is (whoever stored it wrote its history)."""
        columns = {k: v for k, v in message.columns().items() if k != "events"}
        if conn.execute(insert_new(messages, conn.dialect.name), columns).rowcount == 1:
            at = message.created_at
            history = [{"message_id": message.message_id, "status": s, "at": at} for s in statuses]
            conn.execute(insert(message_events), history)

    def message(self, message_id: str) -> MessageRecord | None:
        """A message with its status history."""
        found = self._first(row_where(messages, "message_id"), {"value": message_id})
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
            return _set_status(conn, message_id, status, now, detail)

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
        found = self._first(row_where(refunds, "payment_id"), {"value": payment_id})
        return None if found is None else RefundRecord.from_row(found)

    def list_refunds(self, limit: int = 50) -> list[RefundRecord]:
        """The most recent refunds."""
        query = select(refunds).order_by(refunds.c.created_at.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [RefundRecord.from_row(row._mapping) for row in conn.execute(query)]

    # Development outbox ------------------------------------------------------------
    def outbox_put(self, row: dict[str, Any]) -> dict[str, Any]:
        """Store an outgoing SMS once per client reference; returns the stored row."""
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(outbox), row)
        except IntegrityError:
            pass
        found = self.outbox_find(row["client_reference"])
        assert found is not None
        return found

    def outbox_find(self, client_reference: str) -> dict[str, Any] | None:
        """The outbox message stored under a client reference."""
        return self._first(row_where(outbox, "client_reference"), {"value": client_reference})

    def outbox_messages(self) -> list[dict[str, Any]]:
        """Every message in the development outbox, oldest first."""
        with self.engine.connect() as conn:
            query = select(outbox).order_by(outbox.c.created_at)
            return [dict(row._mapping) for row in conn.execute(query)]
