"""Alembic's environment: the migrations run on the connection (and in the transaction) that
relay.migrations.config was given."""

from alembic import context

from relay.schema import metadata

context.configure(
    connection=context.config.attributes["connection"],
    target_metadata=metadata,
    # SQLite alters a table by copying it: autogenerate writes such changes as batches.
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
