"""Shared fixtures: real settings, a real SQLite file per test, the real app."""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import create_engine, text, update

from relay.app import create_app
from relay.dev.chain import DevChain, dev_accounts
from relay.ledger import Ledger
from relay.schema import payments
from relay.services import Services, build_services
from relay.settings import Settings

PAY_TO = "0x85F37873f97afa61263A27107f2e7b0B672d7CFF"


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings for a development stack on a fresh SQLite file (upgraded, as `relay db
    upgrade` does before the service starts), with overrides."""
    upgraded: set[str] = set()

    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = dict(
            quote_secret="test-quote-secret-0123456789",
            pay_to_address=PAY_TO,
            moderation_provider="rules",
            sms_provider="outbox",
            database_url=f"sqlite:///{tmp_path / 'relay.db'}",
            quote_rate_limit="1000/minute",
        )
        base.update(overrides)
        settings = Settings(**base)
        assert settings.problems() == []
        if "database_url" not in overrides and settings.database_url not in upgraded:
            Ledger.upgrade_database(settings.database_url)
            upgraded.add(settings.database_url)
        return settings

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def app(settings: Settings) -> Flask:
    return create_app(services=build_services(settings))


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def services_of(app: Flask) -> Services:
    """The services of an app built by create_app."""
    found: Services = app.extensions["relay"]
    return found


def state_of(services: Services, payment_id: str) -> str | None:
    """The state a payment is in now (None for no such payment)."""
    found = services.ledger.payment(payment_id)
    return None if found is None else str(found.state)


def rewind_payment(services: Services, payment_id: str, **values: Any) -> None:
    """Put a payment back as a crash would leave it: unleased, no stored answer, with
    ``values`` (the ledger is all a restarted process remembers)."""
    with services.ledger.begin() as conn:
        conn.execute(
            update(payments)
            .where(payments.c.id == payment_id)
            .values({"lease_until": None, "lease_holder": None, "response_status": None, **values})
        )


# The local chain ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def chain() -> Iterator[DevChain]:
    """A real anvil chain (id 84532) with the test USDC at the canonical address."""
    with DevChain.start() as dev:
        yield dev


@dataclass
class Wallet:
    """A fresh key and its address."""

    address: str
    key: str


def new_wallet(chain: DevChain, usdc_atomic: int = 0) -> Wallet:
    """A fresh account, optionally funded with test USDC."""
    account = Account.create()
    KNOWN_SECRETS.add(account.key.hex().removeprefix("0x"))
    if usdc_atomic:
        chain.mint(account.address, usdc_atomic)
    return Wallet(account.address, account.key.hex())


@pytest.fixture
def payer(chain: DevChain) -> Wallet:
    """A payer holding 10 USDC and no ETH."""
    return new_wallet(chain, 10_000_000)


@pytest.fixture
def paid_settings(
    make_settings: Callable[..., Settings], chain: DevChain
) -> Callable[..., Settings]:
    """Settings for paid sends settled on the local chain, with overrides."""

    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = dict(
            pay_to_address=new_wallet(chain).address,
            facilitator="local",
            rpc_url=chain.rpc_url,
            settler_private_key=chain.accounts[0].private_key,
        )
        base.update(overrides)
        return make_settings(**base)

    return make


# Shared configurations -------------------------------------------------------------------

SINCH_PLAN, SINCH_TOKEN = "plan123", "sinch-token"
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


def sinch_overrides(base_url: str) -> dict[str, Any]:
    """Settings that dispatch through a (fake) Sinch at ``base_url``."""
    return dict(
        sms_provider="sinch",
        sinch_service_plan_id=SINCH_PLAN,
        sinch_api_token=SINCH_TOKEN,
        sinch_from="+12065550100",
        sinch_base_url=base_url,
        sinch_callback_secret="callback-secret-123",
        public_base_url="https://relay.example",
    )


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh schema on the local PostgreSQL, dropped afterwards."""
    schema = "t_" + secrets.token_hex(6)
    admin = create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://"))
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


# No secret or personal data in any log line --------------------------------------------------

#: Values no log record of any library may ever contain: every key a test wallet holds
#: (added by new_wallet) and the anvil accounts' keys.
KNOWN_SECRETS: set[str] = {account.private_key.removeprefix("0x") for account in dev_accounts()}
#: A phone number written out whole (masked ones read like +1********65).
FULL_PHONE = re.compile(r"\+\d{9,15}\b")
#: user:password@ in a URL.
URL_CREDENTIALS = re.compile(r"://[^/\s:@]+:(?!\*\*\*@)[^/\s@]+@")


class LogGuard(logging.Handler):
    """Sees every record, at every level, and remembers the ones that leak."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.leaks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_text:  # what a formatter prints, as relay.logs scrubbed it
                text += record.exc_text
            elif record.exc_info:
                text += logging.Formatter().formatException(record.exc_info)
        except Exception:  # a record that cannot be formatted leaks nothing
            return
        lowered = text.lower()
        if (
            FULL_PHONE.search(text)
            or URL_CREDENTIALS.search(text)
            or any(secret in lowered for secret in KNOWN_SECRETS)
        ):
            self.leaks.append(f"{record.name} {record.levelname}: {text[:300]}")


LOG_GUARD = LogGuard()


@pytest.fixture(autouse=True)
def no_leaks_in_logs() -> Iterator[None]:
    """Every test runs with every logger at DEBUG into the guard; a leak fails the test."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(LOG_GUARD)
    LOG_GUARD.leaks.clear()
    try:
        yield
    finally:
        root.removeHandler(LOG_GUARD)
        root.setLevel(level)
    assert not LOG_GUARD.leaks, "log lines leak secrets or personal data:\n" + "\n".join(
        LOG_GUARD.leaks[:10]
    )
