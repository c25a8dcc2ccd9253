"""What a paid send costs, counted on a real anvil chain: receipts watched by one thread per
process, the chain asked each thing once (the calls reaching it through an RPC proxy), and
the ledger written only where a step needs it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import pytest
from eth_account import Account
from flask import Flask
from sqlalchemy import event, update
from web3 import Web3
from web3.exceptions import TimeExhausted

import relay.facilitator
from relay.chain import ReceiptWatcher, _Waiter
from relay.dev.chain import DevChain
from relay.flows.leases import lease_seconds
from relay.schema import nonce_reservations
from relay.settings import Settings
from relay.sinch import SinchSender
from tests.conftest import SINCH_PLAN, SINCH_TOKEN, Wallet, new_wallet, services_of, sinch_overrides
from tests.fake_sinch import FakeSinch
from tests.rpc_proxy import RpcProxy
from tests.test_send import BODY, make_app, paid, signed_headers, taken_over_after_claim

WAITERS = 12
#: transferWithAuthorization, with (v, r, s) and with one signature argument.
TRANSFER_SELECTORS = tuple(
    Web3.keccak(text=f"transferWithAuthorization({args})")[:4].hex()
    for args in (
        "address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32",
        "address,address,uint256,uint256,uint256,bytes32,bytes",
    )
)


@pytest.fixture
def proxy(chain: DevChain) -> Iterator[RpcProxy]:
    with RpcProxy(chain.rpc_url) as served:
        yield served


@pytest.fixture
def proxied(paid_settings: Callable[..., Settings], proxy: RpcProxy) -> Iterator[Flask]:
    """A paid app whose chain calls go through the counting proxy; its payments closed after."""
    app = make_app(paid_settings(rpc_url=proxy.url))
    yield app
    services_of(app).payments.close()


def pending_transfers(chain: DevChain, count: int) -> list[str]:
    """``count`` ETH transfers from a dev account, sent while automine is off."""
    sender = chain.accounts[5].address
    return [
        chain.w3.eth.send_transaction(
            {"from": sender, "to": chain.accounts[6].address, "value": 1 + n}
        ).to_0x_hex()
        for n in range(count)
    ]


def watcher_threads() -> int:
    return sum(1 for thread in threading.enumerate() if thread.name == "receipts")


def test_one_watcher_waits_for_every_receipt(chain: DevChain, proxy: RpcProxy) -> None:
    watcher = ReceiptWatcher(proxy.url)
    chain.set_automine(False)
    try:
        transactions = pending_transfers(chain, WAITERS)
        with ThreadPoolExecutor(WAITERS) as pool:
            waits = [pool.submit(watcher.wait, tx, 30) for tx in transactions]
            time.sleep(0.8)  # three receipt polls each, were they polling on their own
            assert watcher_threads() == 1
            asked = proxy.count("eth_getTransactionReceipt")
            # Each asked once at once, and once more on the first height the watcher read.
            assert asked <= 2 * WAITERS
            chain.mine()
            receipts = [wait.result(timeout=5) for wait in waits]
    finally:
        chain.set_automine(True)
    assert [r["transactionHash"].to_0x_hex() for r in receipts] == transactions
    assert proxy.count("eth_getTransactionReceipt") <= 3 * WAITERS
    deadline = time.monotonic() + 2
    while watcher_threads() and time.monotonic() < deadline:  # nobody waits: it stops
        time.sleep(0.05)
    assert watcher_threads() == 0


def test_a_receipt_that_never_comes_times_out(chain: DevChain, proxy: RpcProxy) -> None:
    watcher = ReceiptWatcher(proxy.url)
    chain.set_automine(False)
    try:
        (transaction,) = pending_transfers(chain, 1)
        started = time.monotonic()
        with pytest.raises(TimeExhausted):
            watcher.wait(transaction, 0.4)
        assert 0.4 <= time.monotonic() - started < 2
    finally:
        chain.drop_all_transactions()
        chain.set_automine(True)


def test_a_node_that_goes_away_is_logged_once_per_outage(
    chain: DevChain, proxy: RpcProxy, caplog: pytest.LogCaptureFixture
) -> None:
    watcher = ReceiptWatcher(proxy.url, poll_seconds=0.02)
    chain.set_automine(False)
    try:
        (transaction,) = pending_transfers(chain, 1)
        with ThreadPoolExecutor(1) as pool:
            wait = pool.submit(watcher.wait, transaction, 1.5)
            time.sleep(0.2)
            proxy.down = True  # the node goes away while the receipt is awaited
            with pytest.raises(TimeExhausted):
                wait.result(timeout=10)
    finally:
        chain.drop_all_transactions()
        chain.set_automine(True)
    failures = [r for r in caplog.records if "receipt watch failed" in r.getMessage()]
    assert len(failures) == 1


def test_a_blip_just_after_broadcast_is_watched_through(chain: DevChain, proxy: RpcProxy) -> None:
    watcher = ReceiptWatcher(proxy.url)
    chain.set_automine(False)
    try:
        (transaction,) = pending_transfers(chain, 1)
        proxy.fail_next = 1  # the first look, just after broadcast, meets a 503
        with ThreadPoolExecutor(1) as pool:
            wait = pool.submit(watcher.wait, transaction, 10)
            time.sleep(0.2)
            chain.mine()
            assert wait.result(timeout=10)["transactionHash"].to_0x_hex() == transaction
    finally:
        chain.set_automine(True)


def test_a_receipt_found_is_kept_whatever_a_lagging_node_says(
    chain: DevChain, proxy: RpcProxy
) -> None:
    watcher = ReceiptWatcher(proxy.url)
    (transaction,) = pending_transfers(chain, 1)  # automine: mined at once
    waiter = _Waiter(transaction)
    watcher._look([waiter])
    assert waiter.done.is_set() and waiter.receipt is not None
    proxy.lagging.add("eth_getTransactionReceipt")  # another node behind the balancer
    watcher._look([waiter])  # a poll before the waiting thread woke up
    assert waiter.receipt is not None


def simulations(proxy: RpcProxy) -> int:
    """eth_calls of transferWithAuthorization: the transfer simulated before broadcast."""
    return sum(
        1
        for method, params in proxy.calls
        if method == "eth_call" and _data(params).removeprefix("0x")[:8] in TRANSFER_SELECTORS
    )


def _data(params: list[Any]) -> str:
    call = params[0] if params and isinstance(params[0], dict) else {}
    return str(call.get("data") or call.get("input") or "")


def test_a_paid_send_asks_the_chain_each_thing_once(
    proxied: Flask, proxy: RpcProxy, payer: Wallet, chain: DevChain
) -> None:
    """Verify simulates the transfer and reads the payer's code; settle reuses both; the
    chain id is asked once per client, not per call; what the broadcast needs to know comes
    in one batch."""
    client = proxied.test_client()
    assert paid(client, BODY, payer.key).status_code == 200
    proxy.forget()
    other = new_wallet(chain, 10_000_000)
    answer = paid(client, {**BODY, "message": "Your parcel is on its way"}, other.key)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert simulations(proxy) == 1
    assert proxy.count("eth_getCode") == 1
    assert proxy.count("eth_chainId") == 0
    assert proxy.count("eth_sendRawTransaction") == 1
    # getCode, the simulation, one batch (gas price and two nonce counts), the broadcast
    # and the receipt; on a loaded machine the watcher may also ask the height again and
    # look once more for a receipt the node had not yet mined (those vary with timing).
    assert proxy.count("eth_getTransactionCount") == 2
    receipts = proxy.count("eth_getTransactionReceipt")
    assert receipts >= 1
    assert proxy.requests - proxy.count("eth_blockNumber") - (receipts - 1) == 5


def test_a_node_that_takes_no_batches_is_asked_one_call_at_a_time(
    paid_settings: Callable[..., Settings], proxy: RpcProxy, payer: Wallet, chain: DevChain
) -> None:
    proxy.refuses_batches = True
    app = make_app(paid_settings(rpc_url=proxy.url))
    client = app.test_client()
    assert paid(client, BODY, payer.key).status_code == 200
    other = new_wallet(chain, 10_000_000)
    answer = paid(client, {**BODY, "message": "Your parcel is on its way"}, other.key)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert proxy.count("eth_sendRawTransaction") == 2
    assert proxy.batches == 1  # refused once, then not asked again
    services_of(app).payments.close()


def test_a_paid_send_writes_the_ledger_six_times(
    paid_settings: Callable[..., Settings], payer: Wallet, chain: DevChain
) -> None:
    """Before the broadcast: the claim, the nonce, the hash with the lease renewed; after
    it: the settlement with the move to dispatching, the development outbox's own row, and
    the message with its statuses, the answer and the lease given up. A nonce reserved a
    moment ago is not written again before the broadcast, and the lease given up with the
    answer is not given up again."""
    app = make_app(paid_settings())
    assert paid(app.test_client(), BODY, payer.key).status_code == 200
    assert commits_of_a_paid_send(app, chain) == 6


def commits_of_a_paid_send(app: Flask, chain: DevChain) -> int:
    """The ledger's commits while a new payer makes one paid send."""
    commits: list[int] = []
    event.listen(services_of(app).ledger.engine, "commit", lambda _conn: commits.append(1))
    other = new_wallet(chain, 10_000_000)
    body = {**BODY, "message": "Your parcel is on its way"}
    answer = paid(app.test_client(), body, other.key)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return len(commits)


def test_a_payment_taken_over_after_its_claim_is_never_broadcast_from_here(
    proxied: Flask,
    proxy: RpcProxy,
    payer: Wallet,
    chain: DevChain,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An operator's forced repair takes the payment a moment after the request claimed it:
    the request's lease is checked where the transaction's hash is recorded, so it stops
    there: nothing broadcast, and the nonce it had reserved given back (the next settlement
    takes it, and is mined: no gap)."""
    services, taken = services_of(proxied), taken_over_after_claim(proxied, monkeypatch)
    ledger = services.ledger
    client = proxied.test_client()
    settler = Account.from_key(services.settings.settler_private_key).address
    nonce = chain.w3.eth.get_transaction_count(settler)
    answer = paid(client, BODY, payer.key)
    assert answer.status_code == 409, answer.get_data(as_text=True)
    assert answer.get_json()["error"] == "request_in_progress"
    assert proxy.count("eth_sendRawTransaction") == 0
    stopped = ledger.payment(taken[0])
    assert stopped is not None and stopped.state == "settling" and stopped.tx_hash is None
    monkeypatch.undo()
    other = new_wallet(chain, 10_000_000)
    answer = paid(client, {**BODY, "message": "Your parcel is on its way"}, other.key)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    (settled,) = [p for p in ledger.list_payments() if p.state == "dispatched"]
    assert settled.tx_hash is not None
    assert chain.w3.eth.get_transaction(settled.tx_hash)["nonce"] == nonce


def test_a_nonce_taken_over_before_the_broadcast_is_not_broadcast_from_here(
    proxied: Flask,
    proxy: RpcProxy,
    payer: Wallet,
    chain: DevChain,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The settler stalled past NONCE_GAP_SECONDS between reserving its nonce and
    broadcasting, and another process took the nonce over: nothing is broadcast with it
    from here; the payment waits (202) and its retry settles with a nonce of its own."""
    ledger = services_of(proxied).ledger
    reserve = ledger.reserve_nonce

    def reserved_then_taken_over(address: str, pending: int, latest: int, now: float) -> int:
        nonce = reserve(address, pending, latest, now)
        with ledger.begin() as conn:  # what another process's retake stamps
            conn.execute(update(nonce_reservations).values(reserved_at=now + 20.0))
        return nonce

    monkeypatch.setattr(ledger, "reserve_nonce", reserved_then_taken_over)
    monkeypatch.setattr(relay.facilitator, "FRESH_RESERVATION_SECONDS", -1.0)
    client = proxied.test_client()
    signature = signed_headers(client, BODY, payer.key)
    waiting = client.post("/api/send", json=BODY, headers=signature)
    assert waiting.status_code == 202, waiting.get_data(as_text=True)
    assert proxy.count("eth_sendRawTransaction") == 0
    monkeypatch.undo()
    # The process that took the nonce over broadcasts with it.
    settler = Account.from_key(services_of(proxied).settings.settler_private_key)
    nonce = chain.w3.eth.get_transaction_count(settler.address, "pending")
    transfer = {"to": settler.address, "value": 0, "gas": 21_000, "nonce": nonce}
    tx = {**transfer, "gasPrice": chain.w3.eth.gas_price, "chainId": chain.w3.eth.chain_id}
    chain.w3.eth.send_raw_transaction(settler.sign_transaction(tx).raw_transaction)
    settled = client.post("/api/send", json=BODY, headers=signature)
    assert settled.status_code == 200, settled.get_data(as_text=True)
    assert proxy.count("eth_sendRawTransaction") == 1


def test_a_paid_send_through_sinch_writes_the_ledger_five_times(
    paid_settings: Callable[..., Settings], payer: Wallet, chain: DevChain
) -> None:
    """Claim, nonce, hash with the lease renewed, the settlement with the move to
    dispatching (the lease renewed again: no renewal of its own before Sinch's first
    attempt), and the hand-over's record; the lease is a full one when Sinch is called."""
    with FakeSinch(plan_id=SINCH_PLAN, token=SINCH_TOKEN) as fake:
        app = make_app(paid_settings(**sinch_overrides(fake.base_url)))
        services = services_of(app)
        client = app.test_client()
        assert paid(client, BODY, payer.key).status_code == 200
        send, leases = services.sms.send, []

        def send_and_look(to: str, body: str, reference: str, **kwargs: Any) -> Any:
            row = services.ledger.payment(reference)
            assert row is not None and row.lease_until is not None
            leases.append(row.lease_until - services.clock())
            return send(to, body, reference, **kwargs)

        services.sms.send = send_and_look  # type: ignore[method-assign]
        assert commits_of_a_paid_send(app, chain) == 5
    assert leases and leases[0] > lease_seconds(services) - 5


def test_a_payment_taken_over_between_sinch_attempts_is_not_posted_again(
    paid_settings: Callable[..., Settings], payer: Wallet
) -> None:
    """Sinch refuses the first attempt (429) and, while the sender waits, an operator's
    forced repair takes the payment over: the renewal before the next attempt fails, so
    nothing more is posted from here; the answer is 409, the payment left dispatching for
    its new holder."""
    with FakeSinch(plan_id=SINCH_PLAN, token=SINCH_TOKEN) as fake:
        app = make_app(paid_settings(**sinch_overrides(fake.base_url)))
        services = services_of(app)

        def taken_over_while_waiting(_seconds: float) -> None:
            (row,) = services.ledger.list_payments()
            assert services.ledger.take(row.id, services.clock(), 60.0, force=True)

        cast(SinchSender, services.sms).close()
        services.sms = SinchSender(services.settings.sinch(), sleep=taken_over_while_waiting)
        fake.script({"status": 429, "retry_after": 1})
        answer = paid(app.test_client(), BODY, payer.key)
        assert answer.status_code == 409, answer.get_data(as_text=True)
        assert answer.get_json()["error"] == "request_in_progress"
        assert fake.create_attempts() == 1
        (row,) = services.ledger.list_payments()
        assert row.state == "dispatching"
        cast(SinchSender, services.sms).close()
        services.payments.close()
