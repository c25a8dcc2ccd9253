"""The `relay` command: serve, worker, dev, quote, send, status, ledger, reconcile, doctor, db."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import requests

from relay.errors import RelayError
from relay.ledger import SchemaMissing
from relay.logs import configure_logging
from relay.settings import SettingsError, load_client_settings, load_settings

Command = Callable[[argparse.Namespace], int]


def serve(args: argparse.Namespace) -> int:
    """Serve the app with gunicorn (the same server as production), with the reconciler
    running in its workers; the loops of every process elect one to work at a time."""
    from gunicorn.app.base import BaseApplication

    from relay.gunicorn_conf import HOOKS

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format, force=True)

    class _Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            self.cfg.set("bind", f"{args.host}:{args.port}")
            self.cfg.set("workers", args.workers)
            self.cfg.set("threads", args.threads)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("timeout", 120)
            self.cfg.set("accesslog", "-")
            self.cfg.set("logger_class", "relay.logs.MaskedAccessLogger")
            self.cfg.set("post_worker_init", _start_reconciler)
            for name, hook in HOOKS.items():  # the workers' metrics directory
                self.cfg.set(name, hook)

        def load(self) -> Any:
            from relay.app import create_app  # in the worker: after on_starting (see HOOKS)

            return create_app(settings)

    _Server().run()
    return 0


def _start_reconciler(worker: Any) -> None:
    """gunicorn's post_worker_init hook: a reconciler thread in each web worker; the
    database lease lets one of them (or a `relay worker`) work at a time."""
    from relay.worker import Worker

    Worker(worker.wsgi.extensions["relay"]).start()


def worker(_args: argparse.Namespace) -> int:
    """Finish stalled payments and pending refunds continuously (the Procfile's worker)."""
    from relay.logs import hide_in_logs
    from relay.services import build_services
    from relay.worker import Worker

    settings = load_settings()
    hide_in_logs(settings.secrets())
    configure_logging(settings.log_level, settings.log_format, force=True)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        services = None
        while services is None:  # beside a server creating the schema, or a database away
            try:
                services = build_services(settings, migrate=False)
            except Exception as exc:
                say(f"worker waiting for its database: {type(exc).__name__}")
                time.sleep(settings.worker_interval_seconds)
        Worker(services).run()
    except KeyboardInterrupt:
        say("worker stopped")
        return 128 + signal.SIGINT
    except SystemExit as stopped:  # SIGTERM (see _exit_on_signal)
        say("worker stopped")
        return int(stopped.code or 0)
    return 0


def dev(args: argparse.Namespace) -> int:
    """The whole stack locally: chain, token, facilitator, rules moderation, outbox, a payer."""
    from relay.dev.stack import DevStack

    signal.signal(signal.SIGTERM, _exit_on_signal)  # stop the chain on `kill` too
    if args.demo:  # the demo narrates its own steps
        for name in ("", "werkzeug"):
            logging.getLogger(name).setLevel(logging.WARNING)
    with DevStack.start(port=args.port, database=args.database, say=say) as stack:
        if args.demo:
            stack.demo(say)
            return 0
        say(stack.usage())
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            say("stopping")
    return 0


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def quote(args: argparse.Namespace) -> int:
    """Ask a relay for a quote."""
    from relay.client import RelayClient

    client = RelayClient(load_client_settings().relay_url)
    show(client.quote(args.message, args.to, smart_encoding=args.smart_encoding))
    return 0


def send(args: argparse.Namespace) -> int:
    """Quote, pay and send one SMS; PAYER_PRIVATE_KEY pays, never above --max-price."""
    from relay.client import RelayClient

    config = load_client_settings()
    if not config.payer_private_key:
        say("PAYER_PRIVATE_KEY must be set to the key of the wallet that pays")
        return 2
    client = RelayClient(
        config.relay_url,
        config.payer_private_key,
        pay_password=config.pay_password,
        on_step=lambda step: say(f"... {step}"),
    )
    say(f"paying from {client.address}, at most {args.max_price} USD")
    result = client.send(
        args.message, args.to, max_price_usd=args.max_price, smart_encoding=args.smart_encoding
    )
    show(result)
    return 0


def status(args: argparse.Namespace) -> int:
    """The status of a message, from the database."""
    from relay.flows.status import message_status

    found = message_status(_services(), args.message_id)
    if found is None:
        say(f"no message {args.message_id}")
        return 1
    show(found)
    return 0


def ledger(args: argparse.Namespace) -> int:
    """Payments, messages and refunds, newest first."""
    from relay.ledger import Ledger

    book = Ledger.open_existing(load_settings().database_url)
    payment_cols = ("id", "state", "payer", "amount_atomic", "tx_hash", "message_id")
    message_cols = ("message_id", "status", "segments", "provider")
    refund_cols = ("payment_id", "state", "amount_atomic", "tx_hash")
    say(
        table(
            "Payments", [p.columns() for p in book.list_payments(args.limit)], payment_cols, _when
        )
    )
    say(
        table(
            "Messages", [m.columns() for m in book.list_messages(args.limit)], message_cols, _when
        )
    )
    say(table("Refunds", [r.columns() for r in book.list_refunds(args.limit)], refund_cols, _when))
    return 0


def reconcile(args: argparse.Namespace) -> int:
    """Finish stalled payments now: settle, dispatch or refund."""
    from relay.flows.reconciling import reconcile as reconcile_all

    def progress(payment_id: str, result: str) -> None:
        say(f"  {payment_id}: {result}")

    say("reconciling unfinished payments...")
    results = reconcile_all(_services(), force=args.all, progress=progress)
    say(f"done: {len(results)} payment(s) looked at")
    return 0


def doctor(_args: argparse.Namespace) -> int:
    """Check configuration and reachability; non-zero when something fails."""
    from relay import doctor as checks

    return checks.run_from_environment()


def db_upgrade(_args: argparse.Namespace) -> int:
    """Create or migrate the database schema."""
    from relay.ledger import Ledger

    version = Ledger.from_url(load_settings().database_url).upgrade()
    say(f"database schema at version {version}")
    return 0


def _services() -> Any:
    from relay.services import build_services

    return build_services(load_settings(), migrate=False)


def _when(row: dict[str, Any]) -> str:
    stamp = row.get("created_at")
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(stamp))) if stamp else ""


def table(
    title: str,
    rows: list[dict[str, Any]],
    columns: tuple[str, ...],
    when: Callable[[dict[str, Any]], str],
) -> str:
    """A plain aligned text table."""
    if not rows:
        return f"{title}: none\n"
    cells = [[when(row), *(_cell(row.get(c)) for c in columns)] for row in rows]
    header = ["created (UTC)", *columns]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *cells, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return f"{title} ({len(rows)})\n" + "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def say(text: str) -> None:
    """Print a line of human-readable output."""
    print(text, flush=True)


def show(data: dict[str, Any]) -> None:
    """Print a JSON document readably."""
    print(json.dumps(data, indent=2, default=str), flush=True)


def usd(raw: str) -> Decimal:
    """A positive dollar amount (argparse type)."""
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not an amount: {raw!r}") from None
    if not value.is_finite() or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive amount: {raw!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="relay", description="x402-paid, moderated SMS relay")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log INFO lines (-vv: DEBUG)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve the HTTP API (gunicorn)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=16)
    p.set_defaults(func=serve)
    p = sub.add_parser("dev", help="run the whole stack locally (chain, token, outbox)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--database", default=None, help="database URL (default: a temporary file)")
    p.add_argument("--demo", action="store_true", help="send one paid SMS end to end and exit")
    p.set_defaults(func=dev)
    for name, func in (("quote", quote), ("send", send)):
        p = sub.add_parser(name, help=f"{name} a message through RELAY_URL")
        p.add_argument("--to", required=True, help="destination phone number")
        p.add_argument("--smart-encoding", action="store_true")
        if name == "send":
            p.add_argument("--max-price", type=usd, required=True, help="USD cap, e.g. 0.10")
        p.add_argument("message")
        p.set_defaults(func=func)
    p = sub.add_parser("status", help="status of a message (from the database)")
    p.add_argument("message_id")
    p.set_defaults(func=status)
    p = sub.add_parser("ledger", help="list payments, messages and refunds")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=ledger)
    sub.add_parser("worker", help="finish stalled payments and refunds continuously").set_defaults(
        func=worker
    )
    p = sub.add_parser("reconcile", help="finish stalled payments once, now")
    p.add_argument(
        "--all",
        action="store_true",
        help="also payments leased to a live request (only with no server running)",
    )
    p.set_defaults(func=reconcile)
    sub.add_parser("doctor", help="check configuration and reachability").set_defaults(func=doctor)
    db = sub.add_parser("db", help="database maintenance")
    dbsub = db.add_subparsers(dest="db_command", required=True)
    dbsub.add_parser("upgrade", help="create or migrate the schema").set_defaults(func=db_upgrade)
    return parser


#: Commands that run services log INFO lines by default; the others only warnings.
_SERVICE_COMMANDS = ("serve", "worker", "dev", "reconcile", "db")


def _log_level(args: argparse.Namespace) -> str:
    if args.verbose >= 2:
        return "DEBUG"
    return "INFO" if args.verbose or args.command in _SERVICE_COMMANDS else "WARNING"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `relay` console script."""
    args = build_parser().parse_args(argv)
    configure_logging(_log_level(args), "text", force=True)
    func: Command = args.func
    try:
        return func(args)
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    except SchemaMissing as exc:
        print(f"database: {exc}", file=sys.stderr)
        return 1
    except requests.RequestException as exc:
        url = getattr(exc.request, "url", None) or "the relay"
        print(f"relay_unreachable: cannot reach {url} ({type(exc).__name__})", file=sys.stderr)
        return 1
    except RelayError as exc:
        print(f"{exc.code}: {exc.message}", file=sys.stderr)
        if exc.details:
            print(json.dumps(exc.details, default=str), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
