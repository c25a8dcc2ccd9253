"""Reconciliation finishes every payment a crash left at any step, exactly once.

Each test pays for real on the local chain, then puts the ledger back into the state a
crash at one step would have left (the database is the only memory a restarted process
has), and lets `reconcile` finish it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from flask import Flask
from sqlalchemy import delete, update
from x402.http import decode_payment_required_header

import relay.ledger
from relay.app import create_app
from relay.dev.chain import DevChain
from relay.dev.stack import DevStack
from relay.flows.answers import Outcome, finish
from relay.flows.reconciling import reconcile
from relay.flows.settling import EXPIRY_MARGIN_SECONDS
from relay.payments import Settlement
from relay.records import PaymentRecord
from relay.schema import messages, outbox, payments, refunds
from relay.services import Services, build_services
from relay.settings import Settings
from relay.states import PaymentState as P
from tests.chain_attacks import wait_for
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
from tests.test_ledger import payment
from tests.x402_helpers import pay

US = "+13012576365"
BODY = {"message": "Reconcile me", "to": US}
PRICE = 50_000


def paid_send(app: Flask, key: str) -> tuple[dict[str, Any], str]:
    client = app.test_client()
    head = client.post("/api/send", json=BODY).headers["PAYMENT-REQUIRED"]
    signature = pay(head, key)
    response = client.post("/api/send", json=BODY, headers={"PAYMENT-SIGNATURE": signature})
    assert response.status_code in (200, 502), response.get_data(as_text=True)
    return response.get_json(), signature


def rewind(services: Services, state: str, **fields: Any) -> str:
    """Put the only payment back into ``state`` as a crash there would leave it."""
    (row,) = services.ledger.list_payments()
    rewind_payment(services, row.id, state=state, **fields)
    return str(row.id)


def replay(app: Flask, signature: str) -> Any:
    return app.test_client().post("/api/send", json=BODY, headers={"PAYMENT-SIGNATURE": signature})


def settler_nonce(chain: DevChain) -> int:
    return chain.w3.eth.get_transaction_count(chain.accounts[0].address)


def test_settled_but_never_dispatched(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet
) -> None:
    app = create_app(services=build_services(paid_settings()))
    services = services_of(app)
    first, signature = paid_send(app, payer.key)
    with services.ledger.begin() as conn:
        conn.execute(delete(outbox))
        conn.execute(delete(messages))
    payment_id = rewind(services, "settled", message_id=None, body="Reconcile me")
    nonce = settler_nonce(chain)
    assert reconcile(services) == {payment_id: "dispatched"}
    (sms,) = services.ledger.outbox_messages()
    assert sms["body"] == "Reconcile me\nReply STOP to opt out"
    assert settler_nonce(chain) == nonce
    answer = replay(app, signature)
    assert answer.status_code == 200
    assert answer.get_json()["message_id"] == sms["message_id"]
    assert answer.get_json()["transaction"] == first["transaction"]
    assert reconcile(services) == {}
    assert chain.usdc_balance(payer.address) == 10_000_000 - PRICE


def test_dispatching_finds_the_batch_sinch_already_has(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet
) -> None:
    with FakeSinch(plan_id=SINCH_PLAN, token=SINCH_TOKEN) as fake:
        settings = paid_settings(**sinch_overrides(fake.base_url))
        app = create_app(services=build_services(settings))
        services = services_of(app)
        first, signature = paid_send(app, payer.key)
        payment_id = rewind(services, "dispatching", message_id=None, body="Reconcile me")
        assert reconcile(services) == {payment_id: "dispatched"}
        assert len(fake.batches) == 1
        answer = replay(app, signature)
    assert answer.get_json()["message_id"] == first["message_id"]


def test_unsent_refund_is_sent(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet
) -> None:
    refunder = new_wallet(chain, 1_000_000)
    chain.set_eth_balance(refunder.address, 10**18)
    with FakeSinch(plan_id=SINCH_PLAN, token=SINCH_TOKEN) as fake:
        settings = paid_settings(**sinch_overrides(fake.base_url))
        fake.script({"status": 400, "code": "syntax_invalid_parameter_format", "text": "no"})
        app = create_app(services=build_services(settings))
        failed, _ = paid_send(app, payer.key)
    assert failed["error"] == "sinch_send_failed_after_payment"
    assert failed["refund"] is None
    assert chain.usdc_balance(payer.address) == 10_000_000 - PRICE
    later = create_app(
        services=build_services(dataclasses.replace(settings, refund_private_key=refunder.key))
    )
    services = services_of(later)
    payment_id = rewind(services, "dispatch_failed", response_status=502)
    assert reconcile(services) == {payment_id: "refunded"}
    assert chain.usdc_balance(payer.address) == 10_000_000
    refund = services.ledger.refund(payment_id)
    assert refund is not None and refund.state == "confirmed"
    assert reconcile(services) == {}


def test_expired_unsettled_authorization_frees_the_quote(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet
) -> None:
    app = create_app(services=build_services(paid_settings()))
    services = services_of(app)
    client = app.test_client()
    token = client.post("/api/quote", json=BODY).get_json()["quote_token"]
    body = {**BODY, "quote_token": token}
    head = client.post("/api/send", json=body).headers["PAYMENT-REQUIRED"]
    parsed = services.payments.parse_payment({"PAYMENT-SIGNATURE": pay(head, payer.key)})
    assert parsed is not None
    fields = {
        "id": "crashed0payment0000000001",
        "payment_key": parsed.payment_key,
        "quote_id": services.signer.verify(token, message=BODY["message"], to=US, now=0).quote_id,
        "payer": parsed.payer,
        "nonce": parsed.nonce,
        "amount_atomic": PRICE,
        "network": "eip155:84532",
        "asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
        "pay_to": services.settings.pay_to_address,
        "destination": US,
        "segments": 1,
        "body": BODY["message"],
        "version": 2,
        "state": "settling",
        "payload": parsed.as_dict(),
        "requirements": decode_payment_required_header(head)
        .accepts[0]
        .model_dump(  # type: ignore[union-attr]
            mode="json", by_alias=True
        ),
        "created_at": 0.0,
        "updated_at": 0.0,
    }
    row = payment(**fields, header=None, claim_block=None)
    services.ledger.claim_payment(row)
    services.clock = lambda: parsed.valid_before + EXPIRY_MARGIN_SECONDS + 1.0
    assert reconcile(services) == {"crashed0payment0000000001": "settle_failed"}
    assert state_of(services, row.id) == "settle_failed"
    assert services.ledger.quote_claim(row.quote_id) is None
    assert chain.usdc_balance(payer.address) == 10_000_000
    with services.ledger.begin() as conn:
        assert conn.execute(refunds.select()).first() is None


def test_an_unconfirmed_refund_is_sent_again_never_twice(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet
) -> None:
    refunder = new_wallet(chain, 1_000_000)
    chain.set_eth_balance(refunder.address, 10**18)
    with FakeSinch(plan_id=SINCH_PLAN, token=SINCH_TOKEN) as fake:
        settings = paid_settings(**sinch_overrides(fake.base_url))
        fake.script({"status": 400, "code": "syntax_invalid_parameter_format", "text": "no"})
        paid_send(create_app(services=build_services(settings)), payer.key)
    refunding = dataclasses.replace(
        settings, refund_private_key=refunder.key, settlement_timeout_seconds=0.3
    )
    services = services_of(create_app(services=build_services(refunding)))
    payment_id = rewind(services, "dispatch_failed", response_status=502)
    chain.set_automine(False)
    try:
        assert reconcile(services, force=True) == {payment_id: "dispatch_failed"}
        pending = services.ledger.refund(payment_id)
        assert pending is not None and pending.state == "pending"
        assert reconcile(services, force=True) == {payment_id: "dispatch_failed"}
        chain.mine()
    finally:
        chain.set_automine(True)
    assert reconcile(services, force=True) == {payment_id: "refunded"}
    refund = services.ledger.refund(payment_id)
    assert refund is not None and refund.tx_hash == pending.tx_hash
    assert chain.usdc_balance(payer.address) == 10_000_000
    assert chain.usdc_balance(refunder.address) == 1_000_000 - PRICE


def test_a_dropped_pending_settlement_fails_once_expired(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet
) -> None:
    app = create_app(services=build_services(paid_settings(settlement_timeout_seconds=0.3)))
    services = services_of(app)
    client = app.test_client()
    head = client.post("/api/send", json=BODY).headers["PAYMENT-REQUIRED"]
    signature = {"PAYMENT-SIGNATURE": pay(head, payer.key)}
    parsed = services.payments.parse_payment(signature)
    assert parsed is not None
    chain.set_automine(False)
    try:
        pending = client.post("/api/send", json=BODY, headers=signature)
        assert pending.status_code == 202, pending.get_data(as_text=True)
        chain.drop_transaction(pending.get_json()["transaction"])
        still = client.post("/api/send", json=BODY, headers=signature)
        assert still.status_code == 202
        services.clock = lambda: parsed.valid_before + EXPIRY_MARGIN_SECONDS + 1.0
        final = client.post("/api/send", json=BODY, headers=signature)
    finally:
        chain.set_automine(True)
    assert final.status_code == 402, final.get_data(as_text=True)
    assert final.get_json()["error"] == "payment_settlement_failed"
    assert final.get_json()["details"]["reason"] == "expired"
    assert chain.usdc_balance(payer.address) == 10_000_000
    assert services.ledger.outbox_messages() == []


def test_a_stop_after_the_payment_means_no_sms_and_a_refund(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet
) -> None:
    """The settlement waits unconfirmed (202); meanwhile the recipient replies STOP, its
    report handled by the relay (any process). When the settlement is mined the repair
    reads the registry again before the hand-over: no batch is posted to Sinch, and the
    payer is refunded."""
    refunder = new_wallet(chain, 1_000_000)
    chain.set_eth_balance(refunder.address, 10**18)
    with FakeSinch(plan_id=SINCH_PLAN, token=SINCH_TOKEN) as fake:
        settings = paid_settings(
            **sinch_overrides(fake.base_url),
            refund_private_key=refunder.key,
            settlement_timeout_seconds=0.3,
        )
        app = create_app(services=build_services(settings))
        services, client = services_of(app), app.test_client()
        head = client.post("/api/send", json=BODY).headers["PAYMENT-REQUIRED"]
        signature = {"PAYMENT-SIGNATURE": pay(head, payer.key)}
        chain.set_automine(False)
        try:
            pending = client.post("/api/send", json=BODY, headers=signature)
            assert pending.status_code == 202, pending.get_data(as_text=True)
            stop = {"type": "mo_text", "from": BODY["to"].lstrip("+"), "to": "1", "body": "STOP"}
            hook = client.post("/webhooks/sinch/callback-secret-123", json=stop)
            assert hook.status_code < 300, hook.get_data(as_text=True)
        finally:
            chain.set_automine(True)
        chain.mine()
        (row,) = services.ledger.list_payments()
        assert reconcile(services, force=True)[row.id] in ("dispatch_failed", "refunded")
        wait_for(lambda: reconcile(services, force=True).get(row.id, "refunded") == "refunded")
        assert fake.batches == []
    assert chain.usdc_balance(payer.address) == 10_000_000
    answer = client.post("/api/send", json=BODY, headers=signature)
    assert answer.status_code == 502 and answer.get_json()["refund"]["state"] == "confirmed"


def test_relay_dev_runs_the_reconciler() -> None:
    """`relay dev` finishes a payment a crash left behind without any request."""
    with DevStack.start(port=0, say=lambda _: None) as stack:
        stack.demo(lambda _: None)
        services = stack.services
        with services.ledger.begin() as conn:
            conn.execute(delete(outbox))
            conn.execute(delete(messages))
        payment_id = rewind(services, "settled", message_id=None, body="Reconcile me")
        wait_for(lambda: len(services.ledger.outbox_messages()) == 1)
        wait_for(lambda: state_of(services, payment_id) == "dispatched")


def test_a_payment_finished_before_answers_were_stored_gets_an_answer(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet
) -> None:
    """Rows of the previous release reached `dispatched` without a stored answer: a replay
    is told what happened (200 with the message), never a 500."""
    app = create_app(services=build_services(paid_settings()))
    services = services_of(app)
    first, signature = paid_send(app, payer.key)
    with services.ledger.begin() as conn:
        conn.execute(
            update(payments).values(
                response_status=None, response_body=None, lease_until=None, lease_holder=None
            )
        )
    answer = replay(app, signature)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert answer.get_json()["message_id"] == first["message_id"]
    assert answer.get_json()["transaction"] == first["transaction"]


def test_a_crash_while_recording_the_hand_over_leaves_nothing_half_written(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet, monkeypatch: Any
) -> None:
    """The message, its statuses and the payment's answer are one write after the SMS is
    handed over: a crash inside it stores none of them, the payment stays dispatching, and
    the reconciler finds the message at the provider (no second SMS) and finishes it."""
    app = create_app(services=build_services(paid_settings()))
    services, client = services_of(app), app.test_client()
    move = relay.ledger._move

    def crash_at_the_answer(conn: Any, payment_id: str, *args: Any) -> bool:
        if args[1] == "dispatched":
            raise RuntimeError("the process died here")
        return move(conn, payment_id, *args)

    monkeypatch.setattr(relay.ledger, "_move", crash_at_the_answer)
    head = client.post("/api/send", json=BODY).headers["PAYMENT-REQUIRED"]
    signature = pay(head, payer.key)
    crashed = client.post("/api/send", json=BODY, headers={"PAYMENT-SIGNATURE": signature})
    assert crashed.status_code == 500
    monkeypatch.undo()
    (row,) = services.ledger.list_payments()
    assert row.state == "dispatching" and row.response_status is None and row.message_id is None
    assert services.ledger.list_messages() == []
    (sms,) = services.ledger.outbox_messages()  # handed over before the crash
    assert reconcile(services) == {row.id: "dispatched"}
    assert len(services.ledger.outbox_messages()) == 1
    (message,) = services.ledger.list_messages()
    assert message.message_id == sms["message_id"] and message.status == "delivered"
    answer = replay(app, signature)
    assert answer.status_code == 200
    assert answer.get_json()["message_id"] == sms["message_id"]
    assert chain.usdc_balance(payer.address) == 10_000_000 - PRICE


def test_a_payment_taken_over_while_it_settled_keeps_its_settlement_for_the_new_holder(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet, monkeypatch: Any
) -> None:
    """A forced repair takes the payment while its transfer is being mined: the request
    records the settlement (settled, not dispatching: the SMS is no longer its to send) and
    stops; the new holder sends the SMS once."""
    app = create_app(services=build_services(paid_settings()))
    services, holders = services_of(app), []

    def taken(row: PaymentRecord, _settlement: Any) -> None:
        holders.append(services.ledger.take(row.id, services.clock(), 60.0, force=True))

    stopped, signature = paid_after_each_settlement(app, payer.key, monkeypatch, taken)
    assert stopped.status_code == 409, stopped.get_data(as_text=True)
    (row,) = services.ledger.list_payments()
    assert row.state == "settled" and row.tx_hash and row.log_index is not None
    assert services.ledger.outbox_messages() == []
    services.ledger.release(row.id, holders[0])  # the repair ends its turn
    assert reconcile(services) == {row.id: "dispatched"}
    assert len(services.ledger.outbox_messages()) == 1
    assert replay(app, signature).status_code == 200
    assert chain.usdc_balance(payer.address) == 10_000_000 - PRICE


def test_the_holder_goes_on_when_a_worker_whose_lease_ran_out_recorded_the_settlement(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet, monkeypatch: Any
) -> None:
    """A worker that lost its lease records the settlement (settled, no holder) just before
    the holder finds it too: the holder still moves the payment on and sends the SMS."""
    app = create_app(services=build_services(paid_settings()))
    services = services_of(app)

    def recorded_by_a_stale_worker(row: PaymentRecord, settlement: Any) -> None:
        paid = {"tx_hash": settlement.transaction, "log_index": settlement.log_index}
        assert services.ledger.transition(row.id, ("settling",), "settled", 2.0, **paid)

    answer, _ = paid_after_each_settlement(app, payer.key, monkeypatch, recorded_by_a_stale_worker)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    (row,) = services.ledger.list_payments()
    assert row.state == "dispatched" and len(services.ledger.outbox_messages()) == 1


def test_an_answer_stored_before_the_end_keeps_the_lease(
    paid_settings: Callable[..., Settings],
) -> None:
    """A refund not yet confirmed stores its answer and stays dispatch_failed: the lease
    stays with its holder; the final move gives it up."""
    services = build_services(paid_settings())
    row = payment(state="dispatch_failed", lease_holder="refunder", lease_until=9e9)
    services.ledger.claim_payment(row)
    answer = Outcome(502, {"error": "sinch_send_failed_after_payment"}, {})
    finish(services, row.id, (P.DISPATCH_FAILED,), P.DISPATCH_FAILED, answer)
    kept = services.ledger.payment(row.id)
    assert kept is not None and kept.response_status == 502
    assert kept.lease_holder == "refunder" and kept.lease_until == 9e9
    finish(services, row.id, (P.DISPATCH_FAILED,), P.REFUNDED, answer)
    done = services.ledger.payment(row.id)
    assert done is not None and done.state == "refunded"
    assert done.lease_holder is None and done.lease_until is None


def paid_after_each_settlement(
    app: Flask, key: str, monkeypatch: Any, then: Callable[[PaymentRecord, Any], None]
) -> tuple[Any, str]:
    """A paid send whose settlement is followed at once by ``then(payment, settlement)``
    (what another process does meanwhile): its answer and its payment header."""
    services, client = services_of(app), app.test_client()
    settle = services.payments.settle

    def settled_then(*args: Any, **kwargs: Any) -> Any:
        settlement = settle(*args, **kwargs)
        (row,) = services.ledger.list_payments()
        then(row, settlement)
        return settlement

    monkeypatch.setattr(services.payments, "settle", settled_then)
    head = client.post("/api/send", json=BODY).headers["PAYMENT-REQUIRED"]
    signature = pay(head, key)
    answer = client.post("/api/send", json=BODY, headers={"PAYMENT-SIGNATURE": signature})
    monkeypatch.undo()
    return answer, signature


def test_a_transfer_that_paid_another_payment_buys_no_second_sms(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet, monkeypatch: Any
) -> None:
    """A second payment whose settlement comes back as the transfer that already paid the
    first (what a copy of one payment or a replayed batch would try to pass off): the move
    to dispatching meets the (transaction, log) already credited, and the answer is a 402
    transfer_already_credited; no second SMS, the second payment failed, its payer charged
    nothing."""
    app = create_app(services=build_services(paid_settings()))
    services = services_of(app)
    paid_send(app, payer.key)
    (first,) = services.ledger.list_payments()
    other = new_wallet(chain, 10_000_000)

    def the_first_transfer(*_: Any, **__: Any) -> Any:
        assert first.tx_hash is not None and first.log_index is not None
        return Settlement(first.tx_hash, first.log_index, other.address, "", None)

    monkeypatch.setattr(services.payments, "settle", the_first_transfer)
    client, body = app.test_client(), {**BODY, "message": "A copy of the first"}
    head = client.post("/api/send", json=body).headers["PAYMENT-REQUIRED"]
    answer = client.post(
        "/api/send", json=body, headers={"PAYMENT-SIGNATURE": pay(head, other.key)}
    )
    assert answer.status_code == 402, answer.get_data(as_text=True)
    assert answer.get_json()["details"]["reason"] == "transfer_already_credited"
    second = [p for p in services.ledger.list_payments() if p.id != first.id]
    assert [p.state for p in second] == ["settle_failed"]
    assert len(services.ledger.outbox_messages()) == 1
    assert chain.usdc_balance(other.address) == 10_000_000
