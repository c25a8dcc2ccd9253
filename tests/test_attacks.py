"""A hostile payer and a crashing relay, on the real local chain (README "Threat model").

Each test performs the attack or leaves the fault exactly as a crash would, then checks that
every payment ends with one SMS or one refund, and that nothing is sent unpaid.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from eth_account import Account
from flask import Flask
from flask.testing import FlaskClient
from web3 import Web3
from x402 import PaymentPayload
from x402.http import decode_payment_required_header
from x402.mechanisms.evm.types import ExactEIP3009Authorization, ExactEIP3009Payload

import relay.chain
import relay.ledger_nonces
from relay.app import create_app
from relay.dev.chain import DevChain
from relay.flows.dispatching import DISPATCH_QUIET_SECONDS
from relay.flows.reconciling import reconcile
from relay.flows.settling import (
    CANCELED,
    EXPIRY_MARGIN_SECONDS,
    PAYER_SETTLEMENT_REVERTED,
    REVERTED_PAYER_SECONDS,
    SETTLEMENT_REVERTED,
    refuse_reverted_payer,
)
from relay.nonces import fill_gap
from relay.payments import NOT_PAID, VALIDITY_TOO_LONG
from relay.schema import messages, outbox
from relay.services import Services, build_services
from relay.settings import Settings
from relay.worker import Worker
from tests.chain_attacks import Authorization, authorize, batch, cancel, wait_for
from tests.conftest import (
    SINCH_PLAN,
    SINCH_TOKEN,
    Wallet,
    new_wallet,
    rewind_payment,
    services_of,
    sinch_overrides,
    state_of,
)
from tests.fake_sinch import FakeSinch
from tests.rpc_proxy import RpcProxy
from tests.x402_helpers import client_for, header, pay, pay_payload, signed

US = "+13012576365"
PRICE = 50_000
FUNDS = 10_000_000


def challenge(client: FlaskClient, body: dict[str, Any]) -> str:
    response = client.post("/api/send", json=body)
    assert response.status_code == 402, response.get_data(as_text=True)
    return str(response.headers["PAYMENT-REQUIRED"])


def send(client: FlaskClient, body: dict[str, Any], signature: str) -> Any:
    return client.post("/api/send", json=body, headers={"PAYMENT-SIGNATURE": signature})


def settler_nonce(chain: DevChain, block: str = "latest") -> int:
    return int(chain.w3.eth.get_transaction_count(chain.accounts[0].address, block))  # type: ignore[arg-type]


@pytest.fixture
def no_automine(chain: DevChain) -> Iterator[None]:
    chain.set_automine(False)
    try:
        yield
    finally:
        chain.mine()
        chain.set_automine(True)


# 1. One transfer, many SMS ---------------------------------------------------------------


def test_one_batched_transfer_pays_for_one_sms_only(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet, no_automine: None
) -> None:
    """The payer signs A and B for two messages, sends both, and gets one Multicall3
    transaction mined first that executes A to payTo and B's nonce as a zero transfer to
    itself. A is paid by its own Transfer; B paid nothing and is refused."""
    settings = paid_settings()
    app = create_app(services=build_services(settings))
    client = app.test_client()
    bodies = [{"message": f"Batched {n}", "to": US} for n in ("A", "B")]
    payloads = [pay_payload(challenge(client, body), payer.key) for body in bodies]
    nonce_b = payloads[1].payload["authorization"]["nonce"]
    a_signed = _signed_authorization(payloads[0])
    b_zero = authorize(payer.key, payer.address, 0, nonce=nonce_b)
    attack = batch(chain, [a_signed, b_zero])
    before = settler_nonce(chain, "pending")
    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(send, app.test_client(), body, header(payload))
            for body, payload in zip(bodies, payloads, strict=True)
        ]
        wait_for(lambda: settler_nonce(chain, "pending") == before + 2)
        chain.mine()
        answers = [f.result() for f in futures]
    assert chain.w3.eth.get_transaction_receipt(attack)["status"] == 1
    a_answer, b_answer = answers
    assert a_answer.status_code == 200, a_answer.get_data(as_text=True)
    assert a_answer.get_json()["transaction"] == attack
    assert b_answer.status_code == 402, b_answer.get_data(as_text=True)
    assert b_answer.get_json()["details"]["reason"] == NOT_PAID
    services = services_of(app)
    assert len(services.ledger.outbox_messages()) == 1
    assert chain.usdc_balance(settings.pay_to_address) == PRICE
    assert chain.usdc_balance(payer.address) == FUNDS - PRICE


def _signed_authorization(payload: Any) -> Authorization:
    """The payment's own signed authorization, as the payer can submit it anywhere."""
    auth = payload.payload["authorization"]
    return Authorization(
        auth["from"],
        auth["to"],
        int(auth["value"]),
        int(auth["validAfter"]),
        int(auth["validBefore"]),
        bytes.fromhex(auth["nonce"][2:]),
        bytes.fromhex(payload.payload["signature"][2:]),
    )


def rebuilt_from_the_chain(chain: DevChain, transaction: str, required_header: str) -> str:
    """A payment header as anyone can rebuild it: the authorization and its signature from
    the settlement's calldata, everything else from a public 402 of the same price."""
    call = chain.w3.eth.get_transaction(transaction)  # type: ignore[arg-type]
    _, args = chain.token.decode_function_input(call["input"])
    signature = args["r"] + args["s"] + bytes([args["v"]])
    authorization = ExactEIP3009Authorization(
        from_address=args["from"],
        to=args["to"],
        value=str(args["value"]),
        valid_after=str(args["validAfter"]),
        valid_before=str(args["validBefore"]),
        nonce="0x" + args["nonce"].hex(),
    )
    return v2_header(required_header, authorization, "0x" + signature.hex())


def test_a_payment_rebuilt_from_the_chain_gets_no_answer_of_another_request(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet
) -> None:
    """Once settled, a payment's payload is public: its authorization is in the
    transaction's calldata, the rest in any 402 of the same price. Its stored answer holds
    the full number (and a callback's secret), so only a request for the destination and
    message it paid for gets it; anyone else's is refused and learns nothing."""
    app = create_app(services=build_services(paid_settings()))
    client = app.test_client()
    body = {"message": "Your code is 424242", "to": US}
    signature = pay(challenge(client, body), payer.key)
    paid = send(client, body, signature)
    assert paid.status_code == 200, paid.get_data(as_text=True)
    spy_body = {"message": "Any text of one segment", "to": "+14155550100"}
    rebuilt = rebuilt_from_the_chain(
        chain, paid.get_json()["transaction"], challenge(client, spy_body)
    )
    parsed = services_of(app).payments.parse_payment({"PAYMENT-SIGNATURE": rebuilt})
    assert parsed is not None
    assert parsed.payment_key == services_of(app).ledger.list_payments()[0].payment_key
    for other in (spy_body, {"message": "Your code is 424242", "to": "+14155550100"}):
        answer = send(client, other, rebuilt)
        assert answer.status_code == 402, answer.get_data(as_text=True)
        assert answer.get_json()["details"]["reason"] == "authorization_already_used"
        assert US.removeprefix("+") not in answer.get_data(as_text=True)
    again = send(client, body, rebuilt)  # the request it paid for: its answer, as stored
    assert again.status_code == 200 and again.get_json() == paid.get_json()
    assert len(services_of(app).ledger.outbox_messages()) == 1


# 2. Settled but booked as failed ---------------------------------------------------------


def crashed_after_broadcast(
    app: Flask, chain: DevChain, payer: Wallet, message: str
) -> tuple[str, str, dict[str, Any]]:
    """A payment whose authorization was settled on-chain by a process that died before the
    transaction hash (or anything after it) reached the ledger: (payment id, signature,
    body)."""
    services = services_of(app)
    client = app.test_client()
    body = {"message": message, "to": US}
    signature = pay(challenge(client, body), payer.key)
    assert send(client, body, signature).status_code == 200
    (row,) = [r for r in services.ledger.list_payments() if r.state == "dispatched"][:1]
    forget_dispatch(services)
    rewind_payment(
        services,
        row.id,
        state="settling",
        tx_hash=None,
        log_index=None,
        message_id=None,
        body=message,
    )
    return row.id, signature, body


def forget_dispatch(services: Services) -> None:
    """No message was handed to the provider yet."""
    with services.ledger.begin() as conn:
        conn.execute(messages.delete())
        conn.execute(outbox.delete())


def test_a_settlement_found_long_after_is_dispatched_not_failed(
    paid_settings: Callable[..., Settings],
    chain: DevChain,
    payer: Wallet,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Repair runs more than LOG_WINDOW_BLOCKS after the settlement (the window made small
    so that the chain need not mine thousands of blocks): the search starts at the claim."""
    monkeypatch.setattr(relay.chain, "LOG_WINDOW_BLOCKS", 20)
    app = create_app(services=build_services(paid_settings()))
    services = services_of(app)
    payment_id, signature, body = crashed_after_broadcast(app, chain, payer, "Found late")
    chain.mine(75)  # repair runs long after
    assert reconcile(services) == {payment_id: "dispatched"}
    assert len(services.ledger.outbox_messages()) == 1
    answer = send(app.test_client(), body, signature)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert chain.usdc_balance(payer.address) == FUNDS - PRICE


def test_an_authorization_used_without_a_log_found_is_kept_for_review(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet
) -> None:
    """Logs unavailable (pruned by the RPC, or the claim height wrong): money may have
    moved, so the payment is settle_unknown: never failed, never a free quote."""
    app = create_app(services=build_services(paid_settings()))
    services = services_of(app)
    payment_id, signature, body = crashed_after_broadcast(app, chain, payer, "Logs gone")
    chain.mine(3)
    rewind_payment(services, payment_id, claim_block=chain.w3.eth.block_number + 1)
    assert reconcile(services) == {payment_id: "settle_unknown"}
    row = services.ledger.payment(payment_id)
    assert row is not None and not row.quote_id.startswith("released:")
    answer = send(app.test_client(), body, signature)
    assert answer.status_code == 202, answer.get_data(as_text=True)
    assert services.ledger.outbox_messages() == []


@dataclasses.dataclass
class Signed:
    """A relay app and a payment signed for one message, not yet sent."""

    services: Services
    client: FlaskClient
    body: dict[str, Any]
    signature: str
    nonce: str


def signed_payment(settings: Settings, text: str, key: str) -> Signed:
    app = create_app(services=build_services(settings))
    services, client = services_of(app), app.test_client()
    body = {"message": text, "to": US}
    signature = pay(challenge(client, body), key)
    parsed = services.payments.parse_payment({"PAYMENT-SIGNATURE": signature})
    assert parsed is not None
    return Signed(services, client, body, signature, parsed.nonce)


def assert_failed_for_certain(answer: Any, signed: Signed, chain: DevChain, payer: Wallet) -> None:
    """402 authorization_canceled: nothing sent, nothing moved."""
    assert answer.status_code == 402, answer.get_data(as_text=True)
    assert answer.get_json()["details"]["reason"] == CANCELED
    assert signed.services.ledger.outbox_messages() == []
    assert chain.usdc_balance(payer.address) == FUNDS


def test_a_canceled_authorization_is_a_certain_failure(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet, no_automine: None
) -> None:
    """The payer cancels the authorization and gets the cancel mined ahead of the relay's
    settlement: nothing moved, the payment fails for certain and sends nothing."""
    signed = signed_payment(paid_settings(), "Canceled", payer.key)
    cancel(chain, payer.key, signed.nonce)
    before = settler_nonce(chain, "pending")
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(send, signed.client, signed.body, signed.signature)
        wait_for(lambda: settler_nonce(chain, "pending") == before + 1)
        chain.mine()
        answer = future.result()
    assert_failed_for_certain(answer, signed, chain, payer)


def test_a_cancel_mined_between_verify_and_broadcast_is_a_certain_failure(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet
) -> None:
    """A first paid send simulates its transfer in verify only: the payer gets a cancel
    mined after that and just ahead of the settlement. The relay's transaction reverts (its
    gas is the cost), and the payment fails for certain: nothing moved, nothing sent."""
    with RpcProxy(chain.rpc_url) as proxy:
        settings = paid_settings(rpc_url=proxy.url)
        signed = signed_payment(settings, "Canceled after verify", payer.key)
        proxy.before_broadcast = lambda: cancel(chain, payer.key, signed.nonce)
        answer = send(signed.client, signed.body, signed.signature)
        assert proxy.before_broadcast is None  # the cancel went ahead of the broadcast
        assert proxy.count("eth_sendRawTransaction") == 1  # the relay's, mined and reverted
        assert_failed_for_certain(answer, signed, chain, payer)
        # The payer holds no code: its revert cost it a cancel's gas, as much as the
        # settler's, so it is not refused (only contract payers revert for free).
        (row,) = signed.services.ledger.list_payments()
        assert row.error is None
        body = {"message": "Not canceled this time", "to": US}
        again = send(signed.client, body, pay(challenge(signed.client, body), payer.key))
        assert again.status_code == 200, again.get_data(as_text=True)
        signed.services.payments.close()


def assert_payer_refused(answer: Any) -> None:
    """402: the payer's settlement reverted within the hour, so it pays nothing now."""
    assert answer.status_code == 402, answer.get_data(as_text=True)
    assert answer.get_json()["details"]["reason"] == PAYER_SETTLEMENT_REVERTED
    assert 3500 < int(answer.headers["Retry-After"]) <= REVERTED_PAYER_SECONDS


#: Runtime code of a contract wallet whose ERC-1271 isValidSignature says yes to anything
#: while more than a million gas is left, and no otherwise: yes in any simulation (eth_call
#: runs with the block's gas limit), no inside the settlement transaction (500,000 gas).
#: PUSH3 1000000, GAS, GT, PUSH4 0x1626ba7e, PUSH1 224, SHL, MUL, then return that word.
SIMULATION_ONLY_WALLET = "0x620f42405a11631626ba7e60e01b0260005260206000f3"


def contract_payment(required_header: str, wallet: str) -> str:
    """A v2 payment from a contract wallet: its authorization with a signature that only
    the wallet's own ERC-1271 check judges (any bytes but 65 of them)."""
    (req,) = decode_payment_required_header(required_header).accepts
    authorization = ExactEIP3009Authorization(
        from_address=wallet,
        to=req.pay_to,
        value=req.amount,
        valid_after="0",
        valid_before=str(int(time.time()) + req.max_timeout_seconds),
        nonce="0x" + secrets.token_hex(32),
    )
    return v2_header(required_header, authorization, "0x" + "11" * 66)


def v2_header(
    required_header: str, authorization: ExactEIP3009Authorization, signature: str
) -> str:
    """The PAYMENT-SIGNATURE of an authorization and its signature, the rest as a stock v2
    client writes it for a 402 (its first requirement, resource and extensions)."""
    required = decode_payment_required_header(required_header)
    inner = ExactEIP3009Payload(authorization=authorization, signature=signature)
    payload = PaymentPayload(
        x402_version=2,
        payload=inner.to_dict(),
        accepted=required.accepts[0],
        resource=required.resource,
        extensions=required.extensions,
    )
    return header(payload)


def test_a_contract_wallet_valid_only_in_simulation_costs_one_revert_then_is_refused(
    paid_settings: Callable[..., Settings], chain: DevChain
) -> None:
    """A contract payer signs nothing: its isValidSignature passes the verify's simulation
    and fails inside the real transaction, which reverts at the settler's cost and the
    payer's none. The payment waits for its authorization's expiry (anyone may still use
    it), the payer is refused for an hour without a broadcast, and once the authorization
    has expired the payment fails for certain, never broadcast again."""
    wallet = Web3.to_checksum_address("0x" + secrets.token_hex(20))
    chain.rpc("anvil_setCode", wallet, SIMULATION_ONLY_WALLET)
    chain.mint(wallet, FUNDS)
    settler = chain.accounts[0].address
    with RpcProxy(chain.rpc_url) as proxy:
        app = create_app(services=build_services(paid_settings(rpc_url=proxy.url)))
        services, client = services_of(app), app.test_client()
        gas_before = chain.w3.eth.get_balance(settler)
        body = {"message": "Valid in simulation only", "to": US}
        first = send(client, body, contract_payment(challenge(client, body), wallet))
        assert first.status_code == 202, first.get_data(as_text=True)
        (row,) = services.ledger.list_payments()
        assert row.state == "settle_pending" and row.error == SETTLEMENT_REVERTED
        assert first.get_json()["transaction"] == row.tx_hash
        assert chain.w3.eth.get_transaction_receipt(row.tx_hash)["status"] == 0
        assert chain.w3.eth.get_balance(settler) < gas_before  # the revert's gas
        for text in ("Another try", "And one more"):
            again_body = {"message": text, "to": US}
            again = send(
                client, again_body, contract_payment(challenge(client, again_body), wallet)
            )
            assert_payer_refused(again)
        assert proxy.count("eth_sendRawTransaction") == 1
        now = time.time()
        services.clock = lambda: now + REVERTED_PAYER_SECONDS + 1
        refuse_reverted_payer(services, wallet.lower())  # an hour on, it may pay again
        services.clock = lambda: now + 360 + EXPIRY_MARGIN_SECONDS + 1  # expired
        assert reconcile(services, force=True) == {row.id: "settle_failed"}
        assert proxy.count("eth_sendRawTransaction") == 1
        final = services.ledger.payment(row.id)
        assert final is not None and final.quote_id.startswith("released:")
        services.payments.close()
    assert chain.usdc_balance(wallet) == FUNDS
    assert services.ledger.outbox_messages() == []


def test_a_reverted_settlement_whose_authorization_is_used_later_still_sends_the_sms(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet
) -> None:
    """The payer's balance leaves just ahead of the relay's settlement, which reverts. The
    authorization is not dead: it is public in the reverted transaction, and anyone may
    submit it once the balance is back. The payment waits (202), so when the transfer to
    payTo happens the repair finds it and sends the SMS: never paid without one."""
    with RpcProxy(chain.rpc_url) as proxy:
        settings = paid_settings(rpc_url=proxy.url)
        signed = signed_payment(settings, "Balance gone for a moment", payer.key)
        elsewhere = new_wallet(chain).address
        drain = authorize(payer.key, elsewhere, FUNDS)
        proxy.before_broadcast = lambda: batch(chain, [drain])
        answer = send(signed.client, signed.body, signed.signature)
        assert answer.status_code == 202, answer.get_data(as_text=True)
        services = signed.services
        (row,) = services.ledger.list_payments()
        assert row.state == "settle_pending" and row.error is None  # a payer without code
        assert chain.w3.eth.get_transaction_receipt(row.tx_hash)["status"] == 0
        chain.mint(payer.address, FUNDS)
        parsed = services.payments.parse_payment({"PAYMENT-SIGNATURE": signed.signature})
        assert parsed is not None
        used = batch(chain, [_signed_authorization(parsed.payload)])  # a stranger submits it
        assert chain.w3.eth.get_transaction_receipt(used)["status"] == 1
        assert reconcile(services, force=True) == {row.id: "dispatched"}
        assert len(services.ledger.outbox_messages()) == 1
        assert proxy.count("eth_sendRawTransaction") == 1  # the relay broadcast once
        replayed = send(signed.client, signed.body, signed.signature)
        assert replayed.status_code == 200, replayed.get_data(as_text=True)
        assert replayed.get_json()["transaction"] == used
        services.payments.close()
    assert chain.usdc_balance(settings.pay_to_address) == PRICE
    assert chain.usdc_balance(payer.address) == FUNDS - PRICE


# 5. A late repair sends twice -------------------------------------------------------------


def test_a_repair_days_later_finds_the_message_instead_of_sending_again(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet
) -> None:
    with FakeSinch(plan_id=SINCH_PLAN, token=SINCH_TOKEN) as fake:
        app = create_app(services=build_services(paid_settings(**sinch_overrides(fake.base_url))))
        services = services_of(app)
        client = app.test_client()
        body = {"message": "Sent days ago", "to": US}
        signature = pay(challenge(client, body), payer.key)
        first = send(client, body, signature)
        assert first.status_code == 200, first.get_data(as_text=True)
        (row,) = services.ledger.list_payments()
        two_days = 2 * 24 * 3600
        fake.age(two_days)
        created = float(row.created_at) - two_days
        rewind_payment(services, row.id, state="dispatching", created_at=created, message_id=None)
        assert reconcile(services) == {row.id: "dispatched"}
        assert len(fake.batches) == 1
        lookups = [r for r in fake.requests if r.method == "GET"]
        assert lookups and "start_date" in lookups[-1].query
    assert send(client, body, signature).get_json()["message_id"] == first.get_json()["message_id"]


def test_a_dispatch_that_cannot_be_looked_up_is_never_sent_blindly(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet
) -> None:
    with FakeSinch(plan_id=SINCH_PLAN, token=SINCH_TOKEN) as fake:
        settings = paid_settings(**sinch_overrides(fake.base_url))
        app = create_app(services=build_services(settings))
        services = services_of(app)
        body = {"message": "Unknown fate", "to": US}
        signature = pay(challenge(app.test_client(), body), payer.key)
        assert send(app.test_client(), body, signature).status_code == 200
    (row,) = services.ledger.list_payments()
    rewind_payment(services, row.id, state="dispatch_unknown", message_id=None, updated_at=0.0)
    gone = create_app(
        services=build_services(dataclasses.replace(settings, sinch_base_url="http://127.0.0.1:9"))
    )
    assert reconcile(services_of(gone)) == {row.id: "dispatch_unknown"}
    replay = send(gone.test_client(), body, signature)  # a replay meanwhile: a clean 502
    assert replay.status_code == 502, replay.get_data(as_text=True)
    assert replay.get_json()["details"]["status"] == "unknown"
    assert state_of(services, row.id) == "dispatch_unknown"
    assert len(fake.batches) == 1


def test_an_unconfirmed_dispatch_is_not_sent_again_before_sinch_caught_up(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet
) -> None:
    """The hand-over to Sinch went unconfirmed a moment ago and its batch list does not show
    the message (it may lag): a repair within DISPATCH_QUIET_SECONDS waits; after it, the
    SMS goes out once."""
    with FakeSinch(plan_id=SINCH_PLAN, token=SINCH_TOKEN) as fake:
        app = create_app(services=build_services(paid_settings(**sinch_overrides(fake.base_url))))
        services = services_of(app)
        body = {"message": "Unconfirmed hand-over", "to": US}
        signature = pay(challenge(app.test_client(), body), payer.key)
        assert send(app.test_client(), body, signature).status_code == 200
        (row,) = services.ledger.list_payments()
        fake.reset()  # the list shows nothing
        forget_dispatch(services)
        now = time.time()
        rewind_payment(
            services,
            row.id,
            state="dispatch_unknown",
            message_id=None,
            updated_at=now,
            body=body["message"],
        )
        services.clock = lambda: now + 1
        assert reconcile(services) == {row.id: "dispatch_unknown"}
        assert fake.batches == []  # not yet
        services.clock = lambda: now + DISPATCH_QUIET_SECONDS + 1
        assert reconcile(services) == {row.id: "dispatched"}
        assert len(fake.batches) == 1


# 8. Authorizations that outlive the challenge --------------------------------------------


def test_an_authorization_valid_for_days_is_refused(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet
) -> None:
    app = create_app(services=build_services(paid_settings()))
    client = app.test_client()
    body = {"message": "Valid for days", "to": US}
    required = decode_payment_required_header(challenge(client, body))
    req = required.accepts[0]
    payload = signed(req, payer.key, max_timeout_seconds=3 * 24 * 3600)  # type: ignore[arg-type]
    answer = send(client, body, header(payload))
    assert answer.status_code == 402, answer.get_data(as_text=True)
    assert answer.get_json()["details"]["reason"] == VALIDITY_TOO_LONG
    assert chain.usdc_balance(payer.address) == FUNDS
    fine = signed(req, payer.key)  # type: ignore[arg-type]
    assert send(client, body, header(fine)).status_code == 200


# 9. Payloads the ledger cannot read back -------------------------------------------------


def test_a_payload_with_floats_is_reconciled_from_the_header_as_received(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet
) -> None:
    app = create_app(services=build_services(paid_settings()))
    services = services_of(app)
    client = app.test_client()
    body = {"message": "Floats inside", "to": US}
    required = decode_payment_required_header(challenge(client, body))
    payload = client_for(payer.key).create_payment_payload(required)
    odd = payload.model_copy(update={"extensions": {"x-client": {"score": 0.1, "ratio": 1e-7}}})
    signature = header(odd)
    first = send(client, body, signature)
    assert first.status_code == 200, first.get_data(as_text=True)
    (row,) = services.ledger.list_payments()
    assert json.loads(base64.b64decode(row.header))["extensions"] == {
        "x-client": {"score": 0.1, "ratio": 1e-7}
    }
    forget_dispatch(services)
    rewind_payment(services, row.id, state="settled", message_id=None, body="Floats inside")
    assert reconcile(services) == {row.id: "dispatched"}
    assert len(services.ledger.outbox_messages()) == 1


# 10. settle_pending replays respect the lease ---------------------------------------------


def test_concurrent_replays_of_a_lost_settlement_broadcast_once(
    paid_settings: Callable[..., Settings],
    chain: DevChain,
    payer: Wallet,
    no_automine: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A settlement whose answer was lost (settle_pending, no hash known) with the process
    that sent it is replayed ten times at once on a new process: one replay settles, the
    others answer 202; one transaction is sent."""
    settings = paid_settings(settlement_timeout_seconds=2)
    first = create_app(services=build_services(settings))
    services = services_of(first)
    client = first.test_client()
    body = {"message": "Lost answer", "to": US}
    signature = pay(challenge(client, body), payer.key)
    before = settler_nonce(chain, "pending")
    pending = send(client, body, signature)
    assert pending.status_code == 202, pending.get_data(as_text=True)
    (row,) = services.ledger.list_payments()
    chain.drop_all_transactions()  # the broadcast was lost with its answer, a while ago
    chain.mine()  # (and gas prices moved since)
    rewind_payment(services, row.id, state="settle_pending", tx_hash=None)
    monkeypatch.setattr(relay.ledger_nonces, "NONCE_GAP_SECONDS", 2.0)  # the drop was long ago
    time.sleep(2.5)
    app = create_app(services=build_services(settings))  # the restarted process
    with ThreadPoolExecutor(10) as pool:
        replays = list(pool.map(lambda _: send(app.test_client(), body, signature), range(10)))
    codes = sorted(r.status_code for r in replays)
    assert set(codes) <= {202, 409}, [r.get_json() for r in replays]
    assert settler_nonce(chain, "pending") == before + 1  # one new broadcast, not ten
    chain.mine()
    wait_for(lambda: send(app.test_client(), body, signature).status_code == 200)
    assert len(services.ledger.outbox_messages()) == 1
    assert chain.usdc_balance(payer.address) == FUNDS - PRICE


# 3. A refund key equal to the settler key shares its nonce reservations --------------------


def test_refunds_from_the_settler_key_share_its_nonces(
    paid_settings: Callable[..., Settings], chain: DevChain
) -> None:
    """Sinch refuses everything; six paid sends at once with REFUND_PRIVATE_KEY equal to
    SETTLER_PRIVATE_KEY: settlements and refunds take turns on one account's nonces, and
    all of them are mined."""
    settler = chain.accounts[0]
    chain.mint(settler.address, 6 * PRICE)
    with FakeSinch(plan_id=SINCH_PLAN, token=SINCH_TOKEN) as fake:
        fake.script(*[{"status": 400, "code": "syntax_invalid_parameter_format"}] * 6)
        settings = paid_settings(
            refund_private_key=settler.private_key, **sinch_overrides(fake.base_url)
        )
        app = create_app(services=build_services(settings))
        payers = [new_wallet(chain, 1_000_000) for _ in range(6)]
        bodies = [{"message": f"Same key {i}", "to": US} for i in range(6)]
        signatures = [
            pay(challenge(app.test_client(), body), p.key)
            for body, p in zip(bodies, payers, strict=True)
        ]
        with ThreadPoolExecutor(6) as pool:
            answers = list(
                pool.map(lambda i: send(app.test_client(), bodies[i], signatures[i]), range(6))
            )
    assert [a.status_code for a in answers] == [502] * 6
    assert [a.get_json()["refund"]["state"] for a in answers] == ["confirmed"] * 6
    assert all(chain.usdc_balance(p.address) == 1_000_000 for p in payers)
    assert chain.usdc_balance(settings.pay_to_address) == 6 * PRICE


# 6. A settler nonce reserved and never broadcast ------------------------------------------


def abandoned_nonce(
    paid_settings: Callable[..., Settings],
    chain: DevChain,
    monkeypatch: pytest.MonkeyPatch,
    gap_seconds: float,
    settlement_timeout: float,
) -> tuple[Flask, str, int, float]:
    """An app whose settler's next nonce a process reserved and died before broadcasting
    (NONCE_GAP_SECONDS shortened to ``gap_seconds``): the app, the settler, its mined
    count and when the nonce was reserved."""
    monkeypatch.setattr(relay.ledger_nonces, "NONCE_GAP_SECONDS", gap_seconds)
    settings = paid_settings(settlement_timeout_seconds=settlement_timeout)
    app = create_app(services=build_services(settings))
    settler = chain.accounts[0].address
    pending = chain.w3.eth.get_transaction_count(settler, "pending")
    latest = chain.w3.eth.get_transaction_count(settler, "latest")
    reserved = time.time()
    assert services_of(app).ledger.reserve_nonce(settler, pending, latest, reserved) == pending
    return app, settler, latest, reserved


def test_a_nonce_reserved_by_a_crashed_process_is_filled_under_steady_traffic(
    paid_settings: Callable[..., Settings], chain: DevChain, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process reserved the settler's next nonce and died before broadcasting. Paid
    sends keep arriving, one every half second; the later transactions queue behind the
    gap until a settlement re-uses the abandoned nonce, and every send is paid and sent.
    (NONCE_GAP_SECONDS is shortened so that the test takes seconds, not a minute.)"""
    app, settler, latest, _ = abandoned_nonce(paid_settings, chain, monkeypatch, 3.0, 10)
    payers = [new_wallet(chain, 1_000_000) for _ in range(14)]
    bodies = [{"message": f"Steady {i}", "to": US} for i in range(len(payers))]
    signatures = [
        pay(challenge(app.test_client(), body), p.key)
        for body, p in zip(bodies, payers, strict=True)
    ]
    with ThreadPoolExecutor(len(payers)) as pool:
        futures = []
        for body, signature in zip(bodies, signatures, strict=True):
            futures.append(pool.submit(send, app.test_client(), body, signature))
            time.sleep(0.5)
        answers = [f.result() for f in futures]
    assert [a.status_code for a in answers] == [200] * len(payers), [a.get_json() for a in answers]
    assert all(chain.usdc_balance(p.address) == 1_000_000 - PRICE for p in payers)
    assert chain.w3.eth.get_transaction_count(settler, "latest") == latest + len(payers)


def test_a_nonce_gap_is_filled_by_the_worker_without_new_traffic(
    paid_settings: Callable[..., Settings], chain: DevChain, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process reserved the settler's next nonce and died before broadcasting; one
    payment is broadcast behind the gap, and no other arrives. The elected worker uses the
    abandoned nonce up with a transfer of nothing to the settler itself, so the waiting
    settlement is mined and the replay gets its SMS, long before its authorization expires.
    (NONCE_GAP_SECONDS is shortened so that the test takes seconds, not a minute.)"""
    app, settler, latest, reserved = abandoned_nonce(paid_settings, chain, monkeypatch, 4.0, 1)
    services = services_of(app)
    payer = new_wallet(chain, 1_000_000)
    body = {"message": "Behind the gap", "to": US}
    signature = pay(challenge(app.test_client(), body), payer.key)
    waiting = send(app.test_client(), body, signature)
    assert waiting.status_code == 202, waiting.get_data(as_text=True)  # queued behind the gap
    worker = Worker(services)
    assert worker.run_once() is not None  # elected; the reservation is not stale yet
    assert chain.w3.eth.get_transaction_count(settler, "latest") == latest
    time.sleep(max(0.0, reserved + 4.5 - time.time()))
    worker.run_once()  # the reservation is stale now: it fills the gap
    wait_for(lambda: chain.w3.eth.get_transaction_count(settler, "latest") == latest + 2)
    answer = send(app.test_client(), body, signature)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert chain.usdc_balance(payer.address) == 1_000_000 - PRICE
    assert len(services.ledger.outbox_messages()) == 1
    worker.run_once()  # no gap left: nothing more is sent
    assert chain.w3.eth.get_transaction_count(settler, "pending") == latest + 2


def test_a_nonce_gap_another_process_fills_first_is_not_filled_twice(
    paid_settings: Callable[..., Settings], chain: DevChain
) -> None:
    """Two processes see the same gap: the other retakes the abandoned nonce between this
    one's look and its reservation. This one then holds a fresh nonce instead, gives it
    back at once, and sends nothing (a transfer at a new nonce would itself leave a gap)."""
    services = build_services(paid_settings())
    ledger, settler = services.ledger, Account.from_key(chain.accounts[0].private_key)
    pending = chain.w3.eth.get_transaction_count(settler.address, "pending")
    latest = chain.w3.eth.get_transaction_count(settler.address, "latest")
    long_ago = time.time() - 100
    assert ledger.reserve_nonce(settler.address, pending, latest, long_ago) == pending
    assert ledger.reserve_nonce(settler.address, pending, latest, long_ago) == pending + 1

    class OtherProcessFirst:
        """The ledger, with another process's reservation just after the gap is seen."""

        def __getattr__(self, name: str) -> Any:
            return getattr(ledger, name)

        def nonce_gap(self, address: str, *args: Any) -> bool:
            seen = ledger.nonce_gap(address, *args)
            assert ledger.reserve_nonce(address, pending, latest, time.time()) == pending
            return seen

    assert fill_gap(chain.w3, OtherProcessFirst(), settler) is None  # type: ignore[arg-type]
    assert chain.w3.eth.get_transaction_count(settler.address, "pending") == pending
    # The nonce it held was given back: the next reservation takes it before any other.
    assert ledger.reserve_nonce(settler.address, pending, latest, time.time()) == pending + 2
