"""Shared fixtures: real settings, a real SQLite file per test, the real app."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from relay.app import create_app
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
