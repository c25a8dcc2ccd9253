"""Bazaar discovery: the 402 describes POST /api/send, and the x402 SDK's own
facilitator-side extraction reads it back from a payment a stock client signed."""

from __future__ import annotations

import json
from collections.abc import Callable

import jsonschema
import pytest
from flask.testing import FlaskClient
from x402 import PaymentRequired
from x402.extensions.bazaar import extract_discovery_info, validate_discovery_extension
from x402.http import decode_payment_required_header

from relay.app import create_app
from relay.discovery import EXAMPLE_INPUT, EXAMPLE_OUTPUT
from relay.services import build_services
from relay.settings import Settings
from relay.wire import SendResult, request_models
from tests.conftest import Wallet, services_of
from tests.x402_helpers import pay_payload

BODY = {"message": "Discover me", "to": "+13012576365"}


@pytest.fixture
def client(paid_settings: Callable[..., Settings]) -> FlaskClient:
    """An app on the local chain (the 402 needs it)."""
    return create_app(services=build_services(paid_settings())).test_client()


def test_a_facilitator_reads_how_to_call_the_relay_from_a_signed_payment(
    client: FlaskClient, payer: Wallet
) -> None:
    challenge = client.post("/api/send", json=BODY)
    assert challenge.status_code == 402
    required = decode_payment_required_header(challenge.headers["PAYMENT-REQUIRED"])
    assert isinstance(required, PaymentRequired)
    assert validate_discovery_extension(required.extensions["bazaar"]).valid  # type: ignore[index]

    payload = pay_payload(challenge.headers["PAYMENT-REQUIRED"], payer.key)
    found = extract_discovery_info(payload, required.accepts[0])
    assert found is not None
    assert found.resource_url == "http://localhost/api/send"
    assert found.method == "POST"
    assert found.x402_version == 2
    body = found.discovery_info.input.body  # type: ignore[union-attr]
    assert body == EXAMPLE_INPUT
    limit = services_of(client.application).settings.max_message_chars
    _, send_request = request_models(limit)
    send_request.model_validate(body)  # the example is a valid request
    SendResult.model_validate_json(json.dumps(EXAMPLE_OUTPUT))  # and a valid answer


def test_the_declared_input_schema_is_the_request_model(client: FlaskClient) -> None:
    header = client.post("/api/send", json=BODY).headers["PAYMENT-REQUIRED"]
    required = decode_payment_required_header(header)
    assert isinstance(required, PaymentRequired) and required.extensions is not None
    schema = required.extensions["bazaar"]["schema"]["properties"]["input"]["properties"]["body"]
    limit = services_of(client.application).settings.max_message_chars
    jsonschema.validate(BODY, schema)
    too_long = {**BODY, "message": "x" * (limit + 1)}
    unknown = {**BODY, "callback": "http://x"}
    for bad in (too_long, unknown, {"to": BODY["to"]}):
        try:
            jsonschema.validate(bad, schema)
        except jsonschema.ValidationError:
            continue
        raise AssertionError(f"the declared schema accepts {bad}")
