"""`relay doctor`'s checks of the other services: the database, Gemini, Sinch, and the proxies
in front of the relay."""

from __future__ import annotations

import dataclasses
import time

import httpx
from google.genai import errors as genai_errors
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from relay import migrations
from relay.doctor.probe import HTTP_TIMEOUT_SECONDS, Problem, Status, origin
from relay.gemini import GEMINI_DEFAULT_BASE_URL, gemini_client, ping_config
from relay.ledger import FORWARDED_NOTICE, Ledger, missing_sqlite_file
from relay.ratelimit import STORAGE_SCHEMES, Limiter
from relay.settings import DATABASE_SCHEMES, Settings
from relay.sinch import sinch_client

GEMINI_TIMEOUT_SECONDS = 10.0


# --- 2. database --------------------------------------------------------------------------


def check_database(settings: Settings) -> tuple[Status, str]:
    """Reachable, and its schema is the one this release uses (nothing is created)."""
    try:
        url = make_url(settings.database_url)
    except ArgumentError:
        raise Problem("DATABASE_URL is not a database URL") from None
    shown = url.render_as_string(hide_password=True)
    scheme = settings.database_url.partition("://")[0]
    if scheme not in DATABASE_SCHEMES:
        raise Problem(
            f"DATABASE_URL={shown}: scheme {scheme!r} is not supported (sqlite or postgresql)"
        )
    missing = missing_sqlite_file(settings.database_url)
    if missing is not None:
        raise Problem(f"SQLite file {missing} does not exist (run `relay db upgrade`)")
    try:
        ledger = Ledger.from_url(_with_connect_timeout(url).render_as_string(hide_password=False))
    except NoSuchModuleError:
        raise Problem(f"unsupported database scheme {url.drivername!r}") from None
    try:
        ledger.ping()
        revision = ledger.schema_revision()
    except DBAPIError as exc:
        raise Problem(f"{shown}: {_driver_message(exc)}") from None
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


# --- 8. Gemini ----------------------------------------------------------------------------


def check_gemini(settings: Settings) -> tuple[Status, str]:
    """One generateContent call of a few tokens: the key, the model and the endpoint work."""
    if settings.moderation_provider != "gemini":
        return "SKIP", "MODERATION_PROVIDER=rules (development only: no LLM)"
    if not settings.gemini_api_key:
        raise Problem("GEMINI_API_KEY is not set")
    config = dataclasses.replace(settings.gemini(), timeout_seconds=GEMINI_TIMEOUT_SECONDS)
    model, where = config.model, origin(config.base_url or GEMINI_DEFAULT_BASE_URL)
    with httpx.Client() as http:
        client = gemini_client(config, http)
        try:
            client.models.generate_content(
                model=model, contents="Say OK.", config=ping_config(model)
            )
        except genai_errors.APIError as exc:
            raise Problem(f"{where}: {_gemini_failure(exc, model)}") from None
        finally:
            client.close()
    return "PASS", f"{where}: key accepted, {model} answered"


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
        raise Problem("SINCH_SERVICE_PLAN_ID and SINCH_API_TOKEN are required")
    timeout = httpx.Timeout(HTTP_TIMEOUT_SECONDS)
    with sinch_client(settings.sinch_base, plan, token, timeout) as http:
        response = http.get("batches", params={"page_size": 1})
    where, code = origin(settings.sinch_base), response.status_code
    if code == 200:
        return "PASS", f"{where}: service plan and API token accepted"
    if code in (401, 403):
        return "FAIL", f"{where}: credentials rejected (HTTP {code})"
    if code == 404:
        return "FAIL", f"{where}: service plan not found (HTTP 404; check SINCH_REGION)"
    return "FAIL", f"{where}: unexpected answer (HTTP {code})"


# --- rate limits ---------------------------------------------------------------------------


def check_rate_limits(settings: Settings) -> tuple[Status, str]:
    """The shared rate-limit storage answers (memory:// counts in each process alone)."""
    url = settings.rate_limit_storage_url
    if url.startswith("memory://"):
        return "PASS", "memory:// (each process counts alone: use redis:// for several)"
    scheme = url.partition("://")[0]
    if scheme not in STORAGE_SCHEMES:
        raise Problem(f"RATE_LIMIT_STORAGE_URL scheme {scheme!r} is not supported")
    Limiter(url, "1/second").ping()
    return "PASS", f"{origin(url)} answers"


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
