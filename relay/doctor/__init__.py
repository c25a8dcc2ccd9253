"""`relay doctor` (SPEC §14): check configuration and reachability before serving.

``run_checks(settings)`` runs every check and returns one ``Check`` per line of the report;
``render(checks)`` formats them as an aligned PASS/FAIL/SKIP table and ``main(settings, out)``
prints it and returns the exit status (1 when anything failed). The checks themselves live in
``chain_checks`` and ``service_checks``.

Every check is bounded: network calls carry short timeouts, the checks run side by side in
daemon threads and a check that has not answered by the deadline is a FAIL. A check never
raises: an exception becomes a FAIL with a short description of its kind (never the
exception's text, which may hold a URL with a key in it), and every detail is scrubbed of
the configured secrets before it is shown. The doctor only reads: it creates no database,
file or schema, and sends no SMS; the Gemini check costs one call of a few tokens.
"""

from __future__ import annotations

import dataclasses
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import make_url
from web3.exceptions import BadFunctionCallOutput, ContractLogicError

from relay.doctor.chain_checks import (
    check_facilitator,
    check_pay_to,
    check_refund_wallet,
    check_rpc,
    check_token,
)
from relay.doctor.probe import HTTP_TIMEOUT_SECONDS, Probe, Problem, Status
from relay.doctor.service_checks import (
    check_database,
    check_gemini,
    check_proxies,
    check_rate_limits,
    check_sinch,
)
from relay.gemini import GEMINI_DEFAULT_BASE_URL
from relay.settings import Settings, read_settings

#: Deadline for all checks together (they run side by side).
CHECK_TIMEOUT_SECONDS = 20.0
#: The checks after configuration, in report order; each runs in its own thread.
PROBES: tuple[tuple[str, Probe], ...] = (
    ("database", check_database),
    ("rpc", check_rpc),
    ("token", check_token),
    ("payTo", check_pay_to),
    ("facilitator", check_facilitator),
    ("refund wallet", check_refund_wallet),
    ("gemini", check_gemini),
    ("sinch", check_sinch),
    ("rate limits", check_rate_limits),
    ("proxies", check_proxies),
)

#: The variable each check reaches, named with the value tried when the check fails.
TRIED: dict[str, Callable[[Settings], tuple[str, str | None]]] = {
    "database": lambda s: ("DATABASE_URL", s.database_url),
    "rpc": lambda s: ("RPC_URL", s.rpc_url),
    "token": lambda s: ("RPC_URL", s.rpc_url),
    "payTo": lambda s: ("RPC_URL", s.rpc_url),
    "facilitator": lambda s: (
        ("RPC_URL", s.rpc_url)
        if s.facilitator == "local"
        else ("FACILITATOR_URL", s.facilitator_url)
    ),
    "refund wallet": lambda s: ("RPC_URL", s.rpc_url),
    "gemini": lambda s: ("GEMINI_BASE_URL", s.gemini_base_url or GEMINI_DEFAULT_BASE_URL),
    "sinch": lambda s: ("SINCH_BASE_URL", s.sinch_base),
    "rate limits": lambda s: ("RATE_LIMIT_STORAGE_URL", s.rate_limit_storage_url),
}


@dataclass(frozen=True)
class Check:
    """One line of the report. A skipped check (it does not apply) counts as ok."""

    name: str
    ok: bool
    detail: str
    skipped: bool = False

    @property
    def status(self) -> Status:
        """PASS, FAIL or SKIP."""
        if self.skipped:
            return "SKIP"
        return "PASS" if self.ok else "FAIL"


# --- running, rendering -------------------------------------------------------------------


def run_checks(
    settings: Settings,
    *,
    problems: Sequence[str] | None = None,
    timeout: float = CHECK_TIMEOUT_SECONDS,
    dev: bool = False,
) -> list[Check]:
    """Every check, in report order. ``problems``: the configuration problems found while
    reading the environment (``read_settings``); by default those of ``settings``. ``dev``
    accepts the development providers."""
    found = settings.problems() if problems is None else list(problems)
    checks = [
        _configuration(found),
        _providers(settings, dev),
        *_run_probes(settings, PROBES, timeout),
    ]
    secrets = settings.secrets()
    return [_scrubbed(check, secrets) for check in checks]


def render(checks: Sequence[Check]) -> str:
    """An aligned table, one check per line, and a summary line."""
    header = ("CHECK", "RESULT", "DETAIL")
    rows = [(c.name, c.status, c.detail) for c in checks]
    name_width = max(len(row[0]) for row in [header, *rows])
    status_width = max(len(row[1]) for row in [header, *rows])
    lines = [
        f"{name.ljust(name_width)}  {status.ljust(status_width)}  {detail}".rstrip()
        for name, status, detail in [header, *rows]
    ]
    return "\n".join([*lines, "", _summary(checks)]) + "\n"


def main(
    settings: Settings,
    out: TextIO,
    *,
    problems: Sequence[str] | None = None,
    dev: bool = False,
) -> int:
    """Run the checks, write the table to ``out``; 0 when nothing failed, else 1."""
    checks = run_checks(settings, problems=problems, dev=dev)
    out.write(render(checks))
    out.flush()
    return 0 if all(check.ok for check in checks) else 1


def run_from_environment(
    out: TextIO | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    env_file: str | Path | None = ".env",
    dev: bool = False,
) -> int:
    """The `relay doctor` command: load the settings leniently, check, print; exit status."""
    settings, problems = read_settings(environ, env_file)
    return main(settings, out or sys.stdout, problems=problems, dev=dev)


def _summary(checks: Sequence[Check]) -> str:
    failed = [c.name for c in checks if not c.ok]
    skipped = sum(c.skipped for c in checks)
    if failed:
        return f"{len(failed)} of {len(checks)} checks failed: {', '.join(failed)}"
    return f"all {len(checks) - skipped} checks passed ({skipped} skipped)"


def _run_probes(
    settings: Settings, probes: Sequence[tuple[str, Probe]], timeout: float
) -> list[Check]:
    """Run the probes side by side; one still running at the deadline is a FAIL."""
    deadline = time.monotonic() + timeout
    workers = [_Worker(name, probe, settings) for name, probe in probes]
    for worker in workers:
        worker.start()
    return [worker.result(deadline, timeout) for worker in workers]


class _Worker(threading.Thread):
    """One probe in a daemon thread (a hung network call never blocks the exit)."""

    def __init__(self, check_name: str, probe: Probe, settings: Settings) -> None:
        super().__init__(name=f"doctor-{check_name}", daemon=True)
        self.check_name = check_name
        self._probe = probe
        self._settings = settings
        self._outcome: Check | None = None

    def run(self) -> None:
        self._outcome = _attempt(self.check_name, self._probe, self._settings)

    def result(self, deadline: float, timeout: float) -> Check:
        self.join(max(0.0, deadline - time.monotonic()))
        if self._outcome is None:
            return Check(self.check_name, False, f"no answer within {timeout:g} s")
        return self._outcome


def _attempt(name: str, probe: Probe, settings: Settings) -> Check:
    try:
        status, detail = probe(settings)
    except Problem as exc:
        status, detail = "FAIL", str(exc)
    except Exception as exc:  # say what was tried: the variable and its value
        status, detail = "FAIL", f"{_tried(name, settings)}{_describe(exc)}"
    return Check(name, status != "FAIL", " ".join(detail.split()), skipped=status == "SKIP")


def _tried(name: str, settings: Settings) -> str:
    """ "VARIABLE=value: " for the check's variable (secrets are scrubbed later)."""
    if name not in TRIED:
        return ""
    variable, value = TRIED[name](settings)
    if variable == "DATABASE_URL" and value:
        value = make_url(value).render_as_string(hide_password=True)
    return f"{variable}={value or '(not set)'}: "


# --- 1. configuration ---------------------------------------------------------------------


#: Providers that make the relay a development stack: no LLM, no SMS sent.
DEV_PROVIDERS = {"MODERATION_PROVIDER": "rules", "SMS_PROVIDER": "outbox"}


def _providers(settings: Settings, dev: bool) -> Check:
    """Development providers fail the check unless --dev accepts them."""
    chosen = {
        "MODERATION_PROVIDER": settings.moderation_provider,
        "SMS_PROVIDER": settings.sms_provider,
    }
    found = [f"{name}={value}" for name, value in chosen.items() if DEV_PROVIDERS[name] == value]
    if not found:
        return Check("providers", True, f"{settings.moderation_provider}, {settings.sms_provider}")
    what = f"{' and '.join(found)}: development only (no LLM moderation or no SMS is sent)"
    if dev:
        return Check("providers", True, f"{what}; accepted with --dev")
    return Check("providers", False, f"{what}; use real providers, or --dev to accept")


def _configuration(problems: Sequence[str]) -> Check:
    if not problems:
        return Check("configuration", True, "no problems found")
    count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
    return Check("configuration", False, f"{count}: {'; '.join(problems)}")


# --- describing failures ------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    """A short, secret-free description of what went wrong (never the exception's text)."""
    if isinstance(exc, Problem):
        return str(exc)
    causes = list(_causes(exc))
    for cause in causes:
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, socket.gaierror):
            return "host name not found"
        if isinstance(cause, TimeoutError) or "Timeout" in type(cause).__name__:
            return f"timed out (limit {HTTP_TIMEOUT_SECONDS:g} s)"
    if isinstance(exc, ContractLogicError):
        return "contract call reverted"
    if isinstance(exc, BadFunctionCallOutput):
        return "contract call returned no data (not a token contract?)"
    if any(isinstance(c, OSError) or "ConnectError" in type(c).__name__ for c in causes):
        return "connection failed"
    return f"unexpected error ({type(exc).__name__})"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and everything it wraps: __cause__, __context__, .reason and args."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending and len(seen) < 50:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked: list[Any] = [
            current.__cause__,
            current.__context__,
            getattr(current, "reason", None),
        ]
        linked += list(current.args)
        pending += [item for item in linked if isinstance(item, BaseException)]


# --- keeping secrets out --------------------------------------------------------------------


def _scrubbed(check: Check, secrets: Sequence[str]) -> Check:
    detail = check.detail
    for secret in secrets:
        detail = re.sub(re.escape(secret), "***", detail, flags=re.IGNORECASE)
    return check if detail == check.detail else dataclasses.replace(check, detail=detail)
