"""The request a payment was made for (payments.request_sha256): only a request for the
same destination and message gets its stored answer."""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    """Add payments.request_sha256 (empty for the payments claimed before)."""
    with op.batch_alter_table("payments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("request_sha256", sa.String(length=64), nullable=True))


def downgrade() -> None:
    """Undo 0004."""
    with op.batch_alter_table("payments", schema=None) as batch_op:
        batch_op.drop_column("request_sha256")
