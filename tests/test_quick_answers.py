"""Quotes and the unpaid /api/send's 402s answered below Flask (relay.quick_answers): the
same answers as the views', and every other request left to them."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import REGISTRY

from relay.app import create_app
from relay.quick_answers import QuickAnswers
from relay.services import build_services
from relay.settings import Settings
from tests.conftest import services_of

US = "+13012576365"
BODY = {"message": "Your order has shipped", "to": US}
ORIGIN = "https://agent.example"
#: With TRUSTED_PROXY_HOPS=0 a request through a proxy goes to the view (which warns).
VIA_VIEW = {"X-Forwarded-For": "203.0.113.9"}


def quick_of(app: Flask) -> QuickAnswers:
    quick = app.wsgi_app
    assert isinstance(quick, QuickAnswers)
    return quick


def answer(client: FlaskClient, body: Any, **headers: str) -> tuple[int, bytes, dict[str, str]]:
    sent = {"X-Request-Id": "req-1", "Origin": ORIGIN, **headers}
    response = client.post("/api/send", json=body, headers=sent)
    return response.status_code, response.get_data(), dict(response.headers)


def quoted(client: FlaskClient, body: dict[str, str] = BODY) -> dict[str, str]:
    token = client.post("/api/quote", json=body).get_json()["quote_token"]
    return {**body, "quote_token": token}


def test_the_quick_402s_are_the_views(paid_settings: Callable[..., Settings]) -> None:
    app = create_app(services=build_services(paid_settings(cors_origins=ORIGIN)))
    client, quick = app.test_client(), quick_of(app)
    for body in (None, quoted(client)):
        before, counted = quick.answered, answers_counted()
        fast = answer(client, body)
        assert quick.answered == before + 1
        assert answers_counted() == counted + 1
        slow = answer(client, body, **VIA_VIEW)
        assert quick.answered == before + 1
        assert fast[0] == slow[0] == 402
        assert fast[1] == slow[1]
        assert fast[2] == slow[2]
        assert fast[2]["X-Request-Id"] == "req-1"
        assert fast[2]["Access-Control-Allow-Origin"] == ORIGIN
        assert "PAYMENT-REQUIRED" in fast[2]


def test_everything_else_is_left_to_the_view(paid_settings: Callable[..., Settings]) -> None:
    app = create_app(services=build_services(paid_settings()))
    client, quick, services = app.test_client(), quick_of(app), services_of(app)
    body = quoted(client)
    start = quick.answered  # the quote itself
    cases: list[tuple[Any, dict[str, str], int, str]] = [
        ({**body, "message": "Other text"}, {}, 400, "quote_content_mismatch"),
        ({**body, "quote_token": body["quote_token"][:-3] + "abc"}, {}, 400, "invalid_input"),
        (BODY, {}, 402, "payment_required"),  # one-shot: moderated and counted by the view
        (body, {"PAYMENT-SIGNATURE": "not base64"}, 400, "invalid_input"),
        ({**body, "callback_url": "http://127.0.0.1/hook"}, {}, 400, "invalid_input"),
    ]
    for sent, headers, status, error in cases:
        code, data, _ = answer(client, sent, **headers)
        assert (code, error) == (status, _error(data)), sent
    assert quick.answered == start
    raw = client.post("/api/send", data=b"{not json", content_type="application/json")
    assert (raw.status_code, raw.get_json()["error"]) == (400, "invalid_input")
    real_clock = services.clock
    services.clock = lambda: real_clock() + 601
    assert _error(answer(client, body)[1]) == "quote_expired"
    services.clock = real_clock
    services.ledger.set_opt_out(US, True, time.time())
    services.ledger.is_opted_out(US)  # the process reads the registry again
    code, data, _ = answer(client, body)
    assert code == 422 and _error(data) == "recipient_opted_out"
    assert quick.answered == start


def test_a_pay_password_keeps_every_send_in_the_view(
    paid_settings: Callable[..., Settings],
) -> None:
    app = create_app(services=build_services(paid_settings(pay_password="s3cret-pass")))
    client = app.test_client()
    assert client.post("/api/send").status_code == 401
    assert client.post("/api/send", headers={"X-Pay-Password": "s3cret-pass"}).status_code == 402
    assert quick_of(app).answered == 0


def answers_counted() -> float:
    """402s of /api/send in the metrics."""
    labels = {"route": "/api/send", "code": "402"}
    return REGISTRY.get_sample_value("relay_http_requests_total", labels) or 0.0


def _error(data: bytes) -> str:
    return str(json.loads(data)["error"])


def quote_answer(client: FlaskClient, body: Any, **headers: str) -> tuple[int, Any, dict[str, str]]:
    sent = {"X-Request-Id": "req-2", "Origin": ORIGIN, **headers}
    response = client.post("/api/quote", json=body, headers=sent)
    assert int(response.headers["Content-Length"]) == len(response.get_data())
    return response.status_code, response.get_json(), dict(response.headers)


def without_token(quote: dict[str, Any]) -> dict[str, Any]:
    """A quote's body less what each quote has of its own (its token)."""
    step = {**quote["next_step"], "body": {**quote["next_step"]["body"], "quote_token": "-"}}
    return {**quote, "quote_token": "-", "next_step": step}


def test_quotes_and_their_errors_are_the_views(paid_settings: Callable[..., Settings]) -> None:
    settings = paid_settings(cors_origins=ORIGIN, quote_rate_limit="4/minute")
    app = create_app(services=build_services(settings))
    client, quick = app.test_client(), quick_of(app)
    fast = quote_answer(client, BODY)
    slow = quote_answer(client, BODY, **VIA_VIEW)
    assert quick.answered == 1
    assert fast[0] == slow[0] == 200
    assert without_token(fast[1]) == without_token(slow[1])
    for answer in (fast, slow):  # each token is of its own length
        answer[2].pop("Content-Length")
    assert fast[2] == slow[2]
    bad = {"message": "", "to": "12"}
    errors = [quote_answer(client, bad), quote_answer(client, bad, **VIA_VIEW)]
    assert quick.answered == 2
    assert errors[0] == errors[1] and errors[0][0] == 400
    limited = quote_answer(client, BODY)  # the fifth count of the client: quick and view alike
    assert quick.answered == 3
    assert limited[0] == 429 and limited[1]["error"] == "rate_limited"
    assert int(limited[2]["Retry-After"]) >= 1


def test_an_unexpected_failure_of_a_quote_is_a_500_in_our_shape(
    paid_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(services=build_services(paid_settings()))
    services = services_of(app)

    def broken(_text: str) -> Any:
        raise RuntimeError("the moderator broke")

    services.moderator.moderate = broken  # type: ignore[method-assign]
    code, body, headers = quote_answer(app.test_client(), BODY)
    assert code == 500 and body["error"] == "internal_error"
    assert headers["X-Request-Id"] == "req-2"
    assert quick_of(app).answered == 1
    assert "unhandled error" in caplog.text


def test_a_body_over_the_apps_limit_is_flasks_413(paid_settings: Callable[..., Settings]) -> None:
    settings = paid_settings(max_body_bytes=4096, max_segments=1)
    assert settings.body_limit < 8192  # smaller than what the quick path reads at most
    app = create_app(services=build_services(settings))
    big = {"message": "x" * settings.body_limit, "to": US}
    for path in ("/api/quote", "/api/send"):
        answer = app.test_client().post(path, json=big)
        assert (answer.status_code, answer.get_json()["error"]) == (413, "payload_too_large")
    assert quick_of(app).answered == 0
