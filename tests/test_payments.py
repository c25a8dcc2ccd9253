"""relay.payments (and the header decoding, chain reading and refunds beside it) on a real
anvil chain with real EIP-3009 signatures from the SDK's client.

Every payment path runs against both facilitators: the in-process one (FACILITATOR=local)
and a real HTTP facilitator (tests.fake_facilitator, FACILITATOR=remote).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from typing import Any

import pytest
from eth_account import Account
from eth_typing import HexStr
from x402 import PaymentRequired, PaymentRequiredV1, PaymentRequirements
from x402.extensions.payment_identifier import PAYMENT_IDENTIFIER, payment_identifier_schema
from x402.http import decode_payment_required_header, decode_payment_response_header

from relay.dev.chain import USDC_ADDRESS, DevChain
from relay.errors import (
    ChainUnavailable,
    InternalError,
    InvalidInput,
    PaymentSettlementFailed,
    PaymentVerifyFailed,
    SettlementPending,
)
from relay.ledger import Ledger
from relay.payment_headers import ParsedPayment, as_json
from relay.payments import REQUIREMENTS_MISMATCH, Payments
from relay.refunds import Refunder, raw_nonce
from relay.settings import Settings
from tests.chain_attacks import cancel
from tests.fake_facilitator import FakeFacilitator
from tests.x402_helpers import header, pay, pay_payload, pay_v1, signed

PAY_TO = "0x85F37873f97afa61263A27107f2e7b0B672d7CFF"
OTHER = "0x1111111111111111111111111111111111111111"
AMOUNT = 50626
RESOURCE = "http://relay.test/api/send"
DEAD_URL = "http://127.0.0.1:9"  # the discard port: nothing listens


@pytest.fixture(scope="module")
def chain() -> Iterator[DevChain]:
    with DevChain.start() as dev_chain:
        yield dev_chain


def make_settings(chain: DevChain, **overrides: Any) -> Settings:
    """Settings for the dev chain, settling locally with dev account 0."""
    settings = Settings(
        quote_secret="test-quote-secret-0123456789",
        pay_to_address=PAY_TO,
        rpc_url=chain.rpc_url,
        facilitator="local",
        settler_private_key=chain.accounts[0].private_key,
        moderation_provider="rules",
        sms_provider="outbox",
    )
    settings = dataclasses.replace(settings, **overrides)
    assert settings.problems() == []
    return settings


def remote_settings(chain: DevChain, url: str) -> Settings:
    return make_settings(chain, facilitator="remote", facilitator_url=url)


@pytest.fixture(scope="module")
def nonces(tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    """The shared nonce store every Payments of this module settles through."""
    ledger = Ledger.from_url(f"sqlite:///{tmp_path_factory.mktemp('nonces') / 'nonces.db'}")
    ledger.upgrade()
    return ledger


@pytest.fixture(scope="module")
def payments_of(nonces: Ledger) -> Callable[[Settings], Payments]:
    """Payments for some settings, on the module's nonce store."""
    return lambda settings: Payments(settings.payments(), nonces)


@pytest.fixture(scope="module")
def facilitator_server(chain: DevChain) -> Iterator[FakeFacilitator]:
    with FakeFacilitator(chain.rpc_url, chain.accounts[9].private_key) as server:
        yield server


@pytest.fixture(scope="module")
def local(chain: DevChain, payments_of: Callable[[Settings], Payments]) -> Iterator[Payments]:
    with closing(payments_of(make_settings(chain))) as payments:
        yield payments


@pytest.fixture(scope="module")
def remote(
    chain: DevChain,
    facilitator_server: FakeFacilitator,
    payments_of: Callable[[Settings], Payments],
) -> Iterator[Payments]:
    with closing(payments_of(remote_settings(chain, facilitator_server.url))) as payments:
        yield payments


@pytest.fixture(params=["local", "remote"])
def payments(request: pytest.FixtureRequest) -> Payments:
    payments: Payments = request.getfixturevalue(request.param)
    return payments


@pytest.fixture
def new_payer(chain: DevChain) -> Callable[..., tuple[str, str]]:
    """A fresh (address, key) holding ``funds`` test USDC (it needs no ETH: EIP-3009)."""

    def make(funds: int = 1_000_000) -> tuple[str, str]:
        account = Account.create()
        if funds:
            chain.mint(account.address, funds)
        return account.address, "0x" + bytes(account.key).hex()

    return make


def challenge(
    payments: Payments, amount: int = AMOUNT
) -> tuple[PaymentRequirements, str, dict[str, Any]]:
    req = payments.requirements(amount)
    value, v1 = payments.challenge(req, resource_url=RESOURCE, description="Send one SMS")
    return req, value, v1


def parse(payments: Payments, name: str, value: str) -> ParsedPayment:
    parsed = payments.parse_payment({name: value})
    assert parsed is not None
    return parsed


def reason_of(exc: pytest.ExceptionInfo[PaymentVerifyFailed | PaymentSettlementFailed]) -> str:
    reason = exc.value.details["reason"]
    assert exc.value.body()["reason"] == reason
    return str(reason)


# ---------------------------------------------------------------------- the challenge


def test_challenge_header_is_the_spec_shape(local: Payments) -> None:
    req = local.requirements(AMOUNT)
    value, _ = local.challenge(
        req, resource_url=RESOURCE, description="Send one SMS", error="payment_required"
    )
    accepted = {
        "scheme": "exact",
        "network": "eip155:84532",
        "amount": "50626",
        "asset": USDC_ADDRESS,
        "payTo": PAY_TO,
        "maxTimeoutSeconds": 300,
        "extra": {"name": "USDC", "version": "2", "paymentFlow": "upfront"},
    }
    expected = {
        "x402Version": 2,
        "error": "payment_required",
        "resource": {
            "url": RESOURCE,
            "description": "Send one SMS",
            "mimeType": "application/json",
        },
        "accepts": [accepted],
        "extensions": {
            PAYMENT_IDENTIFIER: {"info": {"required": False}, "schema": payment_identifier_schema}
        },
    }
    assert json.loads(base64.b64decode(value)) == expected
    decoded = decode_payment_required_header(value)
    assert isinstance(decoded, PaymentRequired)
    assert as_json(decoded) == expected


def test_challenge_body_carries_v1_accepts(local: Payments) -> None:
    _, _, v1 = challenge(local)
    assert v1 == {
        "x402Version": 1,
        "accepts": [
            {
                "scheme": "exact",
                "network": "base-sepolia",
                "maxAmountRequired": "50626",
                "resource": RESOURCE,
                "description": "Send one SMS",
                "mimeType": "application/json",
                "payTo": PAY_TO,
                "maxTimeoutSeconds": 300,
                "asset": USDC_ADDRESS,
                "extra": {"name": "USDC", "version": "2", "paymentFlow": "upfront"},
            }
        ],
    }
    assert PaymentRequiredV1.model_validate(v1).accepts[0].max_amount_required == "50626"


# ---------------------------------------------------------------------- paying


def test_v2_payment_verifies_settles_and_moves_exactly_the_amount(
    chain: DevChain, payments: Payments, new_payer: Callable[..., tuple[str, str]]
) -> None:
    payer, key = new_payer()
    req, value, _ = challenge(payments)
    parsed = parse(payments, "PAYMENT-SIGNATURE", pay(value, key))
    assert (parsed.version, parsed.payer, parsed.pay_to) == (2, payer.lower(), PAY_TO.lower())
    assert parsed.value == AMOUNT and parsed.nonce.startswith("0x") and len(parsed.nonce) == 66
    before = chain.usdc_balance(payer), chain.usdc_balance(PAY_TO)

    assert payments.match(parsed, req, time.time()) == req
    assert payments.verify(parsed, req) == payer.lower()
    settlement = payments.settle(parsed, req)

    assert settlement.payer == payer.lower() and settlement.network == "eip155:84532"
    assert chain.w3.eth.get_transaction_receipt(HexStr(settlement.transaction))["status"] == 1
    sent = chain.w3.eth.get_transaction(HexStr(settlement.transaction))
    assert sent["chainId"] == 84532  # signed for this chain only (EIP-155): no replay elsewhere
    assert sent["to"] == chain.token.address and sent["value"] == 0
    assert chain.usdc_balance(payer) == before[0] - AMOUNT
    assert chain.usdc_balance(PAY_TO) == before[1] + AMOUNT
    name, encoded = payments.response_header(settlement, parsed.version)
    response = decode_payment_response_header(encoded)
    assert name == "PAYMENT-RESPONSE"
    assert (response.success, response.transaction) == (True, settlement.transaction)


def test_v1_x_payment_verifies_settles_and_answers_x_payment_response(
    chain: DevChain, payments: Payments, new_payer: Callable[..., tuple[str, str]]
) -> None:
    payer, key = new_payer()
    req, _, v1 = challenge(payments)
    parsed = parse(payments, "X-PAYMENT", pay_v1(v1, key))
    assert (parsed.version, parsed.payer, parsed.payment_identifier) == (1, payer.lower(), None)
    before = chain.usdc_balance(PAY_TO)

    payments.match(parsed, req, time.time())
    assert payments.verify(parsed, req) == payer.lower()
    settlement = payments.settle(parsed, req)

    assert chain.usdc_balance(PAY_TO) == before + AMOUNT
    name, encoded = payments.response_header(settlement, 1)
    assert name == "X-PAYMENT-RESPONSE"
    response = decode_payment_response_header(encoded)
    assert (response.success, response.network) == (True, "base-sepolia")
    assert response.transaction == settlement.transaction


def test_payment_key_is_stable_per_payload(
    local: Payments, new_payer: Callable[..., tuple[str, str]]
) -> None:
    _, key = new_payer(0)
    _, value, _ = challenge(local)
    signature = pay(value, key)
    first = parse(local, "PAYMENT-SIGNATURE", signature)
    again = parse(local, "payment-signature", signature)  # header names are case-insensitive
    other = parse(local, "PAYMENT-SIGNATURE", pay(value, key))
    assert first.payment_key == again.payment_key
    assert len(first.payment_key) == 64
    assert other.payment_key != first.payment_key
    assert first.header == signature
    assert first.as_dict()["payload"]["authorization"]["nonce"] == first.nonce


def test_payment_identifier_is_read_and_validated(
    local: Payments, new_payer: Callable[..., tuple[str, str]]
) -> None:
    _, key = new_payer(0)
    _, value, _ = challenge(local)
    parsed = parse(local, "PAYMENT-SIGNATURE", pay(value, key, payment_id="pay_0123456789abcdef"))
    assert parsed.payment_identifier == "pay_0123456789abcdef"

    payload = pay_payload(value, key, payment_id="pay_0123456789abcdef")
    assert payload.extensions is not None
    payload.extensions[PAYMENT_IDENTIFIER]["info"]["id"] = "short!"
    with pytest.raises(InvalidInput) as exc:
        local.parse_payment({"PAYMENT-SIGNATURE": header(payload)})
    assert exc.value.details["field"] == PAYMENT_IDENTIFIER


@pytest.mark.parametrize(
    "schema",
    [
        {"not": {}},  # would refuse every identifier
        {"$ref": "http://127.0.0.1:9/schema.json"},  # would make the relay fetch it
        {"properties": {"id": {"pattern": "^(a+)+$"}}},  # a slow pattern of the payer's choosing
    ],
)
def test_a_schema_sent_back_by_the_payer_is_not_run(
    local: Payments, new_payer: Callable[..., tuple[str, str]], schema: dict[str, object]
) -> None:
    """The identifier is checked by the rules the 402 declared, whatever schema comes back."""
    _, key = new_payer(0)
    _, value, _ = challenge(local)
    payload = pay_payload(value, key, payment_id="pay_0123456789abcdef")
    assert payload.extensions is not None
    payload.extensions[PAYMENT_IDENTIFIER]["schema"] = schema
    parsed = local.parse_payment({"PAYMENT-SIGNATURE": header(payload)})
    assert parsed is not None and parsed.payment_identifier == "pay_0123456789abcdef"

    payload.extensions[PAYMENT_IDENTIFIER]["schema"] = {}  # a schema that accepts anything
    for bad in ("a" * 129, "pay_0123456789abcdef\n"):
        payload.extensions[PAYMENT_IDENTIFIER]["info"]["id"] = bad
        with pytest.raises(InvalidInput) as exc:
            local.parse_payment({"PAYMENT-SIGNATURE": header(payload)})
        assert exc.value.details["field"] == PAYMENT_IDENTIFIER


def test_no_payment_header_is_none(local: Payments) -> None:
    assert local.parse_payment({"Content-Type": "application/json"}) is None


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("PAYMENT-SIGNATURE", "%%% not base64 %%%", "base64"),
        ("PAYMENT-SIGNATURE", base64.b64encode(b"not json").decode(), "base64"),
        ("X-PAYMENT", base64.b64encode(b"[1, 2]").decode(), "base64"),
        ("PAYMENT-SIGNATURE", base64.b64encode(b'{"x402Version": 2}').decode(), "base64"),
        ("PAYMENT-SIGNATURE", "A" * 20_000, "longer than"),
    ],
)
def test_undecodable_header_is_invalid_input(
    local: Payments, name: str, value: str, problem: str
) -> None:
    with pytest.raises(InvalidInput) as exc:
        local.parse_payment({name: value})
    assert exc.value.details["field"] == name
    assert problem in exc.value.details["problem"]


def _drop_0x(payment: dict[str, Any], field: str) -> None:
    authorization = payment["payload"]["authorization"]
    authorization[field] = authorization[field].removeprefix("0x")


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda p: p.update(x402Version=3), "x402Version"),
        (lambda p: p.update(x402Version="1"), "x402Version"),
        (lambda p: p["payload"].pop("signature"), "EIP-3009"),
        (lambda p: p["payload"]["authorization"].update(nonce="0x12"), "nonce"),
        (lambda p: p["payload"]["authorization"].update(to="nobody"), "addresses"),
        # an address without its 0x (web3 would never take it; it must not reach the chain)
        (lambda p: _drop_0x(p, "to"), "addresses"),
        (lambda p: _drop_0x(p, "from"), "addresses"),
        (lambda p: p["payload"]["authorization"].update(value="-1"), "value"),
        (lambda p: p["payload"]["authorization"].update(validBefore=None), "validBefore"),
        # a second way to pay beside the authorization (which the SDK would take instead)
        (lambda p: p["payload"].update(permit2Authorization={"from": "0x" + "1" * 40}), "only"),
    ],
)
def test_malformed_payment_is_invalid_input(
    local: Payments,
    new_payer: Callable[..., tuple[str, str]],
    change: Callable[[dict], object],  # type: ignore[type-arg]
    problem: str,
) -> None:
    _, key = new_payer(0)
    _, value, _ = challenge(local)
    data = json.loads(base64.b64decode(pay(value, key)))
    change(data)
    with pytest.raises(InvalidInput) as exc:
        local.parse_payment(
            {"PAYMENT-SIGNATURE": base64.b64encode(json.dumps(data).encode()).decode()}
        )
    assert problem in exc.value.details["problem"]


# ---------------------------------------------------------------------- refusals


def test_payment_for_other_terms_is_a_requirements_mismatch(
    local: Payments,
    chain: DevChain,
    new_payer: Callable[..., tuple[str, str]],
    payments_of: Callable[[Settings], Payments],
) -> None:
    _, key = new_payer()
    req = local.requirements(AMOUNT)
    _, cheaper, _ = challenge(local, AMOUNT - 1)
    with pytest.raises(PaymentVerifyFailed) as exc:
        local.match(parse(local, "PAYMENT-SIGNATURE", pay(cheaper, key)), req, time.time())
    assert reason_of(exc) == REQUIREMENTS_MISMATCH

    with closing(payments_of(make_settings(chain, pay_to_address=OTHER))) as elsewhere:
        _, other_pay_to, _ = challenge(elsewhere)
    with pytest.raises(PaymentVerifyFailed) as exc:
        local.match(parse(local, "PAYMENT-SIGNATURE", pay(other_pay_to, key)), req, time.time())
    assert reason_of(exc) == REQUIREMENTS_MISMATCH


def test_v1_payment_on_another_network_is_a_requirements_mismatch(
    local: Payments, new_payer: Callable[..., tuple[str, str]]
) -> None:
    _, key = new_payer(0)
    req, _, v1 = challenge(local)
    data = json.loads(base64.b64decode(pay_v1(v1, key)))
    data["network"] = "base"
    x_payment = base64.b64encode(json.dumps(data).encode()).decode()
    with pytest.raises(PaymentVerifyFailed) as exc:
        local.match(parse(local, "X-PAYMENT", x_payment), req, time.time())
    assert reason_of(exc) == REQUIREMENTS_MISMATCH


@pytest.mark.parametrize(
    ("terms", "reason"),
    [
        ({"amount": str(AMOUNT - 1)}, "invalid_exact_evm_payload_authorization_value_mismatch"),
        ({"pay_to": OTHER}, "invalid_exact_evm_payload_recipient_mismatch"),
    ],
)
def test_authorization_for_other_terms_fails_match_and_verify(
    payments: Payments,
    new_payer: Callable[..., tuple[str, str]],
    terms: dict[str, str],
    reason: str,
) -> None:
    _, key = new_payer()
    req = payments.requirements(AMOUNT)
    parsed = parse(payments, "PAYMENT-SIGNATURE", header(signed(req, key, **terms)))
    with pytest.raises(PaymentVerifyFailed) as exc:
        payments.match(parsed, req, time.time())
    assert reason_of(exc) == reason
    with pytest.raises(PaymentVerifyFailed) as exc:
        payments.verify(parsed, req)  # the facilitator agrees
    assert reason_of(exc) == reason


def test_expired_authorization_fails_verify(
    payments: Payments, new_payer: Callable[..., tuple[str, str]]
) -> None:
    _, key = new_payer()
    req = payments.requirements(AMOUNT)
    parsed = parse(payments, "PAYMENT-SIGNATURE", header(signed(req, key, max_timeout_seconds=1)))
    payments.match(parsed, req, time.time())
    with pytest.raises(PaymentVerifyFailed) as exc:
        payments.verify(parsed, req)
    assert reason_of(exc) == "invalid_exact_evm_payload_authorization_valid_before"


def test_insufficient_balance_fails_verify(
    payments: Payments, new_payer: Callable[..., tuple[str, str]]
) -> None:
    _, key = new_payer(AMOUNT - 1)
    req, value, _ = challenge(payments)
    parsed = parse(payments, "PAYMENT-SIGNATURE", pay(value, key))
    payments.match(parsed, req, time.time())
    with pytest.raises(PaymentVerifyFailed) as exc:
        payments.verify(parsed, req)
    assert reason_of(exc) == "invalid_exact_evm_insufficient_balance"
    assert "balance" in exc.value.message


def test_signature_of_another_key_fails_verify(
    payments: Payments, new_payer: Callable[..., tuple[str, str]]
) -> None:
    payer, _ = new_payer()
    _, forger_key = new_payer(0)
    req, value, _ = challenge(payments)
    payload = pay_payload(value, forger_key)
    payload.payload["authorization"]["from"] = payer
    parsed = parse(payments, "PAYMENT-SIGNATURE", header(payload))
    payments.match(parsed, req, time.time())
    with pytest.raises(PaymentVerifyFailed) as exc:
        payments.verify(parsed, req)
    assert reason_of(exc) == "invalid_exact_evm_payload_signature"


def test_settled_payment_cannot_be_replayed(
    chain: DevChain, payments: Payments, new_payer: Callable[..., tuple[str, str]]
) -> None:
    payer, key = new_payer()
    req, value, _ = challenge(payments)
    parsed = parse(payments, "PAYMENT-SIGNATURE", pay(value, key))
    payments.settle(parsed, req)
    balance = chain.usdc_balance(payer)

    with pytest.raises(PaymentVerifyFailed) as verify_exc:
        payments.verify(parsed, req)
    assert reason_of(verify_exc) == "invalid_exact_evm_nonce_already_used"
    with pytest.raises(PaymentSettlementFailed) as settle_exc:
        payments.settle(parsed, req)
    # Ours simulates before broadcasting; the stock remote one broadcasts and reverts.
    assert reason_of(settle_exc) in ("invalid_exact_evm_nonce_already_used", "transaction_failed")
    assert chain.usdc_balance(payer) == balance


def test_a_settle_not_just_verified_simulates_before_broadcast(
    chain: DevChain, local: Payments, new_payer: Callable[..., tuple[str, str]]
) -> None:
    """A settle that no verify of the same request preceded (a retry, the reconciler) still
    refuses a canceled or spent authorization before anything is broadcast: no gas spent."""
    settler = chain.accounts[0].address
    _, key = new_payer()
    req, value, _ = challenge(local)
    parsed = parse(local, "PAYMENT-SIGNATURE", pay(value, key))
    cancel(chain, key, parsed.nonce)
    sent = chain.w3.eth.get_transaction_count(settler)
    with pytest.raises(PaymentSettlementFailed) as canceled:
        local.settle(parsed, req)
    assert reason_of(canceled) == "invalid_exact_evm_nonce_already_used"
    assert chain.w3.eth.get_transaction_count(settler) == sent

    _, key = new_payer()
    parsed = parse(local, "PAYMENT-SIGNATURE", pay(value, key))
    local.settle(parsed, req, verified=True)
    sent = chain.w3.eth.get_transaction_count(settler)
    with pytest.raises(PaymentSettlementFailed) as spent:
        local.settle(parsed, req)
    assert reason_of(spent) == "invalid_exact_evm_nonce_already_used"
    assert chain.w3.eth.get_transaction_count(settler) == sent


def test_concurrent_payments_all_settle(
    chain: DevChain, payments: Payments, new_payer: Callable[..., tuple[str, str]]
) -> None:
    req, value, _ = challenge(payments)
    parsed = [parse(payments, "PAYMENT-SIGNATURE", pay(value, new_payer()[1])) for _ in range(6)]
    before = chain.usdc_balance(PAY_TO)
    with ThreadPoolExecutor(max_workers=6) as pool:
        settlements = list(pool.map(lambda p: payments.settle(p, req), parsed))
    assert len({s.transaction for s in settlements}) == 6
    assert chain.usdc_balance(PAY_TO) == before + 6 * AMOUNT


# ---------------------------------------------------------------------- slow or absent chains


def test_unconfirmed_settlement_is_pending_then_settles_once(
    chain: DevChain,
    new_payer: Callable[..., tuple[str, str]],
    payments_of: Callable[[Settings], Payments],
) -> None:
    payments = payments_of(make_settings(chain, settlement_timeout_seconds=0.3))
    payer, key = new_payer()
    req, value, _ = challenge(payments)
    parsed = parse(payments, "PAYMENT-SIGNATURE", pay(value, key))
    chain.set_automine(False)
    try:
        with pytest.raises(SettlementPending) as exc:
            payments.settle(parsed, req)
        pending = exc.value.details["transaction"]
        assert exc.value.status == 202 and exc.value.retry_after
        assert payments.confirm(parsed, req, pending) is None
        chain.mine()
    finally:
        chain.set_automine(True)
    confirmed = payments.confirm(parsed, req, pending)  # what a reconciler asks
    assert confirmed is not None and confirmed.payer == payer.lower()
    settlement = payments.settle(parsed, req)  # the same request, retried
    assert settlement.transaction == pending
    assert chain.usdc_balance(payer) == 1_000_000 - AMOUNT


def test_confirm_refuses_a_transaction_that_did_not_pay(
    chain: DevChain, local: Payments, new_payer: Callable[..., tuple[str, str]]
) -> None:
    payer, key = new_payer(0)
    req, value, _ = challenge(local)
    parsed = parse(local, "PAYMENT-SIGNATURE", pay(value, key))
    mint = chain.mint(payer, AMOUNT)["transactionHash"].to_0x_hex()
    with pytest.raises(PaymentSettlementFailed) as exc:
        local.confirm(parsed, req, mint)
    assert exc.value.details["transaction"] == mint


def test_unconfirmed_remote_settlement_is_pending(
    chain: DevChain,
    new_payer: Callable[..., tuple[str, str]],
    payments_of: Callable[[Settings], Payments],
) -> None:
    fake = FakeFacilitator(chain.rpc_url, chain.accounts[8].private_key, receipt_timeout=0.3)
    with fake, closing(payments_of(remote_settings(chain, fake.url))) as payments:
        _, key = new_payer()
        req, value, _ = challenge(payments)
        parsed = parse(payments, "PAYMENT-SIGNATURE", pay(value, key))
        chain.set_automine(False)
        try:
            with pytest.raises(SettlementPending) as exc:
                payments.settle(parsed, req)
            chain.mine()
        finally:
            chain.set_automine(True)
        assert fake.calls.count("POST /settle") == 2  # the SDK retries a pending settle once
        assert payments.settle(parsed, req).transaction == exc.value.details["transaction"]


def test_unreachable_remote_facilitator_is_retried(
    chain: DevChain, payments_of: Callable[[Settings], Payments]
) -> None:
    with FakeFacilitator(chain.rpc_url, chain.accounts[8].private_key) as fake:
        url, port = fake.url, int(fake.url.rsplit(":", 1)[1])
    with closing(payments_of(remote_settings(chain, url))) as payments:
        with pytest.raises(ChainUnavailable) as exc:
            payments.requirements(AMOUNT)
        assert exc.value.retry_after
        with FakeFacilitator(chain.rpc_url, chain.accounts[8].private_key, port=port):
            assert payments.requirements(AMOUNT).amount == str(AMOUNT)


def test_remote_facilitator_errors_are_translated(
    chain: DevChain,
    new_payer: Callable[..., tuple[str, str]],
    payments_of: Callable[[Settings], Payments],
) -> None:
    fake = FakeFacilitator(chain.rpc_url, chain.accounts[8].private_key)
    with fake, closing(payments_of(remote_settings(chain, fake.url))) as payments:
        _, key = new_payer()
        req, value, _ = challenge(payments)
        parsed = parse(payments, "PAYMENT-SIGNATURE", pay(value, key))

        fake.fail_status = 503
        with pytest.raises(ChainUnavailable):
            payments.verify(parsed, req)
        with pytest.raises(SettlementPending) as pending:  # it may have broadcast: never a 402
            payments.settle(parsed, req)
        assert pending.value.details["transaction"] is None

        fake.fail_status, fake.fail_body = 400, {"isValid": False, "invalidReason": "nope"}
        with pytest.raises(PaymentVerifyFailed) as rejected:
            payments.verify(parsed, req)
        assert reason_of(rejected) == "nope"


def test_unreachable_rpc_is_chain_unavailable(
    chain: DevChain,
    local: Payments,
    new_payer: Callable[..., tuple[str, str]],
    payments_of: Callable[[Settings], Payments],
) -> None:
    _, key = new_payer()
    req, value, _ = challenge(local)
    offline = payments_of(make_settings(chain, rpc_url=DEAD_URL))
    parsed = parse(offline, "PAYMENT-SIGNATURE", pay(value, key))
    with pytest.raises(ChainUnavailable):
        offline.verify(parsed, req)
    with pytest.raises(ChainUnavailable):
        offline.settle(parsed, req)


# ---------------------------------------------------------------------- refunds


def test_refund_sends_the_usdc_back(
    chain: DevChain, new_payer: Callable[..., tuple[str, str]], nonces: Ledger
) -> None:
    config = make_settings(chain, refund_private_key=chain.accounts[7].private_key).refunds()
    assert config is not None
    refunder = Refunder(config, nonces)
    assert refunder.address == chain.accounts[7].address
    chain.mint(refunder.address, AMOUNT)
    payer, _ = new_payer(0)

    signed = refunder.sign(payer.lower(), AMOUNT)
    assert chain.usdc_balance(payer) == 0  # signed, not sent
    assert refunder.send(signed) == "confirmed"
    assert refunder.send(signed) == "confirmed"  # sending it again moves nothing more

    assert chain.usdc_balance(payer) == AMOUNT
    assert chain.w3.eth.get_transaction_receipt(HexStr(signed.tx_hash))["status"] == 1
    with pytest.raises(InternalError):  # the refund wallet is empty now
        refunder.sign(payer, AMOUNT)


def test_the_nonce_of_a_recorded_refund_is_read_from_its_raw_transaction() -> None:
    """Refunds recorded before their nonce was (schema 1) still know it."""
    account = Account.create()
    legacy = {"to": account.address, "value": 1, "gas": 21000, "gasPrice": 1, "nonce": 7}
    typed = {
        "to": account.address,
        "value": 1,
        "gas": 21000,
        "maxFeePerGas": 2,
        "maxPriorityFeePerGas": 1,
        "nonce": 300,
        "type": 2,
    }
    for tx, nonce in ((legacy, 7), (typed, 300)):
        raw = account.sign_transaction({**tx, "chainId": 84532}).raw_transaction.to_0x_hex()
        assert raw_nonce(raw) == nonce
    assert raw_nonce("0xnothex") is None
