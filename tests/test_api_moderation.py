"""/api/quote with the real google-genai SDK against the local fake Gemini server."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from flask.testing import FlaskClient

from relay.app import create_app
from relay.services import build_services
from relay.settings import Settings
from tests.fake_gemini import FAKE_API_KEY, FakeGemini, reject, unavailable

US = "+13012576365"


@pytest.fixture
def gemini() -> Iterator[FakeGemini]:
    with FakeGemini() as fake:
        yield fake


@pytest.fixture
def gclient(make_settings: Callable[..., Settings], gemini: FakeGemini) -> FlaskClient:
    settings = make_settings(
        moderation_provider="gemini",
        gemini_api_key=FAKE_API_KEY,
        gemini_base_url=gemini.url,
        gemini_timeout_seconds=2.0,
        gemini_max_attempts=2,
    )
    return create_app(services=build_services(settings)).test_client()


def test_reference_price_and_cache(gclient: FlaskClient, gemini: FakeGemini) -> None:
    first = gclient.post("/api/quote", json={"message": "Your order shipped", "to": US})
    assert first.status_code == 200
    body = first.get_json()
    assert body["price_usd"] == 0.050626
    assert body["price_atomic"] == "50626"
    assert body["moderation_cost_usd"] == 0.000626
    assert body["moderation_usage"] == {
        "model": "gemini-2.5-flash",
        "input_tokens": 412,
        "output_tokens": 144,
        "thinking_tokens": 57,
        "cached": False,
    }
    assert body["next_step"]["payment"]["amount_atomic"] == "50626"
    second = gclient.post("/api/quote", json={"message": "Your order shipped", "to": US}).get_json()
    assert second["moderation_cost_usd"] == 0
    assert second["moderation_usage"]["cached"] is True
    assert second["price_atomic"] == "50000"
    assert gemini.request_count == 1


@pytest.mark.parametrize(
    "category",
    ["spam", "phishing", "fraud", "shaft", "political", "harassment", "illegal", "other"],
)
def test_rejection_categories(gclient: FlaskClient, gemini: FakeGemini, category: str) -> None:
    gemini.enqueue(reject(category, reason="Not allowed."))
    response = gclient.post("/api/quote", json={"message": f"text {category}", "to": US})
    assert response.status_code == 422
    body = response.get_json()
    assert body["error"] == "rejected"
    assert body["approved"] is False
    assert body["category"] == category
    assert body["reason"] == "Not allowed."


def test_rejection_is_cached_too(gclient: FlaskClient, gemini: FakeGemini) -> None:
    gemini.enqueue(reject("spam"))
    for _ in range(2):
        assert gclient.post("/api/quote", json={"message": "buy", "to": US}).status_code == 422
    assert gemini.request_count == 1


def test_unavailable_is_503_with_retry_after_and_not_cached(
    gclient: FlaskClient, gemini: FakeGemini
) -> None:
    gemini.enqueue(unavailable(), unavailable())
    response = gclient.post("/api/quote", json={"message": "hello there", "to": US})
    assert response.status_code == 503
    assert response.get_json()["error"] == "moderation_unavailable"
    assert response.get_json()["retryable"] is True
    assert int(response.headers["Retry-After"]) >= 1
    retry = gclient.post("/api/quote", json={"message": "hello there", "to": US})
    assert retry.status_code == 200
    assert retry.get_json()["moderation_usage"]["cached"] is False


def test_rules_reject_before_the_paid_call(gclient: FlaskClient, gemini: FakeGemini) -> None:
    response = gclient.post("/api/quote", json={"message": "Login at http://10.0.0.1/", "to": US})
    assert response.status_code == 422
    assert gemini.request_count == 0
