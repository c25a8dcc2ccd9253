"""The one settings object, loaded from the environment (and an optional .env) at start-up;
``Settings.chain()``, ``payments()``, ``refunds()``, ``gemini()`` and ``sinch()`` build the
small configuration each adapter takes (``relay.configs``): no adapter sees the whole of it."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from dotenv import dotenv_values
from eth_account import Account
from eth_utils.address import is_address, to_checksum_address
from limits import parse_many
from x402.mechanisms.evm.default_assets import DEFAULT_ASSETS

from relay.configs import ChainConfig, GeminiConfig, PaymentConfig, RefundConfig, SinchConfig
from relay.ratelimit import STORAGE_SCHEMES

DEFAULT_RPC_URLS = {
    "eip155:84532": "https://sepolia.base.org",
    "eip155:8453": "https://mainnet.base.org",
}
DEFAULT_FACILITATOR_URL = "https://x402.org/facilitator"
MAX_BODY_BYTES = 64 * 1024


class SettingsError(Exception):
    """Raised at start-up with every configuration problem found, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("Invalid configuration:\n  - " + "\n  - ".join(problems))


def _secret() -> Any:
    return field(default=None, repr=False)


@dataclass(frozen=True)
class Settings:
    """Every knob of the relay. Secrets are kept out of repr()."""

    quote_secret: str = field(default="", repr=False)
    #: The secret before the last rotation: tokens it signed stay valid until they expire.
    quote_secret_previous: str | None = _secret()
    pay_to_address: str = ""
    pay_password: str | None = _secret()
    quote_ttl_seconds: int = 600
    price_per_segment_usd: Decimal = Decimal("0.05")
    max_segments: int = 10
    x402_network: str = "eip155:84532"
    usdc_address: str = ""
    # May carry an API key or a password: out of repr() (Settings.secrets() has its parts).
    rpc_url: str = field(default="", repr=False)
    facilitator: Literal["local", "remote"] = "remote"
    facilitator_url: str = DEFAULT_FACILITATOR_URL
    settler_private_key: str | None = _secret()
    settlement_timeout_seconds: float = 15.0
    reconcile_after_seconds: float = 300.0
    worker_interval_seconds: float = 15.0
    refund_private_key: str | None = _secret()
    moderation_provider: Literal["gemini", "rules"] = "gemini"
    gemini_api_key: str | None = _secret()
    gemini_model: str = "gemini-2.5-flash"
    gemini_base_url: str | None = None
    gemini_price_input_per_m: Decimal | None = None
    gemini_price_output_per_m: Decimal | None = None
    gemini_timeout_seconds: float = 15.0
    gemini_max_attempts: int = 3
    sms_provider: Literal["sinch", "outbox"] = "sinch"
    sinch_service_plan_id: str | None = None
    sinch_api_token: str | None = _secret()
    sinch_region: str = "us"
    sinch_from: str | None = None
    sinch_base_url: str | None = None
    sinch_callback_secret: str | None = _secret()
    sinch_signing_secret: str | None = _secret()
    opt_out_line: str = "Reply STOP to opt out"
    database_url: str = field(default="sqlite:///relay.db", repr=False)
    quote_rate_limit: str = "30/minute"
    rate_limit_storage_url: str = "memory://"
    public_base_url: str | None = None
    cors_origins: str = "*"
    trusted_proxy_hops: int = 0
    pay_password_max_failures: int = 5
    pay_password_lockout_seconds: int = 300
    max_body_bytes: int = MAX_BODY_BYTES
    #: Development only: callback URLs may point at private and loopback addresses.
    allow_private_callbacks: bool = False
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    metrics_token: str | None = _secret()

    def __post_init__(self) -> None:
        if not self.usdc_address and self.x402_network in DEFAULT_ASSETS:
            asset = DEFAULT_ASSETS[self.x402_network][0]["asset"]
            object.__setattr__(self, "usdc_address", asset)
        if not self.rpc_url:
            object.__setattr__(self, "rpc_url", DEFAULT_RPC_URLS.get(self.x402_network, ""))
        if self.database_url.startswith("postgres://"):  # as hosting platforms hand it out
            url = "postgresql://" + self.database_url.removeprefix("postgres://")
            object.__setattr__(self, "database_url", url)

    @property
    def max_message_chars(self) -> int:
        """A bound on `message` derived from MAX_SEGMENTS: no text longer than 160
        characters a segment can fit (a character is at least one septet), so anything
        longer is refused before it is counted; the segment count is the real limit
        (422 message_too_long)."""
        return 160 * self.max_segments

    @property
    def body_limit(self) -> int:
        """The largest request body: MAX_BODY_BYTES, or more when the longest message,
        written as JSON \\u escapes (6 bytes a character), needs it."""
        return max(self.max_body_bytes, 6 * self.max_message_chars + 4096)

    @property
    def cors_origin_list(self) -> tuple[str, ...]:
        """The browser origins allowed to call the API ("*" is any; empty is none)."""
        return tuple(o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip())

    @property
    def sinch_base(self) -> str:
        """The Sinch REST base URL."""
        return self.sinch_base_url or f"https://{self.sinch_region}.sms.api.sinch.com"

    def secrets(self) -> list[str]:
        """Every secret value, for scrubbing output and logs: the secret fields (those kept
        out of repr), and the parts of service URLs where credentials go (password, long
        path segments, query values); longest first, with and without a 0x prefix."""
        values: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, str) or not value:
                continue
            if f.name in _URL_FIELDS:  # a database URL's path is a file or database name
                values += _url_secrets(value, paths=f.name != "database_url")
            elif not f.repr:
                values.append(value)
        found = {v for value in values for v in (value, value.removeprefix("0x"))}
        return sorted((v for v in found if len(v) >= 6), key=len, reverse=True)

    def chain(self) -> ChainConfig:
        """What every adapter that reads or writes the chain takes."""
        return ChainConfig(
            self.x402_network, self.rpc_url, self.usdc_address, self.settlement_timeout_seconds
        )

    def payments(self) -> PaymentConfig:
        """What taking x402 payments takes."""
        return PaymentConfig(
            self.chain(),
            self.pay_to_address,
            self.facilitator,
            self.facilitator_url,
            self.settler_private_key,
        )

    def refunds(self) -> RefundConfig | None:
        """What refunding takes; None without REFUND_PRIVATE_KEY (no automatic refunds)."""
        if not self.refund_private_key:
            return None
        return RefundConfig(self.chain(), self.refund_private_key)

    def gemini(self) -> GeminiConfig:
        """What the Gemini moderator takes; SettingsError without GEMINI_API_KEY."""
        if not self.gemini_api_key:
            raise SettingsError(["GEMINI_API_KEY is required for Gemini moderation"])
        return GeminiConfig(
            self.gemini_api_key,
            self.gemini_model,
            self.gemini_base_url,
            self.gemini_timeout_seconds,
            self.gemini_max_attempts,
        )

    def sinch(self) -> SinchConfig:
        """What the Sinch sender takes; SettingsError naming every credential missing."""
        plan, token, sender = self.sinch_service_plan_id, self.sinch_api_token, self.sinch_from
        if not (plan and token and sender):
            named = {"SINCH_SERVICE_PLAN_ID": plan, "SINCH_API_TOKEN": token, "SINCH_FROM": sender}
            raise SettingsError([f"{n} is required for Sinch" for n, v in named.items() if not v])
        callback = None
        if self.public_base_url and self.sinch_callback_secret:
            base = self.public_base_url.rstrip("/")
            callback = f"{base}/webhooks/sinch/{self.sinch_callback_secret}"
        return SinchConfig(plan, token, sender, self.sinch_base, callback)

    def problems(self) -> list[str]:
        """Every inconsistency between the fields, as human-readable lines."""
        return [p for check in _CHECKS for p in check(self)]


#: Settings that are URLs of services, which may carry credentials.
_URL_FIELDS = frozenset(
    {"rpc_url", "database_url", "facilitator_url", "gemini_base_url", "sinch_base_url"}
)


def _url_secrets(url: str, *, paths: bool = True) -> list[str]:
    """The password, long path segments (``paths``) and query values of a URL (where keys
    go)."""
    try:
        parts = urlsplit(url)
        pieces = [parts.password or ""]
    except ValueError:
        return [url]
    if paths:
        pieces += [p for p in parts.path.split("/") if len(p) >= 16]
    pieces += [v for item in parts.query.split("&") for v in item.split("=")[1:] if len(v) >= 8]
    return [piece for piece in pieces if piece]


#: Databases the ledger runs on (postgres:// is read as postgresql://).
DATABASE_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg")


def _check_core(s: Settings) -> list[str]:
    out = []
    if len(s.quote_secret) < 16:
        out.append("QUOTE_SECRET must be set to at least 16 characters")
    if s.quote_secret_previous is not None and len(s.quote_secret_previous) < 16:
        out.append("QUOTE_SECRET_PREVIOUS must be at least 16 characters when set")
    if not is_address(s.pay_to_address):
        out.append("PAY_TO_ADDRESS must be an EVM address (0x + 40 hex digits)")
    if not s.x402_network.startswith("eip155:") or not s.x402_network[7:].isdigit():
        out.append("X402_NETWORK must be a CAIP-2 EVM network such as eip155:84532")
    if not is_address(s.usdc_address):
        out.append("USDC_ADDRESS must be set to the token address for this network")
    if s.quote_ttl_seconds < 30 or s.max_segments < 1 or s.price_per_segment_usd <= 0:
        out.append("QUOTE_TTL_SECONDS >= 30, MAX_SEGMENTS >= 1, PRICE_PER_SEGMENT_USD > 0")
    if not 0 < s.worker_interval_seconds <= 60:
        out.append("WORKER_INTERVAL_SECONDS must be above 0 and at most 60")
    database = s.database_url.partition("://")[0]
    if database not in DATABASE_SCHEMES:
        out.append(
            f"DATABASE_URL scheme {database!r} is not supported: use sqlite:///path/to/relay.db "
            "or postgresql://user:password@host:5432/name"
        )
    if s.metrics_token and len(s.metrics_token) < 16:
        out.append("METRICS_TOKEN must be at least 16 characters when set")
    scheme = s.rate_limit_storage_url.partition("://")[0]
    if scheme not in STORAGE_SCHEMES or "://" not in s.rate_limit_storage_url:
        out.append(
            f"RATE_LIMIT_STORAGE_URL scheme {scheme!r} is not one of "
            + ", ".join(f"{name}://" for name in STORAGE_SCHEMES)
        )
    return out


def _check_payments(s: Settings) -> list[str]:
    out = []
    if s.facilitator == "local":
        if not s.rpc_url:
            out.append("RPC_URL is required with FACILITATOR=local")
        if not _is_key(s.settler_private_key):
            out.append("SETTLER_PRIVATE_KEY (a 32-byte hex key) is required with FACILITATOR=local")
    elif not s.facilitator_url.startswith(("http://", "https://")):
        out.append("FACILITATOR_URL must be an http(s) URL")
    if s.refund_private_key is not None and not _is_key(s.refund_private_key):
        out.append("REFUND_PRIVATE_KEY must be a 32-byte hex key")
    for name in ("rpc_url", "gemini_base_url", "sinch_base_url", "public_base_url"):
        value = getattr(s, name)
        if value and not value.startswith(("http://", "https://")):
            out.append(f"{name.upper()} must be an http(s) URL (it is {_scheme_of(value)})")
    floor = min_lease_seconds(s)
    if s.reconcile_after_seconds < floor:
        out.append(
            f"RECONCILE_AFTER_SECONDS must be at least {floor:g} (longer than the longest "
            "step: twice SETTLEMENT_TIMEOUT_SECONDS, and Sinch with its retries)"
        )
    return out


def _scheme_of(url: str) -> str:
    """What a URL starts with, safe to show: its scheme, or that it has none."""
    scheme, found, _ = url.partition("://")
    return f"{scheme}://..." if found else "without a scheme"


#: The longest Sinch hand-over, with its retries and look-ups (SinchSender's defaults).
SINCH_LONGEST_SECONDS = 120.0


def min_lease_seconds(s: Settings) -> float:
    """The shortest lease a worker may hold on a payment: a step never outlasts it."""
    longest = 2 * s.settlement_timeout_seconds + 5
    if s.sms_provider == "sinch":
        longest = max(longest, SINCH_LONGEST_SECONDS)
    return longest


def _check_providers(s: Settings) -> list[str]:
    out = []
    if s.moderation_provider == "gemini" and not s.gemini_api_key:
        out.append("GEMINI_API_KEY is required (or set MODERATION_PROVIDER=rules for development)")
    if s.sms_provider == "sinch":
        for name in ("sinch_service_plan_id", "sinch_api_token", "sinch_from"):
            if not getattr(s, name):
                out.append(f"{name.upper()} is required with SMS_PROVIDER=sinch")
    try:
        parse_many(s.quote_rate_limit)
    except ValueError:
        out.append('QUOTE_RATE_LIMIT must look like "30/minute" or "30/minute;500/hour"')
    return out


_CHECKS: list[Callable[[Settings], list[str]]] = [_check_core, _check_payments, _check_providers]


def _is_key(value: str | None) -> bool:
    if not value:
        return False
    try:
        Account.from_key(value)
    except (ValueError, TypeError):
        return False
    return True


# Environment variable -> (field, parser). Parsers raise ValueError with a readable message.
def _choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        """The option named, in any case, as the option is written."""
        found = {option.lower(): option for option in options}.get(raw.strip().lower())
        if found is None:
            raise ValueError(f"must be one of {', '.join(options)}")
        return found

    return parse


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value not in ("1", "true", "yes", "0", "false", "no", ""):
        raise ValueError("must be true or false")
    return value in ("1", "true", "yes")


def _int(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError("must be an integer") from None


def _decimal(raw: str) -> Decimal:
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise ValueError("must be a decimal number") from None
    if not value.is_finite() or value < 0:
        raise ValueError("must be a non-negative decimal number")
    return value


def _address(raw: str) -> str:
    if not is_address(raw):
        raise ValueError("must be an EVM address")
    return to_checksum_address(raw)


def _text(raw: str) -> str:
    return raw


_PARSERS: dict[str, Callable[[str], Any]] = {
    "QUOTE_SECRET": _text,
    "QUOTE_SECRET_PREVIOUS": _text,
    "PAY_TO_ADDRESS": _address,
    "PAY_PASSWORD": _text,
    "QUOTE_TTL_SECONDS": _int,
    "PRICE_PER_SEGMENT_USD": _decimal,
    "MAX_SEGMENTS": _int,
    "X402_NETWORK": _text,
    "USDC_ADDRESS": _address,
    "RPC_URL": _text,
    "FACILITATOR": _choice("local", "remote"),
    "FACILITATOR_URL": _text,
    "SETTLER_PRIVATE_KEY": _text,
    "SETTLEMENT_TIMEOUT_SECONDS": _decimal,
    "RECONCILE_AFTER_SECONDS": _decimal,
    "WORKER_INTERVAL_SECONDS": _decimal,
    "REFUND_PRIVATE_KEY": _text,
    "MODERATION_PROVIDER": _choice("gemini", "rules"),
    "GEMINI_API_KEY": _text,
    "GEMINI_MODEL": _text,
    "GEMINI_BASE_URL": _text,
    "GEMINI_PRICE_INPUT_PER_M": _decimal,
    "GEMINI_PRICE_OUTPUT_PER_M": _decimal,
    "GEMINI_TIMEOUT_SECONDS": _decimal,
    "GEMINI_MAX_ATTEMPTS": _int,
    "SMS_PROVIDER": _choice("sinch", "outbox"),
    "SINCH_SERVICE_PLAN_ID": _text,
    "SINCH_API_TOKEN": _text,
    "SINCH_REGION": _text,
    "SINCH_FROM": _text,
    "SINCH_BASE_URL": _text,
    "SINCH_CALLBACK_SECRET": _text,
    "SINCH_SIGNING_SECRET": _text,
    "OPT_OUT_LINE": _text,
    "DATABASE_URL": _text,
    "QUOTE_RATE_LIMIT": _text,
    "RATE_LIMIT_STORAGE_URL": _text,
    "PUBLIC_BASE_URL": _text,
    "CORS_ORIGINS": _text,
    "TRUSTED_PROXY_HOPS": _int,
    "PAY_PASSWORD_MAX_FAILURES": _int,
    "PAY_PASSWORD_LOCKOUT_SECONDS": _int,
    "ALLOW_PRIVATE_CALLBACKS": _flag,
    "LOG_LEVEL": _choice("DEBUG", "INFO", "WARNING", "ERROR"),
    "LOG_FORMAT": _choice("text", "json"),
    "METRICS_TOKEN": _text,
}


def load_settings(
    environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env"
) -> Settings:
    """Read, parse and check every variable; raise SettingsError listing all problems."""
    settings, problems = read_settings(environ, env_file)
    if problems:
        raise SettingsError(problems)
    return settings


def read_settings(
    environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env"
) -> tuple[Settings, list[str]]:
    """The settings and every problem found, never raising (`relay doctor` reports them).

    A variable that does not parse keeps its default and is reported once.
    """
    source: dict[str, str | None] = {}
    if env_file is not None and Path(env_file).is_file():
        source.update(dotenv_values(env_file))
    source.update(os.environ if environ is None else environ)
    values, problems = _parse(source)
    settings = Settings(**values)
    failed = [line.split(" ", 1)[0] for line in problems]
    problems += [p for p in settings.problems() if not any(name in p for name in failed)]
    return settings, problems


def _parse(source: Mapping[str, str | None]) -> tuple[dict[str, Any], list[str]]:
    values: dict[str, Any] = {}
    problems: list[str] = []
    for name, parser in _PARSERS.items():
        raw = source.get(name)
        if raw is None or raw.strip() == "":
            continue
        try:
            value = parser(raw.strip())
        except ValueError as exc:
            problems.append(f"{name} {exc}")
            continue
        if name in (
            "GEMINI_TIMEOUT_SECONDS",
            "SETTLEMENT_TIMEOUT_SECONDS",
            "RECONCILE_AFTER_SECONDS",
            "WORKER_INTERVAL_SECONDS",
        ):
            value = float(value)
        values[name.lower()] = value
    return values, problems


@dataclass(frozen=True)
class ClientSettings:
    """What the `relay quote` / `relay send` client needs: where, and who pays."""

    relay_url: str = "http://127.0.0.1:8000"
    payer_private_key: str | None = field(default=None, repr=False)
    pay_password: str | None = field(default=None, repr=False)
    #: What one `relay mcp` process may spend in all, in USD.
    mcp_budget_usd: Decimal = Decimal("1.00")


def load_client_settings(environ: Mapping[str, str] | None = None) -> ClientSettings:
    """RELAY_URL, PAYER_PRIVATE_KEY, PAY_PASSWORD and MCP_BUDGET_USD from the environment."""
    source = os.environ if environ is None else environ
    return ClientSettings(
        relay_url=source.get("RELAY_URL") or ClientSettings.relay_url,
        payer_private_key=source.get("PAYER_PRIVATE_KEY") or None,
        pay_password=source.get("PAY_PASSWORD") or None,
        mcp_budget_usd=_mcp_budget(source.get("MCP_BUDGET_USD") or ""),
    )


def _mcp_budget(raw: str) -> Decimal:
    """MCP_BUDGET_USD, or the default when unset."""
    if not raw:
        return ClientSettings.mcp_budget_usd
    try:
        return _decimal(raw)
    except ValueError as exc:
        raise SettingsError([f"MCP_BUDGET_USD {exc} (got {raw!r})"]) from None


def variable_names() -> list[str]:
    """Every environment variable the relay reads (documented in .env.example)."""
    return list(_PARSERS)
