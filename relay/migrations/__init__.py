"""Schema migrations (Alembic): the scripts ship in this package and are configured in code,
so an installed wheel migrates without an alembic.ini."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.operations.ops import MigrationScript
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text

#: Alembic's table holding the revision a database is at.
VERSION_TABLE = "alembic_version"
#: Run on a revision just written, so it leaves in the house style (ruff is a development
#: dependency; without it the file is written as generated).
_RUFF = {
    "fix": "check --fix --quiet REVISION_SCRIPT_FILENAME",
    "format": "format --quiet REVISION_SCRIPT_FILENAME",
}


def config(connection: Connection | None = None) -> Config:
    """Alembic's configuration: this package's scripts, run on ``connection``."""
    cfg = Config()
    cfg.set_main_option("script_location", "relay:migrations")
    cfg.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(config())


def head() -> str:
    """The revision this release's schema is at."""
    found = _scripts().get_current_head()
    assert found is not None, "the migrations have no head"
    return found


def known(revision: str) -> bool:
    """Whether ``revision`` is one of this release's (a newer release's is not)."""
    return any(script.revision == revision for script in _scripts().walk_revisions())


def current(conn: Connection) -> str | None:
    """The revision the database is at, None before its first migration."""
    if not inspect(conn).has_table(VERSION_TABLE):
        return None
    found = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
    return None if found is None else str(found)


def upgrade(conn: Connection) -> None:
    """Run every migration the database has not had yet, in the caller's transaction."""
    command.upgrade(config(conn), "head")


def revision(conn: Connection, message: str) -> str | None:
    """Write the next revision: what the database (at head) lacks of the ledger's tables.
    Its file path, or None when nothing differs (no empty revision is written)."""
    cfg = config(conn)
    cfg.set_section_option("post_write_hooks", "hooks", ", ".join(_RUFF))
    for name, options in _RUFF.items():
        cfg.set_section_option("post_write_hooks", f"{name}.type", "module")
        cfg.set_section_option("post_write_hooks", f"{name}.module", "ruff")
        cfg.set_section_option("post_write_hooks", f"{name}.options", options)
    written = command.revision(
        cfg,
        message,
        autogenerate=True,
        rev_id=f"{int(head()) + 1:04d}",
        process_revision_directives=_drop_if_empty,
    )
    return None if written is None or isinstance(written, list) else written.path


def _drop_if_empty(_context: MigrationContext, _revision: Any, directives: list[Any]) -> None:
    scripts: Iterable[MigrationScript] = directives
    if all(script.upgrade_ops is None or script.upgrade_ops.is_empty() for script in scripts):
        directives.clear()
