"""Shared fixtures: real settings, a real SQLite file per test, the real app."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import create_engine, text

from relay.app import create_app
from relay.devchain import DevChain
from relay.services import build_services
from relay.settings import Settings

PAY_TO = "0x85F37873f97afa61263A27107f2e7b0B672d7CFF"


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings for a development stack on a fresh SQLite file, with overrides."""

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
