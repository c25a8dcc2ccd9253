"""Baseline: the schema of the last release before migrations (its relay_schema version 2).

A new database gets every table. One that an earlier release made is taken as it is: the
tables it lacks are created, and the columns and indexes relay_schema version 2 added to
version 1 are added where absent, so running this on a database half way there, or twice,
is safe.
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None

schema = sa.MetaData()

sa.Table(
    "relay_schema",
    schema,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
)
sa.Table(
    "verdicts",
    schema,
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("verdict", sa.JSON, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)
sa.Table(
    "opt_outs",
    schema,
    sa.Column("phone", sa.String(32), primary_key=True),
    sa.Column("opted_out_at", sa.Float, nullable=False),
)
sa.Table(
    "payments",
    schema,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("payment_key", sa.String(64), nullable=False, unique=True),
    sa.Column("payment_identifier", sa.String(128), unique=True),
    sa.Column("quote_id", sa.String(160), nullable=False, unique=True),
    sa.Column("payer", sa.String(42), nullable=False),
    sa.Column("nonce", sa.String(66), nullable=False),
    sa.Column("amount_atomic", sa.BigInteger, nullable=False),
    sa.Column("network", sa.String(32), nullable=False),
    sa.Column("asset", sa.String(42), nullable=False),
    sa.Column("pay_to", sa.String(42), nullable=False),
    sa.Column("destination", sa.String(32), nullable=False),
    sa.Column("segments", sa.Integer, nullable=False),
    sa.Column("body", sa.Text),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("state", sa.String(24), nullable=False),
    sa.Column("payload", sa.JSON, nullable=False),
    sa.Column("header", sa.Text),
    sa.Column("requirements", sa.JSON, nullable=False),
    sa.Column("claim_block", sa.BigInteger),
    sa.Column("tx_hash", sa.String(66)),
    sa.Column("log_index", sa.Integer),
    sa.Column("lease_until", sa.Float),
    sa.Column("lease_holder", sa.String(32)),
    sa.Column("message_id", sa.String(64)),
    sa.Column("error", sa.String(200)),
    sa.Column("response_status", sa.Integer),
    sa.Column("response_body", sa.JSON),
    sa.Column("response_headers", sa.JSON),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.UniqueConstraint("payer", "nonce", name="uq_payments_authorization"),
    sa.Index("uq_payments_transfer", "tx_hash", "log_index", unique=True),
)
sa.Table(
    "messages",
    schema,
    sa.Column("message_id", sa.String(64), primary_key=True),
    sa.Column("payment_id", sa.String(32), nullable=False, unique=True),
    sa.Column("destination", sa.String(32), nullable=False),
    sa.Column("segments", sa.Integer, nullable=False),
    sa.Column("status", sa.String(24), nullable=False),
    sa.Column("provider", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)
sa.Table(
    "message_events",
    schema,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("message_id", sa.String(64), nullable=False, index=True),
    sa.Column("status", sa.String(24), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("detail", sa.String(200)),
)
sa.Table(
    "refunds",
    schema,
    sa.Column("payment_id", sa.String(32), primary_key=True),
    sa.Column("tx_hash", sa.String(66)),
    sa.Column("raw_tx", sa.Text),
    sa.Column("nonce", sa.BigInteger),
    sa.Column("amount_atomic", sa.BigInteger, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("error", sa.String(200)),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)
sa.Table(
    "outbox",
    schema,
    sa.Column("message_id", sa.String(64), primary_key=True),
    sa.Column("client_reference", sa.String(64), nullable=False, unique=True),
    sa.Column("destination", sa.String(32), nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)
sa.Table(
    "settler_nonces",
    schema,
    sa.Column("address", sa.String(42), primary_key=True),
    sa.Column("next_nonce", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)
sa.Table(
    "nonce_reservations",
    schema,
    sa.Column("address", sa.String(42), primary_key=True),
    sa.Column("nonce", sa.BigInteger, primary_key=True),
    sa.Column("reserved_at", sa.Float, nullable=False),
)
sa.Table(
    "webhook_calls",
    schema,
    sa.Column("digest", sa.String(64), primary_key=True),
    sa.Column("seen_at", sa.Float, nullable=False, index=True),
)
sa.Table(
    "notices",
    schema,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("noted_at", sa.Float, nullable=False),
)
sa.Table(
    "leases",
    schema,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("holder", sa.String(64), nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)

#: The columns relay_schema version 2 added to version 1's tables (all nullable).
VERSION_2_COLUMNS = {
    "payments": ("header", "claim_block", "log_index", "lease_until", "lease_holder"),
    "refunds": ("nonce",),
}


def upgrade() -> None:
    """Create the tables, or bring an earlier release's database to them."""
    bind = op.get_bind()
    schema.create_all(bind)  # only the missing tables (with their indexes)
    for name, added in VERSION_2_COLUMNS.items():
        present = {column["name"] for column in sa.inspect(bind).get_columns(name)}
        for column in (schema.tables[name].c[key] for key in added if key not in present):
            op.add_column(name, sa.Column(column.name, column.type))
    for table in schema.sorted_tables:
        for index in table.indexes:
            index.create(bind, checkfirst=True)


def downgrade() -> None:
    """Drop every table."""
    schema.drop_all(op.get_bind())
