"""`relay serve` as a process, quoting through the real SDK against the fake Gemini server."""

from __future__ import annotations

import time
from pathlib import Path

import requests

from tests.fake_gemini import FAKE_API_KEY, FakeGemini
from tests.processes import RelayProcess

US = "+13012576365"


def test_served_quote_end_to_end(tmp_path: Path) -> None:
    with FakeGemini() as gemini:
        env = {
            "QUOTE_SECRET": "e2e-quote-secret-0123456789",
            "PAY_TO_ADDRESS": "0x85F37873f97afa61263A27107f2e7b0B672d7CFF",
            "MODERATION_PROVIDER": "gemini",
            "GEMINI_API_KEY": FAKE_API_KEY,
            "GEMINI_BASE_URL": gemini.url,
            "SMS_PROVIDER": "outbox",
            "DATABASE_URL": f"sqlite:///{tmp_path / 'relay.db'}",
        }
        with RelayProcess(env, tmp_path / "relay.log") as relay:
            body = {"message": "Your order has shipped", "to": "301-257-6365"}
            first = requests.post(relay.url + "/api/quote", json=body, timeout=10)
            assert first.status_code == 200, first.text
            assert first.json()["price_atomic"] == "50626"
            assert first.json()["to_normalized"] == US
            second = requests.post(relay.url + "/api/quote", json=body, timeout=10).json()
            assert second["moderation_usage"]["cached"] is True
            assert second["moderation_cost_usd"] == 0
            rejected = requests.post(
                relay.url + "/api/quote",
                json={"message": "[[reject:spam]] buy", "to": US},
                timeout=10,
            )
            assert rejected.status_code == 422
            assert rejected.json()["category"] == "spam"
            bad = requests.post(relay.url + "/api/quote", data=b"[1]", timeout=10)
            assert bad.status_code == 400 and bad.json()["error"] == "invalid_input"
            assert "Your order has shipped" not in relay.log()
            assert gemini.request_count == 2


def test_missing_configuration_is_reported_at_once(tmp_path: Path) -> None:
    relay = RelayProcess({"PAY_TO_ADDRESS": "nope"}, tmp_path / "relay.log")
    try:
        relay.start(timeout=15)
        raise AssertionError("the server started without configuration")
    except RuntimeError:
        pass
    log = relay.log()
    for name in ("QUOTE_SECRET", "PAY_TO_ADDRESS", "GEMINI_API_KEY"):
        assert name in log


def test_access_log_masks_the_callback_secret(tmp_path: Path) -> None:
    env = {
        "QUOTE_SECRET": "e2e-quote-secret-0123456789",
        "PAY_TO_ADDRESS": "0x85F37873f97afa61263A27107f2e7b0B672d7CFF",
        "MODERATION_PROVIDER": "rules",
        "SMS_PROVIDER": "outbox",
        "SINCH_CALLBACK_SECRET": "hook-secret-987654321",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'relay.db'}",
    }
    with RelayProcess(env, tmp_path / "relay.log") as relay:
        report = {"type": "recipient_delivery_report_sms", "batch_id": "x", "status": "Delivered"}
        requests.post(relay.url + "/webhooks/sinch/hook-secret-987654321", json=report, timeout=10)
        requests.get(relay.url + "/health", timeout=10)
        # A worker writes its access line after the answer has gone: wait for it.
        deadline = time.monotonic() + 10
        while "/webhooks/sinch/" not in (log := relay.log()) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert "/webhooks/sinch/***" in log
    assert "hook-secret-987654321" not in log
