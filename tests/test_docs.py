"""GET /openapi.json and GET /llms.txt: valid OpenAPI 3.1, complete, and true to the code."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import re
import tomllib
from collections.abc import Callable
from decimal import Decimal
from fnmatch import fnmatch
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator
from sqlalchemy import update

from relay.app import create_app
from relay.dev.chain import DevChain
from relay.docs import docs
from relay.errors import all_error_classes
from relay.openapi import CLIENT_ONLY_CODES, GLOBAL_CODES, openapi_document, operation_codes
from relay.schema import payments, refunds
from relay.services import build_services
from relay.settings import Settings
from relay.states import MessageState, PaymentState, RefundState
from tests.conftest import (
    SINCH_PLAN,
    SINCH_TOKEN,
    Wallet,
    new_wallet,
    services_of,
    sinch_overrides,
)
from tests.fake_sinch import FakeSinch
from tests.processes import REPO
from tests.x402_helpers import pay

US = "+13012576365"
OTHER_PAY_TO = "0x1111111111111111111111111111111111111111"
IGNORED_METHODS = {"HEAD", "OPTIONS"}
CODES = {cls.code: cls for cls in all_error_classes()}


def with_docs(app: Flask) -> Flask:
    """Register the docs blueprint unless the app factory already does."""
    if "docs" not in app.blueprints:
        app.register_blueprint(docs)
    return app


def make_client(settings: Settings) -> FlaskClient:
    return with_docs(create_app(services=build_services(settings))).test_client()


@pytest.fixture
def docs_client(app: Flask) -> FlaskClient:
    return with_docs(app).test_client()


@pytest.fixture
def spec(docs_client: FlaskClient) -> dict[str, Any]:
    response = docs_client.get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    body: dict[str, Any] = response.get_json()
    return body


@pytest.fixture
def llms(docs_client: FlaskClient) -> str:
    response = docs_client.get("/llms.txt")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    return response.get_data(as_text=True)


def documented_properties(spec: dict[str, Any], schema: dict[str, Any]) -> set[str]:
    """Top-level property names of a schema, following $ref and allOf."""
    if "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    names = set(schema.get("properties", {}))
    for part in schema.get("allOf", []):
        names |= documented_properties(spec, part)
    return names


def assert_matches(spec: dict[str, Any], schema: dict[str, Any], body: Any) -> None:
    """The body validates against the schema and has no top-level field it does not mention."""
    validator = Draft202012Validator({**schema, "components": spec["components"]})
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(body)]
    assert errors == []
    if isinstance(body, dict):
        assert set(body) - documented_properties(spec, schema) == set()


def assert_answer_documented(spec: dict[str, Any], method: str, path: str, response: Any) -> None:
    """A real response: its status is documented for the operation, its body matches."""
    responses = spec["paths"][path][method]["responses"]
    assert str(response.status_code) in responses, response.get_data(as_text=True)
    schema = responses[str(response.status_code)]["content"]["application/json"]["schema"]
    assert_matches(spec, schema, response.get_json())


def documented_path(spec: dict[str, Any], url: str) -> str:
    """The path template of the document that ``url`` (a path) falls under."""
    (path,) = [
        template
        for template in spec["paths"]
        if re.fullmatch(re.sub(r"{[^}]+}", "[^/]+", template), url.split("?")[0])
    ]
    return path


def checked(spec: dict[str, Any], client: FlaskClient) -> Callable[..., Any]:
    """``client.open`` that asserts every answer is documented for its operation."""

    def call(method: str, url: str, **kwargs: Any) -> Any:
        response = client.open(url, method=method, **kwargs)
        assert_answer_documented(spec, method.lower(), documented_path(spec, url), response)
        return response

    return call


def codes_of(response: dict[str, Any]) -> list[str]:
    """The error codes a documented error response narrows its schema to ([] if none)."""
    schema = response.get("content", {}).get("application/json", {}).get("schema", {})
    if "allOf" not in schema:
        return []
    narrowed: list[str] = schema["allOf"][1]["properties"]["error"]["enum"]
    return narrowed


# The document ------------------------------------------------------------------------


def test_openapi_is_valid_3_1(spec: dict[str, Any]) -> None:
    assert spec["openapi"].startswith("3.1.")
    OpenAPIV31SpecValidator(spec).validate()


def test_validator_catches_a_broken_document(spec: dict[str, Any]) -> None:
    broken = dict(spec, paths={"/api/quote": {"post": {"responses": {"200": {}}}}})
    with pytest.raises(Exception, match="description"):
        OpenAPIV31SpecValidator(broken).validate()


def test_every_route_is_documented_and_nothing_else(app: Flask, spec: dict[str, Any]) -> None:
    with_docs(app)
    served: set[tuple[str, str]] = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        served |= {(path, m.lower()) for m in (rule.methods or set()) - IGNORED_METHODS}
    documented = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert served == documented
    assert {"/openapi.json", "/llms.txt", "/webhooks/sinch/{secret}"} <= set(spec["paths"])


def test_every_operation_is_complete(spec: dict[str, Any]) -> None:
    ids = []
    for path, item in spec["paths"].items():
        for operation in item.values():
            ids.append(operation["operationId"])
            assert "200" in operation["responses"], path
            assert "500" in operation["responses"], path
            for name in re.findall(r"{([^}]+)}", path):
                assert name in {p.get("name") for p in operation.get("parameters", [])}
    assert len(ids) == len(set(ids))


def test_servers_come_from_public_base_url(make_settings: Callable[..., Settings]) -> None:
    assert "servers" not in openapi_document(make_settings())
    document = openapi_document(make_settings(public_base_url="https://sms.example/"))
    assert document["servers"] == [{"url": "https://sms.example"}]


def test_error_codes_are_generated_from_relay_errors(spec: dict[str, Any]) -> None:
    error = spec["components"]["schemas"]["ErrorBody"]
    assert set(error["properties"]["error"]["enum"]) == set(CODES)
    assert spec["x-error-codes"] == {code: cls.status for code, cls in CODES.items()}
    assert set(error["required"]) == {
        "error",
        "message",
        "retryable",
        "retry_after_seconds",
        "details",
    }
    for code in CODES:
        assert f"`{code}`" in error["properties"]["error"]["description"]


def test_every_server_error_code_is_documented_on_an_operation(spec: dict[str, Any]) -> None:
    used: set[str] = set()
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                for code in codes_of(response):
                    assert CODES[code].status == int(status), (method, path, code)
                    used.add(code)
    assert used | set(GLOBAL_CODES) | set(CLIENT_ONLY_CODES) == set(CODES)
    assert used.isdisjoint(CLIENT_ONLY_CODES)
    declared = {code for codes in operation_codes().values() for code in codes}
    assert declared <= used


def test_send_documents_x402(spec: dict[str, Any]) -> None:
    send = spec["paths"]["/api/send"]["post"]
    responses = send["responses"]
    assert set(responses) == {
        "200",
        "202",
        "400",
        "401",
        "402",
        "409",
        "413",
        "422",
        "429",
        "500",
        "502",
        "503",
    }
    assert set(codes_of(responses["402"])) == {
        "payment_required",
        "payment_verify_failed",
        "payment_settlement_failed",
    }
    assert "PAYMENT-REQUIRED" in responses["402"]["headers"]
    assert {"PAYMENT-RESPONSE", "X-PAYMENT-RESPONSE"} <= set(responses["200"]["headers"])
    assert {"PAYMENT-RESPONSE", "X-PAYMENT-RESPONSE"} <= set(responses["502"]["headers"])
    for status in ("202", "409", "429", "503", "401"):
        assert "Retry-After" in responses[status]["headers"], status
    parameters = spec["components"]["parameters"]
    names = {parameters[p["$ref"].rsplit("/", 1)[1]]["name"] for p in send["parameters"]}
    assert names == {"PAYMENT-SIGNATURE", "X-PAYMENT"}
    scheme = spec["components"]["securitySchemes"]["PayPassword"]
    assert (scheme["type"], scheme["in"], scheme["name"]) == ("apiKey", "header", "X-Pay-Password")
    assert {"PayPassword": []} in send["security"]
    assert send["requestBody"]["required"] is False  # the bare probe
    assert send["x-x402"]["network"] == "eip155:84532"


def test_request_bodies_are_strict(spec: dict[str, Any], docs_client: FlaskClient) -> None:
    schemas = spec["components"]["schemas"]
    for name, fields in (
        ("QuoteRequest", {"message", "to", "smart_encoding"}),
        ("SendRequest", {"message", "to", "quote_token", "smart_encoding", "callback_url"}),
    ):
        schema = schemas[name]
        assert schema["additionalProperties"] is False
        assert set(schema["properties"]) == fields
        assert set(schema["required"]) == {"message", "to"}
    # The server agrees: a field the schema does not allow is refused.
    response = docs_client.post("/api/quote", json={"message": "hi", "to": US, "quote_token": "x"})
    assert response.status_code == 400


# The document against the real responses -----------------------------------------------


def test_quote_and_its_errors_match_the_document(
    spec: dict[str, Any], docs_client: FlaskClient
) -> None:
    def quote(body: Any) -> Any:
        response = docs_client.post("/api/quote", json=body)
        assert_answer_documented(spec, "post", "/api/quote", response)
        return response

    ok = quote({"message": "Your order has shipped", "to": US, "smart_encoding": True})
    assert ok.status_code == 200
    assert "smart_encoding" in ok.get_json()
    assert quote({"message": "hi"}).status_code == 400
    assert quote({"message": "Login at http://10.0.0.1/", "to": US}).status_code == 422
    assert quote({"message": "x" * 1600, "to": US}).status_code == 422
    assert quote({"message": "x" * 1601, "to": US}).status_code == 400
    assert quote({"message": "hi", "to": "+19009001234"}).status_code == 422


def test_rate_limited_quote_matches_the_document(
    make_settings: Callable[..., Settings],
) -> None:
    client = make_client(make_settings(quote_rate_limit="1/minute"))
    spec = client.get("/openapi.json").get_json()
    body = {"message": "hi", "to": US}
    assert client.post("/api/quote", json=body).status_code == 200
    limited = client.post("/api/quote", json=body)
    assert limited.status_code == 429
    assert "Retry-After" in limited.headers
    assert_answer_documented(spec, "post", "/api/quote", limited)


def test_other_operations_match_the_document(
    spec: dict[str, Any], docs_client: FlaskClient
) -> None:
    for method, path, url in (
        ("get", "/api/pricing", "/api/pricing"),
        ("get", "/health", "/health"),
        ("get", "/api/messages/{message_id}", "/api/messages/nope"),
        ("post", "/webhooks/sinch/{secret}", "/webhooks/sinch/wrong"),
    ):
        response = docs_client.open(url, method=method.upper(), json={})
        assert_answer_documented(spec, method, path, response)


def test_send_answers_match_the_document(make_settings: Callable[..., Settings]) -> None:
    # A local facilitator builds the challenge without reaching the chain.
    settings = make_settings(
        facilitator="local", rpc_url="http://127.0.0.1:9", settler_private_key="0x" + "11" * 32
    )
    client = make_client(settings)
    spec = client.get("/openapi.json").get_json()
    message = {"message": "Your order has shipped", "to": US}
    for response in (client.post("/api/send", json=message), client.post("/api/send")):
        assert response.status_code == 402
        assert response.headers["PAYMENT-REQUIRED"]
        assert_answer_documented(spec, "post", "/api/send", response)
    probe = client.post("/api/send").get_json()
    assert "price_rule" in probe
    for body, headers in (
        ({**message, "quote_token": "forged"}, {}),
        (message, {"PAYMENT-SIGNATURE": "not-base64"}),
        ({"message": "Login at http://10.0.0.1/", "to": US}, {}),
    ):
        response = client.post("/api/send", json=body, headers=headers)
        assert response.status_code in (400, 422)
        assert_answer_documented(spec, "post", "/api/send", response)
    locked = make_client(dataclasses.replace(settings, pay_password="secret-password"))
    response = locked.post("/api/send", json=message)
    assert response.status_code == 401
    assert_answer_documented(spec, "post", "/api/send", response)


def test_a_mismatch_is_caught(spec: dict[str, Any]) -> None:
    error = {"$ref": "#/components/schemas/ErrorBody"}
    good = {
        "error": "not_found",
        "message": "x",
        "retryable": False,
        "retry_after_seconds": None,
        "details": {},
    }
    assert_matches(spec, error, good)
    with pytest.raises(AssertionError):
        assert_matches(spec, error, {**good, "error": "no_such_code"})
    with pytest.raises(AssertionError):
        assert_matches(spec, error, {**good, "surprise": 1})
    narrowed = spec["paths"]["/api/messages/{message_id}"]["get"]["responses"]["404"]
    with pytest.raises(AssertionError):  # a code this operation does not answer with 404
        assert_matches(
            spec, narrowed["content"]["application/json"]["schema"], {**good, "error": "rejected"}
        )


def test_the_state_enums_are_the_codes(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    for enum in (MessageState, PaymentState, RefundState):
        assert schemas[enum.__name__]["enum"] == [state.value for state in enum]
    send = schemas["SendResult"]["properties"]["status"]
    assert send == {"$ref": "#/components/schemas/MessageState"}
    refund = schemas["Refund"]["properties"]["state"]
    assert refund == {"$ref": "#/components/schemas/RefundState"}


def test_the_checked_client_catches_an_undocumented_answer(
    spec: dict[str, Any], docs_client: FlaskClient
) -> None:
    assert checked(spec, docs_client)("GET", "/api/pricing").status_code == 200
    drifted = copy.deepcopy(spec)
    del drifted["components"]["schemas"]["Pricing"]["properties"]["pay_to"]
    with pytest.raises(AssertionError):
        checked(drifted, docs_client)("GET", "/api/pricing")


SINCH_HOOK = "/webhooks/sinch/callback-secret-123"


def paid_send(call: Callable[..., Any], spec: dict[str, Any], payer: Wallet) -> Any:
    """A one-shot send: the 402 (its PAYMENT-REQUIRED header checked too), then paid."""
    body = {"message": "Your order has shipped", "to": US}
    challenge = call("POST", "/api/send", json=body)
    assert challenge.status_code == 402
    required = json.loads(base64.b64decode(challenge.headers["PAYMENT-REQUIRED"]))
    assert_matches(spec, {"$ref": "#/components/schemas/X402PaymentRequired"}, required)
    signature = pay(challenge.headers["PAYMENT-REQUIRED"], payer.key)
    return call("POST", "/api/send", json=body, headers={"PAYMENT-SIGNATURE": signature})


def test_answers_in_every_state_match_the_document(
    paid_settings: Callable[..., Settings], chain: DevChain
) -> None:
    """Real answers, each checked against the operation it answers: a paid send, every
    message status the code writes (queued, delivery reports, refunded), a 502 with its
    refund, and the status document with the payment and refund in each of their states."""
    refunder = new_wallet(chain, 5_000_000)
    chain.set_eth_balance(refunder.address, 10**18)
    with FakeSinch(plan_id=SINCH_PLAN, token=SINCH_TOKEN) as fake:
        settings = paid_settings(**sinch_overrides(fake.base_url), refund_private_key=refunder.key)
        app = with_docs(create_app(services=build_services(settings)))
        client = app.test_client()
        spec = client.get("/openapi.json").get_json()
        call = checked(spec, client)
        sent = paid_send(call, spec, new_wallet(chain, 1_000_000)).get_json()
        seen = [call("GET", f"/api/messages/{sent['message_id']}").get_json()["status"]]
        for report in ("Dispatched", "Delivered", "Failed"):
            hook = {"type": "recipient_delivery_report_sms", "batch_id": sent["message_id"]}
            hook |= {"recipient": US.lstrip("+"), "status": report, "code": 0}
            assert call("POST", SINCH_HOOK, json=hook).get_json() == {"ok": True}
            seen.append(call("GET", f"/api/messages/{sent['message_id']}").get_json()["status"])
        fake.script({"status": 400, "code": "syntax_invalid_parameter_format", "text": "bad"})
        failed = paid_send(call, spec, new_wallet(chain, 1_000_000))
    assert failed.status_code == 502
    assert failed.get_json()["refund"]["state"] == RefundState.CONFIRMED
    message_id = failed.get_json()["message_id"]
    seen.append(call("GET", f"/api/messages/{message_id}").get_json()["status"])
    assert seen == [state.value for state in MessageState]
    ledger = services_of(app).ledger
    for table, key, part, states in (
        (refunds, refunds.c.payment_id, "refund", RefundState),
        (payments, payments.c.id, "payment", PaymentState),
    ):
        for state in states:
            with ledger.begin() as conn:
                conn.execute(update(table).where(key == message_id).values(state=state))
            status = call("GET", f"/api/messages/{message_id}").get_json()
            assert status[part]["state"] == state


# llms.txt ----------------------------------------------------------------------------


def test_llms_txt_lists_every_error_code_with_status_and_retryability(llms: str) -> None:
    for code, cls in CODES.items():
        (line,) = [line for line in llms.splitlines() if line.startswith(f"| `{code}` |")]
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[1] == str(cls.status), line
        assert cells[2] == ("yes" if cls.retryable else "no"), line


def test_llms_txt_explains_flow_headers_and_idempotency(llms: str) -> None:
    for header in (
        "PAYMENT-REQUIRED",
        "PAYMENT-SIGNATURE",
        "X-PAYMENT",
        "PAYMENT-RESPONSE",
        "X-PAYMENT-RESPONSE",
        "X-Pay-Password",
        "Retry-After",
    ):
        assert f"`{header}`" in llms, header
    for phrase in (
        "/api/quote",
        "/api/send",
        "402",
        "EIP-3009",
        "One-shot",
        "payment-identifier",
        "stored response",
        "/openapi.json",
    ):
        assert phrase in llms, phrase
    assert len(llms.splitlines()) <= 150


def test_the_llms_template_ships_in_the_wheel() -> None:
    """package-data names the template, so an installed relay can serve /llms.txt."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["relay"]
    assert any(fnmatch("templates/llms.txt", pattern) for pattern in patterns)
    assert (REPO / "relay" / "templates" / "llms.txt").is_file()


def test_llms_txt_price_rule_comes_from_settings(make_settings: Callable[..., Settings]) -> None:
    client = make_client(
        make_settings(
            price_per_segment_usd=Decimal("0.07"),
            pay_to_address=OTHER_PAY_TO,
            public_base_url="https://sms.example",
        )
    )
    text = client.get("/llms.txt").get_data(as_text=True)
    assert "segments x 0.07 USD" in text
    assert OTHER_PAY_TO in text
    assert "eip155:84532" in text
    assert "0x036CbD53842c5426634e7929541eC2318f3dCF7e" in text
    assert "https://sms.example/openapi.json" in text
