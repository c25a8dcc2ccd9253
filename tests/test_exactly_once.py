"""Exactly one SMS or one refund per payment, whatever clients, processes or the chain do.

Runs `relay serve` processes against a real local chain, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient
from sqlalchemy import update

from relay.app import create_app
from relay.dev.chain import DevChain
from relay.ledger import Ledger
from relay.schema import messages, outbox, payments
from relay.services import build_services
from relay.settings import Settings, load_settings
from tests.chain_attacks import wait_for
from tests.conftest import SINCH_PLAN, SINCH_TOKEN, Wallet, new_wallet, sinch_overrides
from tests.fake_sinch import FakeSinch
from tests.processes import RelayProcess, procfile, relay_env
from tests.x402_helpers import pay

US = "+13012576365"
PRICE = 50_000


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


def test_copies_of_one_quoted_payment_never_see_quote_already_used(
    cluster: Cluster, chain: DevChain, payer: Wallet
) -> None:
    """Twenty copies of one payment for a quote, across processes: every copy gets the
    answer or request_in_progress, never quote_already_used for its own payment."""
    quote = requests.post(
        cluster.relays[0].url + "/api/quote", json={"message": "Copies", "to": US}, timeout=30
    ).json()
    body = {"message": "Copies", "to": US, "quote_token": quote["quote_token"]}
    signature = pay(challenge(cluster.url(0), body), payer.key)
    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(lambda i: post(cluster.url(i), body, signature), range(20)))
    codes = [(a.status_code, a.json().get("error")) for a in answers]
    assert all(code in {(200, None), (409, "request_in_progress")} for code in codes), codes
    final = post(cluster.url(1), body, signature)
    assert final.status_code == 200, final.text
    assert len(cluster.ledger.outbox_messages()) == 1
    assert chain.usdc_balance(payer.address) == 10_000_000 - PRICE


def test_refunds_from_two_processes_at_once_all_mine(
    chain: DevChain, tmp_path: Path, pg_url: str
) -> None:
    """Sinch refuses everything; ten paid sends at once on two processes sharing
    PostgreSQL: ten refunds mined (their nonces reserved through the database), every
    payer whole."""
    refunder = new_wallet(chain, 10 * PRICE)
    chain.set_eth_balance(refunder.address, 10**18)
    with FakeSinch(plan_id=SINCH_PLAN, token=SINCH_TOKEN) as fake:
        fake.script(*[{"status": 400, "code": "syntax_invalid_parameter_format"}] * 10)
        sinch = {k.upper(): str(v) for k, v in sinch_overrides(fake.base_url).items()}
        env = relay_env(chain, pg_url, REFUND_PRIVATE_KEY=refunder.key, **sinch)
        payers = [new_wallet(chain, 1_000_000) for _ in range(10)]
        with Cluster(env, tmp_path, 2) as cluster:
            bodies = [{"message": f"Refund me {i}", "to": US} for i in range(10)]
            signatures = [
                pay(challenge(cluster.url(i), b), p.key)
                for i, (b, p) in enumerate(zip(bodies, payers, strict=True))
            ]
            with ThreadPoolExecutor(max_workers=10) as pool:
                answers = list(
                    pool.map(lambda i: post(cluster.url(i), bodies[i], signatures[i]), range(10))
                )
            assert [a.status_code for a in answers] == [502] * 10, [a.text for a in answers]
            wait_for(lambda: all(chain.usdc_balance(p.address) == 1_000_000 for p in payers))
            refunds = cluster.ledger.list_refunds()
    assert len(refunds) == 10
    assert {r.state for r in refunds} == {"confirmed"}
    assert len({r.nonce for r in refunds}) == 10
    assert chain.usdc_balance(refunder.address) == 0


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


def test_crash_while_settling_is_finished_by_a_running_worker(
    chain: DevChain, payer: Wallet, tmp_path: Path
) -> None:
    """A process dies right after broadcasting a settlement. Its hash is in the ledger
    already, and the reconciler of another process that was running all along finishes the
    payment once the lease runs out, with no replay; a replay then gets the stored 200."""
    env = relay_env(
        chain,
        f"sqlite:///{tmp_path / 'relay.db'}",
        SETTLEMENT_TIMEOUT_SECONDS="1",
        RECONCILE_AFTER_SECONDS="7",
        WORKER_INTERVAL_SECONDS="1",
    )
    body = {"message": "Survives a crash", "to": US}
    ledger = Ledger.from_url(env["DATABASE_URL"])
    first = RelayProcess(env, tmp_path / "first.log").start()
    second = RelayProcess(env, tmp_path / "second.log").start()
    try:
        signature = pay(challenge(first.url + "/api/send", body), payer.key)
        nonce_before = settler_nonce(chain)
        chain.set_automine(False)
        thread = threading.Thread(target=_swallow, args=(first.url + "/api/send", body, signature))
        thread.start()
        wait_for(
            lambda: (
                chain.w3.eth.get_transaction_count(chain.accounts[0].address, "pending")
                > nonce_before
            )
        )
        first.kill()
        thread.join(10)
        (row,) = ledger.list_payments()
        assert row.tx_hash is not None  # stored before the broadcast
        chain.mine()
        chain.set_automine(True)
        wait_for(lambda: len(ledger.outbox_messages()) == 1)
        wait_for(lambda: ledger.list_payments()[0].state == "dispatched")
        replay = post(second.url + "/api/send", body, signature)
        assert replay.status_code == 200, replay.text
    finally:
        first.stop()
        second.stop()
        chain.set_automine(True)
    assert ledger.outbox_messages()[0]["message_id"] == replay.json()["message_id"]
    assert replay.json()["transaction"] == row.tx_hash
    assert chain.usdc_balance(payer.address) == 10_000_000 - PRICE
    assert settler_nonce(chain) == nonce_before + 1
    ledger.engine.dispose()


def _swallow(url: str, body: dict[str, Any], signature: str) -> None:
    with contextlib.suppress(requests.RequestException):
        post(url, body, signature)


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


def test_the_procfile_worker_finishes_a_payment_a_crash_left(
    chain: DevChain, payer: Wallet, tmp_path: Path
) -> None:
    """The Procfile's `worker` line, run as written: a payment left settled but not
    dispatched (the process died in between) is dispatched without any request."""
    env = relay_env(chain, f"sqlite:///{tmp_path / 'relay.db'}", WORKER_INTERVAL_SECONDS="1")
    settings = load_settings(env, env_file=None)
    Ledger.upgrade_database(settings.database_url)  # the Procfile's release step
    app = create_app(services=build_services(settings))
    client = app.test_client()
    body = {"message": "Worker finishes me", "to": US}
    head = client.post("/api/send", json=body).headers["PAYMENT-REQUIRED"]
    paid = {"PAYMENT-SIGNATURE": pay(head, payer.key)}
    first = client.post("/api/send", json=body, headers=paid)
    assert first.status_code == 200, first.get_data(as_text=True)
    ledger = app.extensions["relay"].ledger
    with ledger.begin() as conn:
        conn.execute(messages.delete())
        conn.execute(outbox.delete())
        conn.execute(
            update(payments).values(
                state="settled",
                body=body["message"],
                response_status=None,
                lease_until=None,
                lease_holder=None,
            )
        )
    command = procfile("worker")
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    worker = subprocess.Popen(
        command, shell=True, cwd=tmp_path, env={**env, "PATH": path}, start_new_session=True
    )
    try:
        wait_for(lambda: len(ledger.outbox_messages()) == 1)
        wait_for(lambda: ledger.list_payments()[0].state == "dispatched")
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(10)
    replay = client.post("/api/send", json=body, headers=paid)
    assert replay.status_code == 200, replay.get_data(as_text=True)
    (sms,) = ledger.outbox_messages()
    assert replay.get_json()["message_id"] == sms["message_id"]
    assert chain.usdc_balance(payer.address) == 10_000_000 - PRICE
    assert sms["body"].startswith("Worker finishes me")
