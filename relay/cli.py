"""The `relay` command: serve, worker, dev, quote, send, status, ledger, reconcile, doctor, db."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import httpx
import simplejson
from sqlalchemy import make_url
from sqlalchemy.exc import DBAPIError

from relay.errors import RelayError
from relay.ledger import Ledger, SchemaMissing
from relay.logs import configure_logging
from relay.settings import SettingsError, load_client_settings, load_settings, read_settings

Command = Callable[[argparse.Namespace], int]


def serve(args: argparse.Namespace) -> int:
    """Upgrade the database, then serve the app with gunicorn (the same server as
    production), with the reconciler running in its workers; the loops of every process
    elect one to work at a time. The workers only open the upgraded database."""
    from gunicorn.app.base import BaseApplication

    from relay import gunicorn_conf

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format, force=True)
    _upgrade(settings.database_url)

    class _Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            self.cfg.set("bind", f"{args.host}:{args.port}")
            self.cfg.set("workers", args.workers)
            self.cfg.set("threads", args.threads)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("timeout", 120)
            self.cfg.set("accesslog", "-")
            self.cfg.set("logger_class", gunicorn_conf.logger_class)
            self.cfg.set("post_worker_init", _start_reconciler)
            for name, hook in gunicorn_conf.HOOKS.items():  # configuration, metrics directory
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
        while services is None:  # until `relay db upgrade` has run, or the database is back
            try:
                services = build_services(settings)
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

    with RelayClient(load_client_settings().relay_url) as client:
        show(client.quote(args.message, args.to, smart_encoding=args.smart_encoding))
    return 0


def send(args: argparse.Namespace) -> int:
    """Quote, pay and send one SMS; PAYER_PRIVATE_KEY pays, never above --max-price."""
    from relay.client import RelayClient, new_payment_id

    config = load_client_settings()
    if not config.payer_private_key:
        say("PAYER_PRIVATE_KEY must be set to the key of the wallet that pays")
        return 2
    with RelayClient(
        config.relay_url,
        config.payer_private_key,
        pay_password=config.pay_password,
        on_step=lambda step: say(f"... {step}"),
    ) as client:
        payment_id = args.payment_id or new_payment_id()
        say(f"paying from {client.address}, at most {args.max_price} USD")
        say(f"payment id {payment_id}: after an error, repeat with --payment-id {payment_id}")
        result = client.send(
            args.message,
            args.to,
            max_price_usd=args.max_price,
            smart_encoding=args.smart_encoding,
            payment_id=payment_id,
        )
    show(result)
    return 0


def mcp(args: argparse.Namespace) -> int:
    """Serve MCP tools that pay from PAYER_PRIVATE_KEY, or (--paid) the relay's paid send_sms."""
    from relay.mcp_tools import serve as serve_mcp

    if args.paid:  # the relay's own paid tool, configured like `relay serve`
        from relay.mcp_paid import serve as serve_paid

        serve_paid(load_settings(), http=args.http, host=args.host, port=args.port)
        return 0
    config = load_client_settings()
    if not config.payer_private_key:
        print("PAYER_PRIVATE_KEY must be set to the key of the wallet that pays", file=sys.stderr)
        return 2
    serve_mcp(config, http=args.http, host=args.host, port=args.port)
    return 0


def status(args: argparse.Namespace) -> int:
    """The status of a message, from the database (or the relay's API with --api); with
    --wait, polled until it is delivered, failed or refunded (exit 3 if --timeout passes)."""
    from relay.client import FINAL_STATUSES, poll_until_final

    fetch = _status_source(args)
    found = fetch()
    if found is None:
        say(f"no message {args.message_id}")
        return 1
    if args.wait and found["status"] not in FINAL_STATUSES:
        found = poll_until_final(lambda: fetch() or {}, args.timeout)
    show(readable_status(found))
    return 0 if not args.wait or found["status"] in FINAL_STATUSES else 3


def _status_source(args: argparse.Namespace) -> Callable[[], dict[str, Any] | None]:
    """Where `relay status` reads a message: the relay's API, or the database."""
    from relay.client import RelayClient
    from relay.flows.status import message_status

    if args.api:
        config = load_client_settings()
        client = RelayClient(config.relay_url, pay_password=config.pay_password)
        return functools.partial(client.status, args.message_id)
    return functools.partial(message_status, _ledger(), args.message_id)


def ledger(args: argparse.Namespace) -> int:
    """Payments, messages and refunds, newest first."""

    book = _ledger()
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

    services = _services()
    if args.all and services.ledger.busy_leases(time.time()):
        print(
            "warning: --all takes payments from processes that hold them, and another relay "
            "process is live (it holds a lease): stop every server and worker first, or a "
            "payment may be acted on twice",
            file=sys.stderr,
        )
    say("reconciling unfinished payments...")
    results = reconcile_all(services, force=args.all, progress=progress)
    say(f"done: {len(results)} payment(s) looked at")
    return 0


def doctor(args: argparse.Namespace) -> int:
    """Check configuration and reachability; non-zero when something fails."""
    from relay import doctor as checks

    return checks.run_from_environment(dev=args.dev)


def db_upgrade(_args: argparse.Namespace) -> int:
    """Create or migrate the database schema (the Procfile's release step)."""
    _upgrade(load_settings().database_url)
    return 0


def _upgrade(url: str) -> None:

    say(f"database schema at revision {Ledger.upgrade_database(url)}")


def db_revision(args: argparse.Namespace) -> int:
    """Write the next migration: what the tables in relay/ledger.py have and the database
    (at the head revision) lacks."""
    from relay import migrations

    book = Ledger.open_existing(load_settings().database_url)
    with book.begin() as conn:
        path = migrations.revision(conn, args.message)
    book.engine.dispose()
    if path is None:
        say("the tables match the database: no revision written")
        return 1
    say(f"wrote {path}")
    return 0


def _ledger() -> Ledger:
    """The ledger alone, for commands that only read it: DATABASE_URL is all they need."""
    settings, problems = read_settings()
    wrong = [problem for problem in problems if problem.startswith("DATABASE_URL")]
    if wrong:
        raise SettingsError(wrong)
    return Ledger.open_existing(settings.database_url)


def _services() -> Any:
    from relay.services import build_services

    return build_services(load_settings())


def _when(row: dict[str, Any]) -> str:
    stamp = row.get("created_at")
    return utc(float(stamp)) if stamp else ""


def utc(stamp: float) -> str:
    """A moment as the CLI prints it everywhere: UTC, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp))


def readable_status(document: dict[str, Any]) -> dict[str, Any]:
    """The status document with its moments in UTC instead of epoch seconds."""
    events = [{**event, "at": utc(event["at"])} for event in document["events"]]
    moments = {key: utc(document[key]) for key in ("created_at", "updated_at")}
    return {**document, **moments, "events": events}


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
    print(simplejson.dumps(data, indent=2, use_decimal=True, default=str), flush=True)


def payment_identifier(raw: str) -> str:
    """An x402 payment identifier (argparse type), as the SDK defines one."""
    from x402.extensions.payment_identifier import is_valid_payment_id

    if not is_valid_payment_id(raw):
        raise argparse.ArgumentTypeError(f"not a payment id: {raw!r}")
    return raw


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
            p.add_argument(
                "--payment-id",
                type=payment_identifier,
                help="the id printed by a send that ended in an error: repeating it never "
                "pays twice",
            )
        p.add_argument("message")
        p.set_defaults(func=func)
    p = sub.add_parser("mcp", help="MCP server whose tools pay for SMS (stdio by default)")
    p.add_argument("--http", action="store_true", help="serve streamable HTTP at /mcp instead")
    p.add_argument("--paid", action="store_true", help="serve the relay's paid send_sms tool")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.set_defaults(func=mcp)
    p = sub.add_parser("status", help="status of a message (from the database)")
    p.add_argument("message_id")
    p.add_argument("--api", action="store_true", help="ask the relay at RELAY_URL instead")
    p.add_argument(
        "--wait", action="store_true", help="until delivered, failed or refunded (exit 3: not yet)"
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds --wait waits at most")
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
    p = sub.add_parser("doctor", help="check configuration and reachability")
    p.add_argument(
        "--dev", action="store_true", help="accept the development providers (rules, outbox)"
    )
    p.set_defaults(func=doctor)
    db = sub.add_parser("db", help="database maintenance")
    dbsub = db.add_subparsers(dest="db_command", required=True)
    dbsub.add_parser("upgrade", help="create or migrate the schema").set_defaults(func=db_upgrade)
    p = dbsub.add_parser("revision", help="write the next migration from the tables (development)")
    p.add_argument("-m", "--message", required=True, help="what the migration does")
    p.set_defaults(func=db_revision)
    return parser


def database_problem(exc: DBAPIError) -> str:
    """One line saying what the database said and which DATABASE_URL was tried (no password)."""
    said = str(exc.orig or exc).strip().splitlines()
    reason = said[0].replace("FATAL:  ", "") if said else type(exc).__name__
    url = make_url(read_settings()[0].database_url).render_as_string(hide_password=True)
    return f"{reason} (DATABASE_URL={url})"


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
    except DBAPIError as exc:  # the database is away, refuses us, or does not exist
        print(f"database: {database_problem(exc)}", file=sys.stderr)
        return 1
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        where = _requested_url(exc)
        print(f"relay_unreachable: cannot reach {where} ({type(exc).__name__})", file=sys.stderr)
        return 1
    except RelayError as exc:
        print(f"{exc.code}: {exc.message}", file=sys.stderr)
        if exc.details:
            print(json.dumps(exc.details, default=str), file=sys.stderr)
        return 1


def _requested_url(error: httpx.HTTPError | httpx.InvalidURL) -> str:
    """The URL a failed request went to; "the relay" when it failed before it was made."""
    try:
        return str(error.request.url) if isinstance(error, httpx.HTTPError) else "the relay"
    except RuntimeError:  # httpx raises it for an error that carries no request
        return "the relay"


if __name__ == "__main__":
    sys.exit(main())
