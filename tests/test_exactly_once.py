"""Exactly one SMS or one refund per payment, whatever clients, processes or the chain do.

Runs `relay serve` processes against a real local chain, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient

from relay.app import create_app
from relay.devchain import DevChain
from relay.ledger import Ledger
from relay.services import build_services
from relay.settings import Settings
from tests.conftest import Wallet, new_wallet
from tests.processes import RelayProcess
from tests.x402_helpers import pay

US = "+13012576365"
PRICE = 50_000


def relay_env(chain: DevChain, database_url: str, **more: str) -> dict[str, str]:
    env = {
        "QUOTE_SECRET": "exactly-once-secret-0123456789",
        "PAY_TO_ADDRESS": new_wallet(chain).address,
        "FACILITATOR": "local",
        "RPC_URL": chain.rpc_url,
        "SETTLER_PRIVATE_KEY": chain.accounts[0].private_key,
        "MODERATION_PROVIDER": "rules",
        "SMS_PROVIDER": "outbox",
        "DATABASE_URL": database_url,
        "QUOTE_RATE_LIMIT": "10000/minute",
    }
    env.update(more)
    return env


class Cluster:
    """One or more `relay serve` processes sharing one database."""

    def __init__(self, env: dict[str, str], tmp: Path, processes: int) -> None:
        self.env = env
        self.ledger = Ledger.from_url(env["DATABASE_URL"])
        self.ledger.upgrade()
        self.relays = [
            RelayProcess(env, tmp / f"relay{i}.log", args=("--threads", "32"))
            for i in range(processes)
        ]

    def __enter__(self) -> Cluster:
        for relay in self.relays:
            relay.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for relay in self.relays:
            relay.stop()
        self.ledger.engine.dispose()

    def url(self, i: int) -> str:
        return self.relays[i % len(self.relays)].url + "/api/send"


def challenge(url: str, body: dict[str, Any]) -> str:
    response = requests.post(url, json=body, timeout=30)
    assert response.status_code == 402, response.text
    return response.headers["PAYMENT-REQUIRED"]


def post(url: str, body: dict[str, Any], signature: str) -> requests.Response:
    return requests.post(url, json=body, headers={"PAYMENT-SIGNATURE": signature}, timeout=60)


def settler_nonce(chain: DevChain) -> int:
    return chain.w3.eth.get_transaction_count(chain.accounts[0].address)


BACKENDS = ["sqlite-1-process", "postgresql-2-processes"]


@pytest.fixture(params=BACKENDS)
def cluster(request: pytest.FixtureRequest, chain: DevChain, tmp_path: Path) -> Iterator[Cluster]:
    if request.param.startswith("sqlite"):
        url, processes = f"sqlite:///{tmp_path / 'relay.db'}", 1
    else:
        url, processes = request.getfixturevalue("pg_url"), 2
    with Cluster(relay_env(chain, url), tmp_path, processes) as running:
        yield running


def test_same_paid_request_twenty_times_at_once(
    cluster: Cluster, chain: DevChain, payer: Wallet
) -> None:
    body = {"message": "Twenty at once", "to": US}
    signature = pay(challenge(cluster.url(0), body), payer.key)
    nonce_before = settler_nonce(chain)
    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(lambda i: post(cluster.url(i), body, signature), range(20)))
    codes = [(a.status_code, a.json().get("error")) for a in answers]
    assert all(code in {(200, None), (409, "request_in_progress")} for code in codes), codes
    assert (200, None) in codes
    assert settler_nonce(chain) == nonce_before + 1
    assert len(cluster.ledger.outbox_messages()) == 1
    assert chain.usdc_balance(payer.address) == 10_000_000 - PRICE
    final = post(cluster.url(1), body, signature)
    ok = next(a for a in answers if a.status_code == 200)
    assert final.status_code == 200 and final.json() == ok.json()
    for answer in answers:
        if answer.status_code == 409:
            assert int(answer.headers["Retry-After"]) >= 1


def test_two_payers_one_quote(cluster: Cluster, chain: DevChain) -> None:
    quote = requests.post(
        cluster.relays[0].url + "/api/quote",
        json={"message": "Only one pays", "to": US},
        timeout=30,
    ).json()
    body = {"message": "Only one pays", "to": US, "quote_token": quote["quote_token"]}
    payers = [new_wallet(chain, 1_000_000), new_wallet(chain, 1_000_000)]
    head = challenge(cluster.url(0), body)
    signatures = [pay(head, p.key) for p in payers]
    nonce_before = settler_nonce(chain)
    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = list(pool.map(lambda i: post(cluster.url(i), body, signatures[i]), range(2)))
    codes = sorted(a.status_code for a in answers)
    assert codes == [200, 409], [a.text for a in answers]
    loser = next(i for i, a in enumerate(answers) if a.status_code == 409)
    assert answers[loser].json()["error"] == "quote_already_used"
    assert chain.usdc_balance(payers[loser].address) == 1_000_000
    assert chain.usdc_balance(payers[1 - loser].address) == 1_000_000 - PRICE
    assert settler_nonce(chain) == nonce_before + 1
    assert len(cluster.ledger.outbox_messages()) == 1


def test_crash_while_settlement_pending_is_finished_by_reconcile(
    chain: DevChain, payer: Wallet, tmp_path: Path
) -> None:
    env = relay_env(
        chain,
        f"sqlite:///{tmp_path / 'relay.db'}",
        SETTLEMENT_TIMEOUT_SECONDS="60",
        RECONCILE_AFTER_SECONDS="1",
    )
    body = {"message": "Survives a crash", "to": US}
    ledger = Ledger.from_url(env["DATABASE_URL"])
    first = RelayProcess(env, tmp_path / "first.log").start()
    try:
        signature = pay(challenge(first.url + "/api/send", body), payer.key)
        nonce_before = settler_nonce(chain)
        chain.set_automine(False)
        thread = threading.Thread(target=_swallow, args=(first.url + "/api/send", body, signature))
        thread.start()
        _wait_for(
            lambda: (
                chain.w3.eth.get_transaction_count(chain.accounts[0].address, "pending")
                > nonce_before
            )
        )
        first.kill()
        thread.join(10)
    finally:
        first.stop()
        chain.mine()
        chain.set_automine(True)
    assert ledger.outbox_messages() == []
    (row,) = ledger.list_payments()
    assert row["state"] == "settling"
    time.sleep(1.2)
    with RelayProcess(env, tmp_path / "second.log") as second:
        _wait_for(lambda: len(ledger.outbox_messages()) == 1)
        replay = post(second.url + "/api/send", body, signature)
        assert replay.status_code == 200, replay.text
    assert len(ledger.outbox_messages()) == 1
    assert ledger.outbox_messages()[0]["message_id"] == replay.json()["message_id"]
    assert chain.usdc_balance(payer.address) == 10_000_000 - PRICE
    assert settler_nonce(chain) == nonce_before + 1
    ledger.engine.dispose()


def _swallow(url: str, body: dict[str, Any], signature: str) -> None:
    with contextlib.suppress(requests.RequestException):
        post(url, body, signature)


def _wait_for(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def test_settlement_timeout_answers_202_then_200(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet
) -> None:
    app = create_app(services=build_services(paid_settings(settlement_timeout_seconds=0.5)))
    client: FlaskClient = app.test_client()
    body = {"message": "Slow chain", "to": US}
    head = client.post("/api/send", json=body).headers["PAYMENT-REQUIRED"]
    signature = {"PAYMENT-SIGNATURE": pay(head, payer.key)}
    chain.set_automine(False)
    try:
        pending = client.post("/api/send", json=body, headers=signature)
        again = client.post("/api/send", json=body, headers=signature)
        chain.mine()
    finally:
        chain.set_automine(True)
    assert pending.status_code == 202, pending.get_data(as_text=True)
    assert pending.get_json()["error"] == "settlement_pending"
    tx = pending.get_json()["transaction"]
    assert tx.startswith("0x")
    assert int(pending.headers["Retry-After"]) >= 1
    assert again.status_code == 202 and again.get_json()["transaction"] == tx
    final = client.post("/api/send", json=body, headers=signature)
    assert final.status_code == 200, final.get_data(as_text=True)
    assert final.get_json()["transaction"] == tx
    ledger = app.extensions["relay"].ledger
    assert len(ledger.outbox_messages()) == 1
    assert chain.usdc_balance(payer.address) == 10_000_000 - PRICE
