"""Delivery callbacks: where a payment's events go (payments.callback_url, its signing
secret), and the events kept until delivered (webhook_events)."""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    """Add the callback columns and the events table."""
    op.create_table(
        "webhook_events",
        sa.Column("id", sa.String(length=80), nullable=False),
        sa.Column("payment_id", sa.String(length=32), nullable=False),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("url", sa.String(length=2048), nullable=False),
        sa.Column("secret", sa.String(length=64), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.Float(), nullable=False),
        sa.Column("lease_until", sa.Float(), nullable=True),
        sa.Column("last_error", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("webhook_events", schema=None) as batch_op:
        batch_op.create_index("ix_webhook_events_due", ["state", "next_attempt_at"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_webhook_events_payment_id"), ["payment_id"], unique=False
        )

    with op.batch_alter_table("payments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("callback_url", sa.String(length=2048), nullable=True))
        batch_op.add_column(sa.Column("callback_secret", sa.String(length=64), nullable=True))


def downgrade() -> None:
    """Undo 0003."""
    with op.batch_alter_table("payments", schema=None) as batch_op:
        batch_op.drop_column("callback_secret")
        batch_op.drop_column("callback_url")

    with op.batch_alter_table("webhook_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_webhook_events_payment_id"))
        batch_op.drop_index("ix_webhook_events_due")

    op.drop_table("webhook_events")
