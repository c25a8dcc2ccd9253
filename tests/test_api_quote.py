"""POST /api/quote and the JSON error contract, through the real app with rules moderation."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from relay.app import create_app
from relay.services import Services, build_services
from relay.settings import Settings

US = "+13012576365"


def quote(client: FlaskClient, **body: Any) -> Any:
    return client.post("/api/quote", json=body)


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body: dict[str, Any] = response.get_json()
    assert body["error"] == code
    assert set(body) >= {"error", "message", "retryable", "retry_after_seconds", "details"}
    return body


def test_approved_quote_shape(client: FlaskClient, app: Flask) -> None:
    response = quote(client, message="Your order has shipped", to="(301) 257-6365")
    assert response.status_code == 200
    body = response.get_json()
    assert body["approved"] is True
    assert body["category"] == "ok"
    assert body["segments"] == 1
    assert body["encoding"] == "GSM-7"
    assert body["sms_price_usd"] == 0.05
    assert body["price_atomic"] == "50000"
    assert body["to_normalized"] == US
    assert body["expires_in_seconds"] == 600
    assert body["moderation_usage"]["model"] == "rules"
    step = body["next_step"]
    assert step["body"] == {
        "message": "Your order has shipped",
        "to": US,
        "quote_token": body["quote_token"],
    }
    assert step["payment"]["amount_atomic"] == "50000"
    assert step["payment"]["network"] == "eip155:84532"
    assert step["payment"]["recipient"] == "0x85F37873f97afa61263A27107f2e7b0B672d7CFF"
    services: Services = app.extensions["relay"]
    claims = services.signer.verify(
        body["quote_token"], message="Your order has shipped", to=US, now=services.clock()
    )
    assert claims.price_atomic == 50000


def test_decimal_amounts_are_exact_json_numbers(client: FlaskClient) -> None:
    raw = quote(client, message="hello", to=US).get_data(as_text=True)
    assert '"price_usd": 0.050000' in raw or '"price_usd": 0.05' in raw


@pytest.mark.parametrize(
    "raw",
    ["3012576365", "301-257-6365", "(301) 257-6365", "+1 (301) 257-6365", "13012576365", US],
)
def test_reference_numbers_normalise(client: FlaskClient, raw: str) -> None:
    assert quote(client, message="hi", to=raw).get_json()["to_normalized"] == US


def test_international_number(client: FlaskClient) -> None:
    assert quote(client, message="hi", to="+442071838750").get_json()["to_normalized"] == (
        "+442071838750"
    )


def test_rules_rejection_is_422_with_reference_fields(client: FlaskClient) -> None:
    response = quote(client, message="Verify your account now at bit.ly/x1", to=US)
    body = assert_error(response, 422, "rejected")
    assert body["approved"] is False
    assert body["category"] in {"phishing", "spam"}
    assert isinstance(body["confidence"], float)
    assert body["reason"]


def test_message_too_long(client: FlaskClient) -> None:
    body = assert_error(quote(client, message="a" * 1531, to=US), 422, "message_too_long")
    assert body["details"]["segments"] == 11


def test_ten_segments_is_allowed(client: FlaskClient) -> None:
    assert quote(client, message="a" * 1530, to=US).get_json()["segments"] == 10


def test_ucs2_reported(client: FlaskClient) -> None:
    body = quote(client, message="Order shipped — track it", to=US).get_json()
    assert body["encoding"] == "UCS-2"


def test_smart_encoding_reports_text_and_savings(client: FlaskClient) -> None:
    message = "Your order has shipped — track it " + "x" * 110
    plain = quote(client, message=message, to=US).get_json()
    smart = quote(client, message=message, to=US, smart_encoding=True).get_json()
    assert plain["segments"] == 3 and plain["encoding"] == "UCS-2"
    assert smart["segments"] == 1 and smart["encoding"] == "GSM-7"
    assert smart["smart_encoding"]["applied"] is True
    assert "—" not in smart["smart_encoding"]["text"]
    assert smart["smart_encoding"]["segments_saved"] == 2
    assert smart["smart_encoding"]["savings_usd"] == 0.1


def test_opted_out_recipient_is_refused_before_moderation(client: FlaskClient, app: Flask) -> None:
    services: Services = app.extensions["relay"]
    services.ledger.set_opt_out(US, True, now=0)
    body = assert_error(quote(client, message="hi", to=US), 422, "recipient_opted_out")
    assert US not in json.dumps(body)
    services.ledger.set_opt_out(US, False, now=1)
    assert quote(client, message="hi", to=US).status_code == 200


def test_rate_limit(make_settings: Callable[..., Settings]) -> None:
    client = create_app(services=build_services(make_settings(quote_rate_limit="2/minute")))
    c = client.test_client()
    assert quote(c, message="hi", to=US).status_code == 200
    assert quote(c, message="hi", to=US).status_code == 200
    response = quote(c, message="hi", to=US)
    body = assert_error(response, 429, "rate_limited")
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert body["retry_after_seconds"] == int(response.headers["Retry-After"])
    assert body["retryable"] is True


BAD_REQUESTS: list[tuple[str, dict[str, Any], int, str]] = [
    ("not json", {"data": b"hello", "content_type": "application/json"}, 400, "invalid_input"),
    ("array", {"json": [1, 2]}, 400, "invalid_input"),
    ("empty body", {"data": b""}, 400, "invalid_input"),
    ("missing message", {"json": {"to": US}}, 400, "invalid_input"),
    ("missing to", {"json": {"message": "hi"}}, 400, "invalid_input"),
    ("unknown field", {"json": {"message": "hi", "to": US, "x": 1}}, 400, "invalid_input"),
    ("wrong type", {"json": {"message": 12, "to": US}}, 400, "invalid_input"),
    ("null message", {"json": {"message": None, "to": US}}, 400, "invalid_input"),
    ("empty message", {"json": {"message": "", "to": US}}, 400, "invalid_input"),
    ("blank message", {"json": {"message": "   ", "to": US}}, 400, "invalid_input"),
    ("oversized message", {"json": {"message": "a" * 6000, "to": US}}, 400, "invalid_input"),
    ("control char", {"json": {"message": "hi\x07", "to": US}}, 400, "invalid_input"),
    ("DEL", {"json": {"message": "hi\x7f", "to": US}}, 400, "invalid_input"),
    (
        "lone surrogate",
        {"data": b'{"message": "hi \\ud800", "to": "+13012576365"}'},
        400,
        "invalid_input",
    ),
    ("absurd phone", {"json": {"message": "hi", "to": "call me maybe"}}, 400, "invalid_input"),
    ("long phone", {"json": {"message": "hi", "to": "9" * 60}}, 400, "invalid_input"),
    ("impossible phone", {"json": {"message": "hi", "to": "+1 555"}}, 400, "invalid_input"),
    (
        "premium rate",
        {"json": {"message": "hi", "to": "+19005550123"}},
        422,
        "unsupported_destination",
    ),
    ("2 MB body", {"data": b"{" + b" " * 2_000_000 + b"}"}, 413, "payload_too_large"),
]


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_input_table(
    client: FlaskClient, kwargs: dict[str, Any], status: int, code: str
) -> None:
    assert_error(client.post("/api/quote", **kwargs), status, code)


def test_unknown_path_is_json_404(client: FlaskClient) -> None:
    assert_error(client.get("/nope"), 404, "not_found")


def test_wrong_method_is_json_405(client: FlaskClient) -> None:
    response = client.get("/api/quote")
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


def test_unexpected_error_is_json_500_without_trace(app: Flask) -> None:
    def boom() -> str:
        raise RuntimeError("secret internals")

    app.add_url_rule("/boom", view_func=boom)
    response = app.test_client().get("/boom")
    body = assert_error(response, 500, "internal_error")
    assert "secret internals" not in json.dumps(body)


def test_pricing(client: FlaskClient) -> None:
    body = client.get("/api/pricing").get_json()
    assert body["price_per_segment_usd"] == 0.05
    assert body["network"] == "eip155:84532"
    assert body["asset"] == "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
    assert body["pay_to"] == "0x85F37873f97afa61263A27107f2e7b0B672d7CFF"
    assert body["quote_ttl_seconds"] == 600
    assert body["moderation"] == {  # the client fixture moderates with the rules
        "provider": "rules",
        "model": "rules",
        "input_per_million_usd": 0,
        "output_per_million_usd": 0,
    }


def test_pricing_names_the_gemini_model_and_its_prices(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(moderation_provider="gemini", gemini_api_key="k" * 20)
    body = create_app(services=build_services(settings)).test_client().get("/api/pricing")
    moderation = body.get_json()["moderation"]
    assert moderation["provider"] == "gemini" and moderation["model"] == "gemini-2.5-flash"
    assert moderation["input_per_million_usd"] > 0 and moderation["output_per_million_usd"] > 0


def test_health(client: FlaskClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.get_json()["checks"]["database"] == "ok"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
bodies = json_values | st.fixed_dictionaries(
    {"message": json_values | st.text(max_size=200), "to": json_values | st.text(max_size=20)},
    optional={"smart_encoding": json_values, "quote_token": json_values},
)


@hsettings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=bodies)
def test_random_json_never_500(client: FlaskClient, body: Any) -> None:
    response = client.post("/api/quote", json=body)
    assert response.status_code < 500
    assert response.mimetype == "application/json"
    if response.status_code >= 400:
        assert response.get_json()["error"] in {
            "invalid_input",
            "rejected",
            "unsupported_destination",
            "message_too_long",
        }


@hsettings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=st.binary(max_size=300))
def test_random_bytes_never_500(client: FlaskClient, raw: bytes) -> None:
    response = client.post("/api/quote", data=raw, content_type="application/json")
    assert response.status_code < 500


def test_quotes_survive_a_secret_rotation(paid_settings: Callable[..., Settings]) -> None:
    old = paid_settings(quote_secret="old-quote-secret-0123456789")
    quoted = (
        create_app(services=build_services(old))
        .test_client()
        .post("/api/quote", json={"message": "Rotate me", "to": "+13012576365"})
    )
    body = {
        "message": "Rotate me",
        "to": "+13012576365",
        "quote_token": quoted.get_json()["quote_token"],
    }
    new = "new-quote-secret-0123456789"
    rotated = paid_settings(quote_secret=new, quote_secret_previous=old.quote_secret)
    send = create_app(services=build_services(rotated)).test_client().post("/api/send", json=body)
    assert send.status_code == 402, send.get_data(as_text=True)  # the token was accepted
    plain = paid_settings(quote_secret=new)
    refused = create_app(services=build_services(plain)).test_client().post("/api/send", json=body)
    assert (refused.status_code, refused.get_json()["error"]) == (400, "invalid_input")
