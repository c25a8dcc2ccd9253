"""Shared fixtures: real settings, a real SQLite file per test, the real app."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from flask import Flask
from flask.testing import FlaskClient

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
