"""POST /api/send through the real app, paid with real signatures on a real local chain."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from x402 import PaymentRequirements
from x402.http import decode_payment_required_header

from relay.app import create_app
from relay.dev.chain import USDC_ADDRESS, DevChain
from relay.flows.leases import lease_seconds
from relay.ledger import Ledger
from relay.payment_headers import parse_payment
from relay.records import PaymentRecord
from relay.services import build_services
from relay.settings import Settings
from tests.chain_attacks import authorize, batch
from tests.conftest import (
    SINCH_PLAN,
    SINCH_TOKEN,
    Wallet,
    new_wallet,
    services_of,
    sinch_overrides,
)
from tests.fake_facilitator import FakeFacilitator
from tests.fake_sinch import FakeSinch, delivery_report, signature_headers
from tests.rpc_proxy import RpcProxy
from tests.x402_helpers import header, pay, pay_payload, pay_v1, signed

US = "+13012576365"
BODY = {"message": "Your order has shipped", "to": US}
PRICE = 50_000  # rules moderation: one segment, no token cost


def make_app(settings: Settings) -> Flask:
    return create_app(services=build_services(settings))


def post(client: FlaskClient, body: Any, **headers: str) -> Any:
    return client.post("/api/send", json=body, headers=headers)


def paid(client: FlaskClient, body: Any, key: str, **headers: str) -> Any:
    """The unpaid 402, then the same request paid the way a stock v2 client pays."""
    challenge = post(client, body, **headers)
    assert challenge.status_code == 402, challenge.get_data(as_text=True)
    signature = pay(challenge.headers["PAYMENT-REQUIRED"], key)
    return post(client, body, **headers, **{"PAYMENT-SIGNATURE": signature})


def decode(value: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(base64.b64decode(value))
    return data


@dataclass
class Remote:
    """The app paying through a local HTTP facilitator (FACILITATOR=remote)."""

    facilitator: FakeFacilitator
    app: Flask
    client: FlaskClient


@pytest.fixture
def remote(paid_settings: Callable[..., Settings], chain: DevChain) -> Iterator[Remote]:
    settler = new_wallet(chain)
    chain.set_eth_balance(settler.address, 10**18)
    with FakeFacilitator(chain.rpc_url, settler.key) as facilitator:
        app = make_app(paid_settings(facilitator="remote", facilitator_url=facilitator.url))
        yield Remote(facilitator, app, app.test_client())
        services_of(app).payments.close()


def signed_headers(client: FlaskClient, body: Any, key: str) -> dict[str, str]:
    """The 402's challenge for ``body``, paid the way a stock v2 client pays it."""
    head = post(client, body).headers["PAYMENT-REQUIRED"]
    return {"PAYMENT-SIGNATURE": pay(head, key)}


@pytest.fixture
def app(paid_settings: Callable[..., Settings]) -> Flask:
    return make_app(paid_settings())


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def test_challenge_is_exactly_spec(client: FlaskClient, app: Flask) -> None:
    response = post(client, BODY)
    assert response.status_code == 402
    required = decode(response.headers["PAYMENT-REQUIRED"])
    settings = services_of(app).settings
    assert required["x402Version"] == 2
    assert required["resource"]["mimeType"] == "application/json"
    assert required["resource"]["url"].endswith("/api/send")
    assert required["accepts"] == [
        {
            "scheme": "exact",
            "network": "eip155:84532",
            "amount": str(PRICE),
            "asset": USDC_ADDRESS,
            "payTo": settings.pay_to_address,
            "maxTimeoutSeconds": 300,
            "extra": {"name": "USDC", "version": "2", "paymentFlow": "upfront"},
        }
    ]
    assert "payment-identifier" in required["extensions"]
    body = response.get_json()
    assert body["error"] == "payment_required"
    assert body["protocol"] == "x402"
    assert body["price_usd"] == 0.05
    assert body["how_to_pay"]
    assert body["x402Version"] == 1
    (v1,) = body["accepts"]
    assert v1["network"] == "base-sepolia"
    assert v1["maxAmountRequired"] == str(PRICE)
    assert v1["payTo"] == settings.pay_to_address


def test_bare_probe_answers_402_with_the_price_rule(client: FlaskClient) -> None:
    response = client.post("/api/send")
    assert response.status_code == 402
    assert decode(response.headers["PAYMENT-REQUIRED"])["accepts"][0]["amount"] == str(PRICE)
    assert response.get_json()["price_rule"]["per_segment_usd"] == 0.05


def test_one_shot_send_settles_then_sends(
    client: FlaskClient, app: Flask, chain: DevChain, payer: Wallet
) -> None:
    pay_to = services_of(app).settings.pay_to_address
    before = chain.usdc_balance(payer.address), chain.usdc_balance(pay_to)
    response = paid(client, BODY, payer.key)
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["sent"] is True
    assert body["status"] == "queued"
    assert body["to"] == US
    assert body["segments"] == 1
    assert body["price_usd"] == 0.05
    assert body["paid_by"] == payer.address.lower()
    assert chain.usdc_balance(payer.address) == before[0] - PRICE
    assert chain.usdc_balance(pay_to) == before[1] + PRICE
    settle = decode(response.headers["PAYMENT-RESPONSE"])
    assert settle["success"] is True
    assert settle["transaction"] == body["transaction"]
    receipt = chain.w3.eth.get_transaction_receipt(body["transaction"])
    assert receipt["status"] == 1
    (sms,) = services_of(app).ledger.outbox_messages()
    assert sms["body"] == "Your order has shipped\nReply STOP to opt out"
    assert sms["destination"] == US
    assert sms["message_id"] == body["message_id"]


def test_quote_token_send_and_quote_used_once(
    client: FlaskClient, app: Flask, chain: DevChain, payer: Wallet
) -> None:
    quote = client.post("/api/quote", json=BODY).get_json()
    body = {**BODY, "quote_token": quote["quote_token"]}
    assert paid(client, body, payer.key).status_code == 200
    second_payer = new_wallet(chain, 1_000_000)
    response = paid(client, body, second_payer.key)
    assert response.status_code == 409
    assert response.get_json()["error"] == "quote_already_used"
    assert chain.usdc_balance(second_payer.address) == 1_000_000
    assert len(services_of(app).ledger.outbox_messages()) == 1


def test_same_payment_twice_replays_the_stored_answer(
    client: FlaskClient, app: Flask, chain: DevChain, payer: Wallet
) -> None:
    challenge = post(client, BODY).headers["PAYMENT-REQUIRED"]
    signature = pay(challenge, payer.key)
    first = post(client, BODY, **{"PAYMENT-SIGNATURE": signature})
    second = post(client, BODY, **{"PAYMENT-SIGNATURE": signature})
    assert first.status_code == second.status_code == 200
    assert first.get_json() == second.get_json()
    assert first.headers["PAYMENT-RESPONSE"] == second.headers["PAYMENT-RESPONSE"]
    assert chain.usdc_balance(payer.address) == 10_000_000 - PRICE
    assert len(services_of(app).ledger.outbox_messages()) == 1


def test_v1_client_pays_with_x_payment(
    client: FlaskClient, app: Flask, chain: DevChain, payer: Wallet
) -> None:
    challenge = post(client, BODY).get_json()
    response = post(client, BODY, **{"X-PAYMENT": pay_v1(challenge, payer.key)})
    assert response.status_code == 200, response.get_data(as_text=True)
    settle = decode(response.headers["X-PAYMENT-RESPONSE"])
    assert settle["success"] is True
    assert settle["network"] == "base-sepolia"
    assert "PAYMENT-RESPONSE" not in response.headers
    assert chain.usdc_balance(payer.address) == 10_000_000 - PRICE


def test_payment_identifier_reused_with_another_payment(
    client: FlaskClient, chain: DevChain, payer: Wallet
) -> None:
    challenge = post(client, BODY).headers["PAYMENT-REQUIRED"]
    first = header(pay_payload(challenge, payer.key, payment_id="pay_0123456789abcdef"))
    assert post(client, BODY, **{"PAYMENT-SIGNATURE": first}).status_code == 200
    other = header(pay_payload(challenge, payer.key, payment_id="pay_0123456789abcdef"))
    response = post(client, BODY, **{"PAYMENT-SIGNATURE": other})
    assert response.status_code == 409
    assert response.get_json()["error"] == "idempotency_key_reused"
    assert chain.usdc_balance(payer.address) == 10_000_000 - PRICE


def test_quote_content_mismatch_and_expiry(
    client: FlaskClient, app: Flask, chain: DevChain, payer: Wallet
) -> None:
    token = client.post("/api/quote", json=BODY).get_json()["quote_token"]
    mismatch = paid_or_status(client, {**BODY, "message": "Other text", "quote_token": token})
    assert mismatch == (400, "quote_content_mismatch")
    other_number = {**BODY, "to": "+13012576366", "quote_token": token}
    assert paid_or_status(client, other_number) == (400, "quote_content_mismatch")
    services = services_of(app)
    real_clock = services.clock
    services.clock = lambda: real_clock() + 601
    assert paid_or_status(client, {**BODY, "quote_token": token}) == (400, "quote_expired")
    bad = {**BODY, "quote_token": token[:-3] + "abc"}
    assert paid_or_status(client, bad) == (400, "invalid_input")


def paid_or_status(client: FlaskClient, body: dict[str, Any]) -> tuple[int, str]:
    response = post(client, body)
    return response.status_code, response.get_json()["error"]


def requirements_of(client: FlaskClient) -> tuple[str, PaymentRequirements]:
    challenge = post(client, BODY).headers["PAYMENT-REQUIRED"]
    required = decode_payment_required_header(challenge)
    return challenge, required.accepts[0]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("terms", "reason"),
    [
        ({"amount": str(PRICE - 1)}, "invalid_exact_evm_payload_authorization_value_mismatch"),
        ({"pay_to": "0x000000000000000000000000000000000000dEaD"}, "recipient_mismatch"),
        ({"max_timeout_seconds": 1}, "authorization_valid_before"),
    ],
    ids=["underpaid", "wrong_pay_to", "expired"],
)
def test_verify_failures_keep_the_payers_money(
    client: FlaskClient,
    app: Flask,
    chain: DevChain,
    payer: Wallet,
    terms: dict[str, Any],
    reason: str,
) -> None:
    _, req = requirements_of(client)
    payload = signed(req, payer.key, **terms)
    if terms.get("max_timeout_seconds") == 1:
        chain.increase_time(5)
    response = post(client, BODY, **{"PAYMENT-SIGNATURE": header(payload)})
    assert response.status_code == 402, response.get_data(as_text=True)
    body = response.get_json()
    assert body["error"] == "payment_verify_failed"
    assert reason in body["details"]["reason"]
    assert chain.usdc_balance(payer.address) == 10_000_000
    assert services_of(app).ledger.outbox_messages() == []


def test_insufficient_balance(client: FlaskClient, chain: DevChain) -> None:
    poor = new_wallet(chain, PRICE - 1)
    response = paid(client, BODY, poor.key)
    assert response.status_code == 402
    assert response.get_json()["details"]["reason"] == "invalid_exact_evm_insufficient_balance"
    assert chain.usdc_balance(poor.address) == PRICE - 1


def test_bad_signature(client: FlaskClient, chain: DevChain, payer: Wallet) -> None:
    challenge = post(client, BODY).headers["PAYMENT-REQUIRED"]
    payload = pay_payload(challenge, payer.key)
    inner = dict(payload.payload)
    signature = inner["signature"]
    inner["signature"] = signature[:-4] + ("0000" if not signature.endswith("0000") else "1111")
    forged = payload.model_copy(update={"payload": inner})
    response = post(client, BODY, **{"PAYMENT-SIGNATURE": header(forged)})
    assert response.status_code == 402
    assert response.get_json()["error"] == "payment_verify_failed"
    assert "signature" in response.get_json()["details"]["reason"]
    assert chain.usdc_balance(payer.address) == 10_000_000


def test_malformed_payment_header(client: FlaskClient) -> None:
    response = post(client, BODY, **{"PAYMENT-SIGNATURE": "not-base64!!"})
    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_input"


def test_invalid_request_with_payment_is_never_settled(
    client: FlaskClient, chain: DevChain, payer: Wallet
) -> None:
    challenge = post(client, BODY).headers["PAYMENT-REQUIRED"]
    signature = pay(challenge, payer.key)
    for body in ({**BODY, "extra": 1}, {"message": "", "to": US}, {"message": "hi", "to": "x"}):
        response = post(client, body, **{"PAYMENT-SIGNATURE": signature})
        assert response.status_code == 400
    rejected = post(client, {**BODY, "message": "Verify your account: bit.ly/abc"})
    assert rejected.status_code == 422
    assert chain.usdc_balance(payer.address) == 10_000_000


def test_settlement_failure_sends_nothing_and_frees_the_quote(
    remote: Remote, chain: DevChain, payer: Wallet
) -> None:
    client, facilitator = remote.client, remote.facilitator
    token = client.post("/api/quote", json=BODY).get_json()["quote_token"]
    body = {**BODY, "quote_token": token}
    facilitator.fail_status, facilitator.fail_paths = 400, ("/settle",)
    reason = "invalid_exact_evm_insufficient_balance"
    facilitator.fail_body = {"success": False, "errorReason": reason}
    response = paid(client, body, payer.key)
    assert response.status_code == 402
    assert response.get_json()["error"] == "payment_settlement_failed"
    assert response.get_json()["details"]["reason"] == reason
    assert services_of(remote.app).ledger.outbox_messages() == []
    facilitator.fail_status = None
    retry = paid(client, body, payer.key)
    assert retry.status_code == 200, retry.get_data(as_text=True)
    assert chain.usdc_balance(payer.address) == 10_000_000 - PRICE


def test_remote_facilitator_send(remote: Remote, chain: DevChain, payer: Wallet) -> None:
    response = paid(remote.client, BODY, payer.key)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert "POST /settle" in remote.facilitator.calls
    assert chain.usdc_balance(payer.address) == 10_000_000 - PRICE


def taken_over_after_claim(app: Flask, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Each payment the app claims is taken over at once by a forced repair (an operator's
    ``relay reconcile --force``): the ids of those taken."""
    services = services_of(app)
    ledger, claim = services.ledger, services.ledger.claim_payment
    taken: list[str] = []

    def claimed_then_taken(row: PaymentRecord) -> None:
        claim(row)
        assert ledger.take(row.id, services.clock(), lease_seconds(services), force=True)
        taken.append(row.id)

    monkeypatch.setattr(ledger, "claim_payment", claimed_then_taken)
    return taken


def test_a_payment_taken_over_is_not_settled_by_the_remote_facilitator(
    remote: Remote, chain: DevChain, payer: Wallet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A remote facilitator broadcasts out of sight: the lease is checked just before it is
    asked to settle."""
    taken = taken_over_after_claim(remote.app, monkeypatch)
    response = paid(remote.client, BODY, payer.key)
    assert response.status_code == 409, response.get_data(as_text=True)
    assert taken and "POST /settle" not in remote.facilitator.calls
    assert chain.usdc_balance(payer.address) == 10_000_000


# Dispatch through Sinch ------------------------------------------------------------


def sinch_settings(
    paid_settings: Callable[..., Settings], fake: FakeSinch, **more: Any
) -> Settings:
    return paid_settings(**sinch_overrides(fake.base_url), **more)


def test_sinch_receives_the_batch(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet
) -> None:
    with FakeSinch(plan_id=SINCH_PLAN, token=SINCH_TOKEN) as fake:
        app = make_app(sinch_settings(paid_settings, fake))
        response = paid(app.test_client(), BODY, payer.key)
        assert response.status_code == 200, response.get_data(as_text=True)
        (batch,) = fake.batches
    assert batch["body"] == "Your order has shipped\nReply STOP to opt out"
    assert batch["to"] == [US]
    assert batch["delivery_report"] == "per_recipient"
    assert batch["callback_url"] == "https://relay.example/webhooks/sinch/callback-secret-123"
    assert batch["id"] == response.get_json()["message_id"]


def test_sinch_failure_after_payment_refunds(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet
) -> None:
    refunder = new_wallet(chain, 5_000_000)
    chain.set_eth_balance(refunder.address, 10**18)
    with FakeSinch(plan_id=SINCH_PLAN, token=SINCH_TOKEN) as fake:
        app = make_app(sinch_settings(paid_settings, fake, refund_private_key=refunder.key))
        client = app.test_client()
        fake.script({"status": 400, "code": "syntax_invalid_parameter_format", "text": "bad"})
        response = paid(client, BODY, payer.key)
    assert response.status_code == 502
    body = response.get_json()
    assert body["error"] == "sinch_send_failed_after_payment"
    assert body["transaction"].startswith("0x")
    assert body["refund"]["state"] == "confirmed"
    assert chain.w3.eth.get_transaction_receipt(body["refund"]["transaction"])["status"] == 1
    assert chain.usdc_balance(payer.address) == 10_000_000
    assert chain.usdc_balance(refunder.address) == 5_000_000 - PRICE
    status = client.get(f"/api/messages/{body['message_id']}").get_json()
    assert status["status"] == "refunded"
    assert status["refund"]["transaction"] == body["refund"]["transaction"]
    assert status["payment"]["transaction"] == body["transaction"]


def test_sinch_failure_without_refund_key_reports_the_transaction(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet
) -> None:
    with FakeSinch(plan_id=SINCH_PLAN, token=SINCH_TOKEN) as fake:
        app = make_app(sinch_settings(paid_settings, fake))
        fake.script({"status": 401, "code": "unauthorized", "text": "no"})
        response = paid(app.test_client(), BODY, payer.key)
    assert response.status_code == 502
    assert response.get_json()["transaction"].startswith("0x")
    assert response.get_json()["refund"] is None
    assert "PAYMENT-RESPONSE" in response.headers


def test_delivery_reports_and_stop(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet
) -> None:
    with FakeSinch(plan_id=SINCH_PLAN, token=SINCH_TOKEN) as fake:
        app = make_app(sinch_settings(paid_settings, fake))
        client = app.test_client()
        message_id = paid(client, BODY, payer.key).get_json()["message_id"]
        report = delivery_report(message_id, US, "DELIVERED")
        hook = "/webhooks/sinch/callback-secret-123"
        assert client.post(hook, json=report).status_code == 200
        assert client.post("/webhooks/sinch/wrong", json=report).status_code == 404
        status = client.get(f"/api/messages/{message_id}").get_json()
        assert status["status"] == "delivered"
        assert [e["status"] for e in status["events"]] == ["queued", "delivered"]
        assert status["to"] != US
        inbound = {"type": "mo_text", "from": US.lstrip("+"), "to": "12065550100", "body": "stop"}
        assert client.post(hook, json=inbound).status_code == 200
        assert client.post("/api/quote", json=BODY).get_json()["error"] == "recipient_opted_out"
        inbound["body"] = "START"
        client.post(hook, json=inbound)
        assert client.post("/api/quote", json=BODY).status_code == 200


def test_a_paid_send_reads_the_opt_out_registry_not_the_process_memory(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet
) -> None:
    settings = paid_settings()
    client = make_app(settings).test_client()
    token = client.post("/api/quote", json=BODY).get_json()["quote_token"]
    body = dict(BODY, quote_token=token)
    headers = signed_headers(client, body, payer.key)  # this process now remembers: not opted out
    other_process = Ledger.from_url(settings.database_url)
    other_process.set_opt_out(US, True, time.time())  # STOP reached another worker
    other_process.engine.dispose()
    assert client.post("/api/quote", json=BODY).status_code == 200  # a free answer may lag
    refused = post(client, body, **headers)
    assert refused.status_code == 422, refused.get_data(as_text=True)
    assert refused.get_json()["error"] == "recipient_opted_out"
    assert chain.usdc_balance(payer.address) == 10_000_000
    assert (
        services_of(client.application).ledger.payment_by_key(
            parse_payment(headers).payment_key  # type: ignore[union-attr]
        )
        is None
    )


def test_unknown_message_is_404(client: FlaskClient) -> None:
    response = client.get("/api/messages/nope")
    assert response.status_code == 404
    assert response.get_json()["error"] == "not_found"


# The pay password --------------------------------------------------------------------


def test_password_on_both_passes_and_lockout(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet
) -> None:
    app = make_app(paid_settings(pay_password="open-sesame-42", pay_password_max_failures=4))
    client = app.test_client()
    assert post(client, BODY).status_code == 401
    assert post(client, BODY, **{"X-Pay-Password": "wrong"}).status_code == 401
    good = {"X-Pay-Password": "open-sesame-42"}
    challenge = post(client, BODY, **good)
    assert challenge.status_code == 402
    signature = pay(challenge.headers["PAYMENT-REQUIRED"], payer.key)
    unpaid = post(client, BODY, **{"PAYMENT-SIGNATURE": signature})
    assert unpaid.status_code == 401
    assert chain.usdc_balance(payer.address) == 10_000_000
    assert post(client, BODY, **good, **{"PAYMENT-SIGNATURE": signature}).status_code == 200
    locked = post(client, BODY, **{"X-Pay-Password": "wrong"})
    assert locked.status_code == 401
    assert int(locked.headers["Retry-After"]) > 0
    still_locked = post(client, BODY, **good)
    assert still_locked.status_code == 401
    assert still_locked.get_json()["retry_after_seconds"] > 0


def test_what_may_call_the_model_shares_the_quote_rate_limit(
    paid_settings: Callable[..., Settings], payer: Wallet
) -> None:
    """Quotes and one-shot sends count; a quoted send's 402 and the bare probe call no
    model and do not."""
    client = make_app(paid_settings(quote_rate_limit="2/minute")).test_client()
    quoted = client.post("/api/quote", json=BODY)
    assert quoted.status_code == 200
    token = quoted.get_json()["quote_token"]
    for _ in range(5):
        assert post(client, {**BODY, "quote_token": token}).status_code == 402
        assert client.post("/api/send").status_code == 402
    assert post(client, BODY).status_code == 402  # one-shot: the second count
    limited = post(client, BODY)
    assert limited.status_code == 429
    assert limited.get_json()["error"] == "rate_limited"
    assert int(limited.headers["Retry-After"]) >= 1
    assert client.post("/api/quote", json=BODY).status_code == 429


def test_health_reports_readiness(
    client: FlaskClient, make_settings: Callable[..., Settings]
) -> None:
    ready = client.get("/health?strict=1")
    assert ready.status_code == 200
    assert ready.get_json()["checks"]["chain"] == "ok"
    assert ready.get_json()["ready"] is True
    down = make_app(make_settings(facilitator_url="http://127.0.0.1:9")).test_client()
    assert down.get("/health").status_code == 200
    strict = down.get("/health?strict=1")
    assert strict.status_code == 503
    assert strict.get_json()["checks"] == {
        "database": "ok",
        "chain": "unreachable",
        "rate_limit_storage": "ok",
        "moderation": "rules",
        "sms": "outbox",
    }


def test_replay_after_the_quote_expired_still_gets_the_stored_answer(
    client: FlaskClient, app: Flask, payer: Wallet
) -> None:
    token = client.post("/api/quote", json=BODY).get_json()["quote_token"]
    body = {**BODY, "quote_token": token}
    signature = signed_headers(client, body, payer.key)
    first = post(client, body, **signature)
    services = services_of(app)
    real_clock = services.clock
    services.clock = lambda: real_clock() + 3600
    again = post(client, body, **signature)
    assert first.status_code == again.status_code == 200
    assert again.get_json() == first.get_json()


def test_resource_url_uses_the_public_address(paid_settings: Callable[..., Settings]) -> None:
    client = make_app(paid_settings(public_base_url="https://sms.example/")).test_client()
    required = decode(post(client, BODY).headers["PAYMENT-REQUIRED"])
    assert required["resource"]["url"] == "https://sms.example/api/send"
    assert post(client, BODY).get_json()["accepts"][0]["resource"] == "https://sms.example/api/send"


def test_each_url_and_amount_gets_its_own_402(client: FlaskClient) -> None:
    """402 answers are kept per process: a Host or a price never gets another's answer."""
    for _ in range(2):
        for host in ("a.example", "b.example"):
            for body in (BODY, dict(BODY, message="x" * 200), None):
                answer = client.post("/api/send", json=body, headers={"Host": host})
                required = decode(answer.headers["PAYMENT-REQUIRED"])
                assert required["resource"]["url"] == f"http://{host}/api/send"
                assert answer.get_json()["accepts"][0]["resource"] == f"http://{host}/api/send"
                segments = 2 if body is not None and len(body["message"]) > 160 else 1
                assert required["accepts"][0]["amount"] == str(segments * PRICE)
                assert ("price_rule" in answer.get_json()) == (body is None)


def test_an_ambiguous_settlement_failure_is_pending_never_402(
    remote: Remote, chain: DevChain, payer: Wallet
) -> None:
    signature = signed_headers(remote.client, BODY, payer.key)
    remote.facilitator.fail_status, remote.facilitator.fail_paths = 400, ("/settle",)
    remote.facilitator.fail_body = {"success": False, "errorReason": "transaction_failed"}
    unsure = post(remote.client, BODY, **signature)
    remote.facilitator.fail_status = None
    final = post(remote.client, BODY, **signature)
    assert unsure.status_code == 202, unsure.get_data(as_text=True)
    assert unsure.get_json()["error"] == "settlement_pending"
    assert final.status_code == 200, final.get_data(as_text=True)
    assert chain.usdc_balance(payer.address) == 10_000_000 - PRICE
    assert len(services_of(remote.app).ledger.outbox_messages()) == 1


def test_a_lost_settlement_answer_is_found_on_chain(
    remote: Remote, chain: DevChain, payer: Wallet
) -> None:
    signature = signed_headers(remote.client, BODY, payer.key)
    remote.facilitator.lose_settle_answers = True
    lost = post(remote.client, BODY, **signature)
    remote.facilitator.lose_settle_answers = False
    settles = remote.facilitator.calls.count("POST /settle")
    final = post(remote.client, BODY, **signature)
    assert lost.status_code == 202, lost.get_data(as_text=True)
    assert final.status_code == 200, final.get_data(as_text=True)
    assert remote.facilitator.calls.count("POST /settle") == settles
    assert chain.usdc_balance(payer.address) == 10_000_000 - PRICE
    assert len(services_of(remote.app).ledger.outbox_messages()) == 1


@pytest.fixture
def proxied_remote(
    paid_settings: Callable[..., Settings], chain: DevChain
) -> Iterator[tuple[Remote, RpcProxy]]:
    """The remote facilitator reaching the chain directly, the relay through a proxy."""
    settler = new_wallet(chain)
    chain.set_eth_balance(settler.address, 10**18)
    with RpcProxy(chain.rpc_url) as proxy, FakeFacilitator(chain.rpc_url, settler.key) as fac:
        settings = paid_settings(facilitator="remote", facilitator_url=fac.url, rpc_url=proxy.url)
        app = make_app(settings)
        yield Remote(fac, app, app.test_client()), proxy
        services_of(app).payments.close()


def test_a_settlement_whose_receipt_cannot_be_read_is_pending_with_its_hash(
    proxied_remote: tuple[Remote, RpcProxy], chain: DevChain, payer: Wallet
) -> None:
    """The remote facilitator settles, and the relay's own node goes away before the
    receipt is read: money moved by the facilitator's word, so 202 with the transaction,
    stored; once the node is back, the same request finds the settlement and sends once."""
    remote, proxy = proxied_remote
    signature = signed_headers(remote.client, BODY, payer.key)
    remote.facilitator.after_settle = lambda: setattr(proxy, "down", True)
    pending = post(remote.client, BODY, **signature)
    assert pending.status_code == 202, pending.get_data(as_text=True)
    (row,) = services_of(remote.app).ledger.list_payments()
    assert row.state == "settle_pending" and row.tx_hash == pending.get_json()["transaction"]
    proxy.down = False
    settles = remote.facilitator.calls.count("POST /settle")
    final = post(remote.client, BODY, **signature)
    assert final.status_code == 200, final.get_data(as_text=True)
    assert final.get_json()["transaction"] == row.tx_hash
    assert remote.facilitator.calls.count("POST /settle") == settles
    assert len(services_of(remote.app).ledger.outbox_messages()) == 1
    assert chain.usdc_balance(payer.address) == 10_000_000 - PRICE


def test_a_reverted_settlement_is_recorded_while_the_chain_cannot_be_read(
    proxied_remote: tuple[Remote, RpcProxy], chain: DevChain, payer: Wallet
) -> None:
    """The payer's balance leaves just before the remote facilitator settles, so its
    transaction reverts, and the relay's node goes away before the revert can be read:
    the payment waits with its transaction stored (202), rather than a 503 with nothing
    kept; once the node is back, it waits for its authorization's expiry, nothing sent."""
    remote, proxy = proxied_remote
    signature = signed_headers(remote.client, BODY, payer.key)
    drain = authorize(payer.key, new_wallet(chain).address, 10_000_000)
    remote.facilitator.before_settle = lambda: wait_mined(chain, batch(chain, [drain]))
    remote.facilitator.after_settle = lambda: setattr(proxy, "down", True)
    answer = post(remote.client, BODY, **signature)
    assert answer.status_code == 202, answer.get_data(as_text=True)
    (row,) = services_of(remote.app).ledger.list_payments()
    assert row.state == "settle_pending" and row.tx_hash == answer.get_json()["transaction"]
    assert chain.w3.eth.get_transaction_receipt(row.tx_hash)["status"] == 0
    proxy.down = False
    assert post(remote.client, BODY, **signature).status_code == 202
    kept = services_of(remote.app).ledger.payment(row.id)
    assert kept is not None and kept.tx_hash == row.tx_hash
    assert services_of(remote.app).ledger.outbox_messages() == []


def test_a_broadcast_that_fails_while_the_chain_is_away_keeps_its_recorded_hash(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet
) -> None:
    """The settlement's hash is recorded, then its broadcast's answer is lost (the node
    took it) and the chain cannot tell what became of the authorization (its state read
    answers nothing): 202 with the recorded hash kept, not written over; the same request
    later finds that transaction and sends once, never settling blindly again."""

    def node_trouble() -> None:
        proxy.lagging = {"eth_sendRawTransaction", "eth_call"}

    with RpcProxy(chain.rpc_url) as proxy:
        app = make_app(paid_settings(rpc_url=proxy.url))
        client = app.test_client()
        signature = signed_headers(client, BODY, payer.key)
        proxy.before_broadcast = node_trouble
        answer = post(client, BODY, **signature)
        assert answer.status_code == 202, answer.get_data(as_text=True)
        (row,) = services_of(app).ledger.list_payments()
        assert row.state == "settle_pending" and row.tx_hash is not None
        assert chain.w3.eth.get_transaction_receipt(row.tx_hash)["status"] == 1  # it was taken
        proxy.lagging = set()
        final = post(client, BODY, **signature)
        assert final.status_code == 200, final.get_data(as_text=True)
        assert final.get_json()["transaction"] == row.tx_hash
        assert proxy.count("eth_sendRawTransaction") == 1
        services_of(app).payments.close()
    assert len(services_of(app).ledger.outbox_messages()) == 1


def wait_mined(chain: DevChain, transaction: str) -> None:
    chain.w3.eth.wait_for_transaction_receipt(transaction, timeout=30)  # type: ignore[arg-type]


def test_no_payment_is_taken_while_the_chain_cannot_be_read(
    proxied_remote: tuple[Remote, RpcProxy], chain: DevChain, payer: Wallet
) -> None:
    """A remote facilitator could settle, but the relay's node is away: the claim needs
    the chain's height (where the settlement's log is searched from), so 503 before the
    facilitator is asked anything; nothing claimed, nothing moved."""
    remote, proxy = proxied_remote
    signature = signed_headers(remote.client, BODY, payer.key)
    proxy.down = True
    answer = post(remote.client, BODY, **signature)
    assert answer.status_code == 503, answer.get_data(as_text=True)
    assert answer.get_json()["error"] == "chain_unavailable"
    assert services_of(remote.app).ledger.list_payments() == []
    assert "POST /verify" not in remote.facilitator.calls
    proxy.down = False
    assert post(remote.client, BODY, **signature).status_code == 200
    assert chain.usdc_balance(payer.address) == 10_000_000 - PRICE


@pytest.mark.parametrize("message", ["\u200b", "\u200b\u2060\ufeff", "\u00ad\u200d"])
def test_smart_encoding_never_leaves_a_blank_message_to_send(
    client: FlaskClient, app: Flask, message: str
) -> None:
    """Smart encoding drops invisible characters; a message of nothing else would become
    blank (0 segments, priced as the moderation alone, and still an SMS with the opt-out
    line). It is kept as it was and priced as what is sent: one segment, in the quote and
    in the one-shot 402 alike."""
    body = {"message": message, "to": US, "smart_encoding": True}
    answer = client.post("/api/quote", json=body)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    quoted = answer.get_json()
    assert quoted["segments"] == 1 and quoted["smart_encoding"]["applied"] is False
    assert quoted["smart_encoding"]["text"] == message
    assert quoted["sms_price_usd"] == float(services_of(app).settings.price_per_segment_usd)
    challenge = post(client, body)
    assert challenge.status_code == 402, challenge.get_data(as_text=True)
    assert (
        decode(challenge.headers["PAYMENT-REQUIRED"])["accepts"][0]["amount"]
        == (quoted["price_atomic"])
    )


def test_signed_callbacks_are_required_when_a_signing_secret_is_set(
    paid_settings: Callable[..., Settings],
) -> None:
    client = make_app(
        paid_settings(sinch_callback_secret="callback-secret-123", sinch_signing_secret="hmac-key")
    ).test_client()
    inbound = json.dumps({"type": "mo_text", "from": "13012576365", "to": "1", "body": "STOP"})
    hook = "/webhooks/sinch/callback-secret-123"
    unsigned = client.post(hook, data=inbound, content_type="application/json")
    assert unsigned.status_code == 401
    assert client.post("/api/quote", json=BODY).status_code == 200
    headers = signature_headers("hmac-key", inbound.encode(), "nonce-1", int(time.time()))
    signed = client.post(hook, data=inbound, content_type="application/json", headers=headers)
    assert signed.status_code == 200
    assert client.post("/api/quote", json=BODY).get_json()["error"] == "recipient_opted_out"
    stale = signature_headers("hmac-key", inbound.encode(), "nonce-2", int(time.time()) - 3600)
    late = client.post(hook, data=inbound, content_type="application/json", headers=stale)
    assert late.status_code == 401
