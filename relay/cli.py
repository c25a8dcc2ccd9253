"""The `relay` command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from relay.settings import SettingsError, load_settings

Command = Callable[[argparse.Namespace], int]


def serve(args: argparse.Namespace) -> int:
    """Serve the app with gunicorn (the same server as production)."""
    from gunicorn.app.base import BaseApplication

    from relay.app import create_app

    app = create_app(load_settings())

    class _Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            self.cfg.set("bind", f"{args.host}:{args.port}")
            self.cfg.set("workers", args.workers)
            self.cfg.set("threads", args.threads)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("timeout", 120)
            self.cfg.set("accesslog", "-")

        def load(self) -> Any:
            return app

    _Server().run()
    return 0


def db_upgrade(_args: argparse.Namespace) -> int:
    """Create or migrate the database schema."""
    from relay.ledger import Ledger

    settings = load_settings()
    version = Ledger.from_url(settings.database_url).upgrade()
    print(f"database schema at version {version}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="relay", description="x402-paid, moderated SMS relay")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve the HTTP API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=8)
    p.set_defaults(func=serve)
    db = sub.add_parser("db", help="database maintenance")
    dbsub = db.add_subparsers(dest="db_command", required=True)
    dbsub.add_parser("upgrade", help="create or migrate the schema").set_defaults(func=db_upgrade)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `relay` console script."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = build_parser().parse_args(argv)
    func: Command = args.func
    try:
        return func(args)
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
