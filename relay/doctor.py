"""`relay doctor` (SPEC §14): check configuration and reachability before serving.

``run_checks(settings)`` runs every check and returns one ``Check`` per line of the report;
``render(checks)`` formats them as an aligned PASS/FAIL/SKIP table and ``main(settings, out)``
prints it and returns the exit status (1 when anything failed).

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
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal
from pathlib import Path
from typing import Any, Literal, TextIO
from urllib.parse import quote, urlsplit

import requests
from eth_account import Account
from eth_typing import ChecksumAddress
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from web3 import Web3
from web3.exceptions import BadFunctionCallOutput, ContractLogicError
from x402.http import FacilitatorConfig, HTTPFacilitatorClientSync

from relay import migrations
from relay.abi import load_abi
from relay.ledger import FORWARDED_NOTICE, Ledger, missing_sqlite_file
from relay.moderation import GEMINI_API_VERSION, GEMINI_DEFAULT_BASE_URL
from relay.settings import Settings, read_settings

#: Deadline for all checks together (they run side by side).
CHECK_TIMEOUT_SECONDS = 20.0
#: Connect and read timeout of every chain, facilitator, Sinch and database request.
HTTP_TIMEOUT_SECONDS = 5.0
GEMINI_TIMEOUT_SECONDS = 10.0
#: A settlement (transferWithAuthorization) costs well under this much gas.
SETTLEMENT_GAS = 100_000
#: The settler and the refund wallet should afford at least this many transactions.
MIN_TRANSACTIONS = 20
USDC_DECIMALS = 6
ZERO_ADDRESS = "0x" + "0" * 40

Status = Literal["PASS", "FAIL", "SKIP"]
Probe = Callable[[Settings], tuple[Status, str]]


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


class _Problem(Exception):
    """Raised inside a check: a FAIL whose message is safe to show as it is."""


# --- running, rendering -------------------------------------------------------------------


def run_checks(
    settings: Settings,
    *,
    problems: Sequence[str] | None = None,
    timeout: float = CHECK_TIMEOUT_SECONDS,
) -> list[Check]:
    """Every check, in report order. ``problems``: the configuration problems found while
    reading the environment (``read_settings``); by default those of ``settings``."""
    found = settings.problems() if problems is None else list(problems)
    checks = [_configuration(found), *_run_probes(settings, PROBES, timeout)]
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


def main(settings: Settings, out: TextIO, *, problems: Sequence[str] | None = None) -> int:
    """Run the checks, write the table to ``out``; 0 when nothing failed, else 1."""
    checks = run_checks(settings, problems=problems)
    out.write(render(checks))
    out.flush()
    return 0 if all(check.ok for check in checks) else 1


def run_from_environment(
    out: TextIO | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    env_file: str | Path | None = ".env",
) -> int:
    """The `relay doctor` command: load the settings leniently, check, print; exit status."""
    settings, problems = read_settings(environ, env_file)
    return main(settings, out or sys.stdout, problems=problems)


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
    except Exception as exc:
        status, detail = "FAIL", _describe(exc)
    return Check(name, status != "FAIL", " ".join(detail.split()), skipped=status == "SKIP")


# --- 1. configuration ---------------------------------------------------------------------


def _configuration(problems: Sequence[str]) -> Check:
    if not problems:
        return Check("configuration", True, "no problems found")
    count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
    return Check("configuration", False, f"{count}: {'; '.join(problems)}")


# --- 2. database --------------------------------------------------------------------------


def check_database(settings: Settings) -> tuple[Status, str]:
    """Reachable, and its schema is the one this release uses (nothing is created)."""
    try:
        url = make_url(settings.database_url)
    except ArgumentError:
        raise _Problem("DATABASE_URL is not a database URL") from None
    shown = url.render_as_string(hide_password=True)
    missing = missing_sqlite_file(settings.database_url)
    if missing is not None:
        raise _Problem(f"SQLite file {missing} does not exist (run `relay db upgrade`)")
    try:
        ledger = Ledger.from_url(_with_connect_timeout(url).render_as_string(hide_password=False))
    except NoSuchModuleError:
        raise _Problem(f"unsupported database scheme {url.drivername!r}") from None
    try:
        ledger.ping()
        revision = ledger.schema_revision()
    except DBAPIError as exc:
        raise _Problem(f"{shown}: {_driver_message(exc)}") from None
    finally:
        ledger.engine.dispose()
    head = migrations.head()
    if revision == head:
        return "PASS", f"{shown}: schema revision {revision} (head)"
    if revision is not None and not migrations.known(revision):
        return "FAIL", f"{shown}: schema revision {revision}, newer than this release's {head}"
    found = "no schema revision" if revision is None else f"schema revision {revision}"
    return "FAIL", f"{shown}: {found}, this release needs {head} (run `relay db upgrade`)"


def _with_connect_timeout(url: URL) -> URL:
    if url.get_backend_name() != "postgresql" or "connect_timeout" in url.query:
        return url
    return url.update_query_dict({"connect_timeout": str(round(HTTP_TIMEOUT_SECONDS))})


def _driver_message(exc: DBAPIError) -> str:
    lines = [line.strip() for line in str(exc.orig).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc.orig).__name__)[:200]


# --- 3. RPC -------------------------------------------------------------------------------


def check_rpc(settings: Settings) -> tuple[Status, str]:
    """The RPC answers and serves the chain of X402_NETWORK."""
    expected = _expected_chain_id(settings)
    with _web3(settings.rpc_url) as w3:
        chain_id, block = w3.eth.chain_id, w3.eth.block_number
    where = _origin(settings.rpc_url)
    if chain_id != expected:
        return "FAIL", (
            f"{where} serves chain {chain_id}, but X402_NETWORK={settings.x402_network} "
            f"needs chain {expected}"
        )
    return "PASS", f"{where}: chain {chain_id}, block {block}"


def _expected_chain_id(settings: Settings) -> int:
    try:
        return settings.chain_id
    except (ValueError, IndexError):
        raise _Problem(f"X402_NETWORK={settings.x402_network!r} is not eip155:<chain id>") from None


@contextmanager
def _web3(rpc_url: str) -> Iterator[Web3]:
    """A Web3 client with a short timeout and no retries, closed afterwards."""
    if not rpc_url:
        raise _Problem("RPC_URL is not set")
    session = requests.Session()
    try:
        provider = Web3.HTTPProvider(
            rpc_url,
            request_kwargs={"timeout": HTTP_TIMEOUT_SECONDS},
            session=session,
            exception_retry_configuration=None,
        )
        yield Web3(provider)
    finally:
        session.close()


# --- 4. token -----------------------------------------------------------------------------


def check_token(settings: Settings) -> tuple[Status, str]:
    """USDC_ADDRESS holds a token with the EIP-712 domain the payments are signed for."""
    address = _address(settings.usdc_address, "USDC_ADDRESS")
    with _web3(settings.rpc_url) as w3:
        if not w3.eth.get_code(address):
            return "FAIL", f"no contract at {address} on chain {w3.eth.chain_id}"
        token = w3.eth.contract(address=address, abi=load_abi("USDC"))
        name = str(token.functions.name().call())
        version = str(token.functions.version().call())
        decimals = int(token.functions.decimals().call())
    found = f"{address}: name {name[:40]!r}, version {version[:20]!r}, {decimals} decimals"
    want_name, want_version = settings.usdc_eip712
    if (name, version) != (want_name, want_version):
        return "FAIL", f"{found}; payments are signed for {want_name!r} version {want_version!r}"
    if decimals != USDC_DECIMALS:
        return "FAIL", f"{found}; prices assume {USDC_DECIMALS} decimals"
    return "PASS", found


# --- 5. payTo -----------------------------------------------------------------------------


def check_pay_to(settings: Settings) -> tuple[Status, str]:
    """PAY_TO_ADDRESS is a valid, non-zero address; what lives there is reported."""
    address = _address(settings.pay_to_address, "PAY_TO_ADDRESS")
    if address == ZERO_ADDRESS:
        return "FAIL", "PAY_TO_ADDRESS is the zero address: payments would be burnt"
    usdc = settings.usdc_address
    if Web3.is_address(usdc) and address == Web3.to_checksum_address(usdc):
        return "FAIL", "PAY_TO_ADDRESS is the token contract itself"
    return "PASS", f"{address} ({_account_kind(settings.rpc_url, address)})"


def _account_kind(rpc_url: str, address: ChecksumAddress) -> str:
    try:
        with _web3(rpc_url) as w3:
            code = bytes(w3.eth.get_code(address))
    except Exception:
        return "code not checked: RPC unavailable"
    if not code:
        return "an account without code"
    if code.startswith(b"\xef\x01\x00"):
        return "an account delegating to a contract (EIP-7702)"
    return f"a contract ({len(code)} bytes of code): make sure it can move USDC"


# --- 6. facilitator -----------------------------------------------------------------------


def check_facilitator(settings: Settings) -> tuple[Status, str]:
    """local: the settler can pay gas; remote: the facilitator supports exact on the network."""
    if settings.facilitator == "local":
        return _check_settler(settings)
    return _check_remote_facilitator(settings)


def _check_settler(settings: Settings) -> tuple[Status, str]:
    address = _key_address(settings.settler_private_key, "SETTLER_PRIVATE_KEY")
    with _web3(settings.rpc_url) as w3:
        balance, price = int(w3.eth.get_balance(address)), int(w3.eth.gas_price)
    detail = f"local; settler {address} holds {_eth(balance)} ETH" + _afford(balance, price)
    shortfall = _gas_shortfall(balance, price)
    return ("FAIL", f"{detail}; {shortfall}") if shortfall else ("PASS", detail)


def _check_remote_facilitator(settings: Settings) -> tuple[Status, str]:
    where = _origin(settings.facilitator_url)
    client = HTTPFacilitatorClientSync(
        FacilitatorConfig(url=settings.facilitator_url, timeout=HTTP_TIMEOUT_SECONDS)
    )
    try:
        supported = client.get_supported()
    except ValueError as exc:
        status = re.search(r"\((\d{3})\)", str(exc))
        answer = f"HTTP {status.group(1)}" if status else "an unreadable answer"
        raise _Problem(f"remote {where}: GET /supported gave {answer}") from None
    finally:
        client.close()
    listed = any(
        kind.x402_version == 2 and kind.scheme == "exact" and kind.network == settings.x402_network
        for kind in supported.kinds
    )
    if not listed:
        return "FAIL", f"remote {where} does not list exact on {settings.x402_network} (x402 v2)"
    return "PASS", f"remote {where}: supports exact on {settings.x402_network}"


# --- 7. refund wallet ---------------------------------------------------------------------


def check_refund_wallet(settings: Settings) -> tuple[Status, str]:
    """With REFUND_PRIVATE_KEY: the wallet holds gas and USDC to send back."""
    if not settings.refund_private_key:
        return "SKIP", "REFUND_PRIVATE_KEY not set: no automatic refunds"
    address = _key_address(settings.refund_private_key, "REFUND_PRIVATE_KEY")
    token_address = _address(settings.usdc_address, "USDC_ADDRESS")
    with _web3(settings.rpc_url) as w3:
        balance, price = int(w3.eth.get_balance(address)), int(w3.eth.gas_price)
        token = w3.eth.contract(address=token_address, abi=load_abi("USDC"))
        usdc = int(token.functions.balanceOf(address).call())
    detail = f"{address} holds {_eth(balance)} ETH{_afford(balance, price)}, {_usdc(usdc)} USDC"
    shortfalls = [_gas_shortfall(balance, price), "" if usdc else "no USDC to refund with"]
    missing = "; ".join(s for s in shortfalls if s)
    return ("FAIL", f"{detail}; {missing}") if missing else ("PASS", detail)


# --- 8. Gemini ----------------------------------------------------------------------------


def check_gemini(settings: Settings) -> tuple[Status, str]:
    """One generateContent call of a few tokens: the key, the model and the endpoint work."""
    if settings.moderation_provider != "gemini":
        return "SKIP", "MODERATION_PROVIDER=rules (development only: no LLM)"
    if not settings.gemini_api_key:
        raise _Problem("GEMINI_API_KEY is not set")
    model = settings.gemini_model
    base_url = settings.gemini_base_url or GEMINI_DEFAULT_BASE_URL
    client = genai.Client(
        vertexai=False,
        api_key=settings.gemini_api_key,
        http_options=types.HttpOptions(
            base_url=base_url,
            api_version=GEMINI_API_VERSION,
            timeout=round(GEMINI_TIMEOUT_SECONDS * 1000),
            retry_options=None,
        ),
    )
    try:
        client.models.generate_content(model=model, contents="Say OK.", config=_ping_config(model))
    except genai_errors.APIError as exc:
        raise _Problem(f"{_origin(base_url)}: {_gemini_failure(exc, model)}") from None
    finally:
        client.close()
    return "PASS", f"{_origin(base_url)}: key accepted, {model} answered"


def _ping_config(model: str) -> types.GenerateContentConfig:
    thinking_off = model.removeprefix("models/").startswith("gemini-2.5-flash")
    return types.GenerateContentConfig(
        temperature=0.0,
        max_output_tokens=1,
        thinking_config=types.ThinkingConfig(thinking_budget=0) if thinking_off else None,
    )


def _gemini_failure(exc: genai_errors.APIError, model: str) -> str:
    code, state = exc.code, f"HTTP {exc.code} {exc.status or ''}".strip()
    about_key = "API key" in (exc.message or "") or "API_KEY" in str(exc.details)
    if code in (401, 403) or (code == 400 and about_key):
        return f"key rejected ({state})"
    if code == 404:
        return f"model {model!r} not found ({state})"
    if code == 429:
        return f"quota exhausted or rate limited ({state})"
    return f"call failed ({state})"


# --- 9. Sinch -----------------------------------------------------------------------------


def check_sinch(settings: Settings) -> tuple[Status, str]:
    """The service plan id and API token are accepted (lists one batch; sends nothing)."""
    if settings.sms_provider != "sinch":
        return "SKIP", "SMS_PROVIDER=outbox (development only: messages stay in the database)"
    plan, token = settings.sinch_service_plan_id, settings.sinch_api_token
    if not plan or not token:
        raise _Problem("SINCH_SERVICE_PLAN_ID and SINCH_API_TOKEN are required")
    base = settings.sinch_base.rstrip("/")
    with requests.Session() as session:
        response = session.get(
            f"{base}/xms/v1/{quote(plan, safe='')}/batches",
            params={"page_size": 1},
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            timeout=(HTTP_TIMEOUT_SECONDS, HTTP_TIMEOUT_SECONDS),
            allow_redirects=False,
        )
    where, code = _origin(base), response.status_code
    if code == 200:
        return "PASS", f"{where}: service plan and API token accepted"
    if code in (401, 403):
        return "FAIL", f"{where}: credentials rejected (HTTP {code})"
    if code == 404:
        return "FAIL", f"{where}: service plan not found (HTTP 404; check SINCH_REGION)"
    return "FAIL", f"{where}: unexpected answer (HTTP {code})"


#: The checks after configuration, in report order; each runs in its own thread.
# --- 10. proxies ---------------------------------------------------------------------------


def check_proxies(settings: Settings) -> tuple[Status, str]:
    """Clients are told apart: behind a proxy, TRUSTED_PROXY_HOPS must count it."""
    if settings.trusted_proxy_hops:
        return "PASS", f"TRUSTED_PROXY_HOPS={settings.trusted_proxy_hops}"
    try:
        ledger = Ledger.open_existing(settings.database_url)
    except Exception:
        return "SKIP", "database unavailable"
    try:
        seen = ledger.noted(FORWARDED_NOTICE)
    finally:
        ledger.engine.dispose()
    if seen is None:
        return "PASS", "no request arrived through a proxy (TRUSTED_PROXY_HOPS=0)"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(seen))
    return "FAIL", (
        f"requests arrived with X-Forwarded-For ({when}) but TRUSTED_PROXY_HOPS=0: every "
        "client behind the proxy shares one address and one rate limit; set "
        "TRUSTED_PROXY_HOPS to the number of proxies in front"
    )


PROBES: tuple[tuple[str, Probe], ...] = (
    ("database", check_database),
    ("rpc", check_rpc),
    ("token", check_token),
    ("payTo", check_pay_to),
    ("facilitator", check_facilitator),
    ("refund wallet", check_refund_wallet),
    ("gemini", check_gemini),
    ("sinch", check_sinch),
    ("proxies", check_proxies),
)


# --- helpers ------------------------------------------------------------------------------


def _address(value: str, variable: str) -> ChecksumAddress:
    if not Web3.is_address(value):
        raise _Problem(f"{variable} is not an EVM address (or its checksum is wrong)")
    return Web3.to_checksum_address(value)


def _key_address(key: str | None, variable: str) -> ChecksumAddress:
    if not key:
        raise _Problem(f"{variable} is not set")
    try:
        account = Account.from_key(key)
    except Exception:
        raise _Problem(f"{variable} is not a 32-byte hex private key") from None
    return Web3.to_checksum_address(account.address)


def _gas_shortfall(balance: int, gas_price: int) -> str:
    needed = MIN_TRANSACTIONS * SETTLEMENT_GAS * gas_price
    if balance > 0 and balance >= needed:
        return ""
    return f"needs at least {_eth(max(needed, 1))} ETH for {MIN_TRANSACTIONS} transactions"


def _afford(balance: int, gas_price: int) -> str:
    if gas_price <= 0:
        return " (gas price 0)"
    count = balance // (SETTLEMENT_GAS * gas_price)
    return f" (about {count} transactions at {_decimal(gas_price, 9, 4)} gwei)"


def _eth(wei: int) -> str:
    return _decimal(wei, 18, 6)


def _usdc(atomic: int) -> str:
    return _decimal(atomic, USDC_DECIMALS, USDC_DECIMALS)


def _decimal(atomic: int, decimals: int, places: int) -> str:
    value = Decimal(atomic).scaleb(-decimals).quantize(Decimal(1).scaleb(-places), ROUND_DOWN)
    if atomic > 0 and value == 0:
        return f"<{Decimal(1).scaleb(-places)}"
    text = f"{value:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _origin(url: str) -> str:
    """scheme://host[:port] of a URL: paths and queries may hold keys, so they are not shown."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(unreadable URL)"
    return f"{parts.scheme}://{parts.hostname or ''}{port}"


def _describe(exc: BaseException) -> str:
    """A short, secret-free description of what went wrong (never the exception's text)."""
    if isinstance(exc, _Problem):
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
