"""Drop relay_schema: alembic_version records the schema's revision now."""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    """Drop the version table of the releases before migrations."""
    op.drop_table("relay_schema")


def downgrade() -> None:
    """Bring relay_schema back at version 2, what the releases before migrations read."""
    table = op.create_table(
        "relay_schema",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
    )
    op.bulk_insert(table, [{"id": 1, "version": 2}])
