"""GET /openapi.json and GET /llms.txt: valid OpenAPI 3.1, complete, and true to the code."""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator

from relay.app import create_app
from relay.docs import CLIENT_ONLY_CODES, GLOBAL_CODES, docs, openapi_document, operation_codes
from relay.errors import all_error_classes
from relay.services import build_services
from relay.settings import Settings

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


def assert_valid(spec: dict[str, Any], name: str, body: Any) -> None:
    """Validate a real response body against a component schema of the served document."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": spec["components"]}
    errors = [e.message for e in Draft202012Validator(schema).iter_errors(body)]
    assert errors == [], f"{name}: {errors}"


def documented_properties(spec: dict[str, Any], schema: dict[str, Any]) -> set[str]:
    """Top-level property names of a schema, following $ref and allOf."""
    if "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    names = set(schema.get("properties", {}))
    for part in schema.get("allOf", []):
        names |= documented_properties(spec, part)
    return names


def assert_documented(spec: dict[str, Any], name: str, body: dict[str, Any]) -> None:
    """The body matches its schema and has no field the schema does not mention."""
    assert_valid(spec, name, body)
    undocumented = set(body) - documented_properties(spec, {"$ref": f"#/x/{name}"})
    assert undocumented == set(), f"{name} lacks {undocumented}"


def codes_of(response: dict[str, Any]) -> list[str]:
    """The error codes a documented error response narrows its schema to."""
    narrowed: list[str] = response["content"]["application/json"]["schema"]["allOf"][1][
        "properties"
    ]["error"]["enum"]
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
    error = spec["components"]["schemas"]["Error"]
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
                if "allOf" not in str(response.get("content", {})):
                    continue
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
        ("SendRequest", {"message", "to", "quote_token", "smart_encoding"}),
    ):
        schema = schemas[name]
        assert schema["additionalProperties"] is False
        assert set(schema["properties"]) == fields
        assert set(schema["required"]) == {"message", "to"}
    # The server agrees: a field the schema does not allow is refused.
    response = docs_client.post("/api/quote", json={"message": "hi", "to": US, "quote_token": "x"})
    assert response.status_code == 400


# The document against the real responses -----------------------------------------------


def test_quote_and_errors_match_their_schemas(
    spec: dict[str, Any], docs_client: FlaskClient
) -> None:
    quote = docs_client.post(
        "/api/quote", json={"message": "Your order has shipped", "to": US, "smart_encoding": True}
    )
    assert quote.status_code == 200
    assert_documented(spec, "Quote", quote.get_json())
    bad = docs_client.post("/api/quote", json={"message": "hi"})
    assert bad.status_code == 400
    assert_documented(spec, "Error", bad.get_json())
    rejected = docs_client.post(
        "/api/quote", json={"message": "Login at http://10.0.0.1/", "to": US}
    )
    assert rejected.status_code == 422
    assert_documented(spec, "RejectedError", rejected.get_json())
    missing = docs_client.get("/api/messages/nope")
    assert missing.status_code == 404
    assert_documented(spec, "Error", missing.get_json())


def test_pricing_and_health_match_their_schemas(
    spec: dict[str, Any], docs_client: FlaskClient
) -> None:
    assert_documented(spec, "Pricing", docs_client.get("/api/pricing").get_json())
    assert_documented(spec, "Health", docs_client.get("/health").get_json())


def test_the_402_matches_its_schema(make_settings: Callable[..., Settings]) -> None:
    # A local facilitator builds the challenge without reaching the chain.
    client = make_client(
        make_settings(
            facilitator="local", rpc_url="http://127.0.0.1:9", settler_private_key="0x" + "11" * 32
        )
    )
    spec = client.get("/openapi.json").get_json()
    for response in (
        client.post("/api/send", json={"message": "Your order has shipped", "to": US}),
        client.post("/api/send"),
    ):
        assert response.status_code == 402
        assert response.headers["PAYMENT-REQUIRED"]
        assert_documented(spec, "PaymentRequiredError", response.get_json())


def test_a_schema_mismatch_is_caught(spec: dict[str, Any]) -> None:
    with pytest.raises(AssertionError):
        assert_documented(spec, "Error", {"error": "no_such_code", "message": "x"})
    with pytest.raises(AssertionError):
        body = {
            "error": "not_found",
            "message": "x",
            "retryable": False,
            "retry_after_seconds": None,
            "details": {},
            "surprise": 1,
        }
        assert_documented(spec, "Error", body)


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
