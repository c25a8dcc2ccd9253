"""Many agents pay at once (SPEC §9): concurrent settlements land in the same block or the next.

Twenty payers paying at once on anvil with 1-second blocks all settle within two blocks,
with exactly twenty settler transactions and none reverted, against `relay serve` run as
the Procfile runs it (two workers sharing the settler's nonces through the database).
Settlements per block and latency in block times, side by side with sequential sends, are
measured by bench/settlements.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from eth_account import Account
from eth_typing import HexStr
from web3 import Web3

from relay.dev.chain import MINTER_ADDRESS, DevChain
from tests.conftest import Wallet
from tests.processes import RelayProcess
from tests.test_exactly_once import relay_env
from tests.x402_helpers import pay

MAX_BLOCK_SPREAD = 1
US = "+13012576365"
PAYERS = 20
BLOCK_TIME = 1.0
FUNDS = 1_000_000  # 1 USDC each
HTTP_TIMEOUT = 120  # generous: twenty requests on a 2-core machine


@pytest.fixture(scope="module")
def slow_chain() -> Iterator[DevChain]:
    """A dedicated anvil that mines a block every second (no automine)."""
    with DevChain.start(block_time=BLOCK_TIME) as dev:
        yield dev


def fund(chain: DevChain, count: int, atomic: int) -> list[Wallet]:
    """``count`` fresh wallets holding ``atomic`` USDC each, minted in one go (one or two
    blocks rather than a block per wallet)."""
    wallets = [Account.create() for _ in range(count)]
    chain.rpc("anvil_impersonateAccount", MINTER_ADDRESS)
    try:
        hashes = [
            chain.token.functions.mint(w.address, atomic).transact({"from": MINTER_ADDRESS})
            for w in wallets
        ]
    finally:
        chain.rpc("anvil_stopImpersonatingAccount", MINTER_ADDRESS)
    for tx_hash in hashes:
        receipt = chain.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=60)
        assert receipt["status"] == 1
    return [Wallet(w.address, w.key.hex()) for w in wallets]


def settler_nonce(chain: DevChain) -> int:
    return chain.w3.eth.get_transaction_count(chain.accounts[0].address, "latest")


def test_twenty_payers_at_once_settle_within_two_blocks(
    slow_chain: DevChain, tmp_path: Path
) -> None:
    chain = slow_chain
    env = relay_env(chain, f"sqlite:///{tmp_path / 'relay.db'}")
    payers = fund(chain, PAYERS, FUNDS)
    args = ("--workers", "2", "--threads", "16")  # the Procfile default: two workers
    with RelayProcess(env, tmp_path / "relay.log", args=args) as relay:
        url = relay.url + "/api/send"
        bodies = [{"message": f"Throughput test message {i}", "to": US} for i in range(PAYERS)]
        signatures, prices = [], []
        for body, payer in zip(bodies, payers, strict=True):
            challenge = requests.post(url, json=body, timeout=HTTP_TIMEOUT)
            assert challenge.status_code == 402, challenge.text
            prices.append(int(challenge.json()["details"]["amount_atomic"]))
            signatures.append(pay(challenge.headers["PAYMENT-REQUIRED"], payer.key))

        nonce_before = settler_nonce(chain)

        def paid(i: int) -> requests.Response:
            return requests.post(
                url,
                json=bodies[i],
                headers={"PAYMENT-SIGNATURE": signatures[i]},
                timeout=HTTP_TIMEOUT,
            )

        with ThreadPoolExecutor(max_workers=PAYERS) as pool:
            answers = list(pool.map(paid, range(PAYERS)))
        log = relay.log()

    latencies = sorted(round(a.elapsed.total_seconds(), 2) for a in answers)
    failures = [(i, a.status_code, a.text) for i, a in enumerate(answers) if a.status_code != 200]
    assert not failures, f"{failures}\n--- relay log ---\n{log}"
    for payer, price in zip(payers, prices, strict=True):
        assert chain.usdc_balance(payer.address) == FUNDS - price
    assert settler_nonce(chain) == nonce_before + PAYERS, "reverted or replaced transactions"

    transactions = [a.json()["transaction"] for a in answers]
    assert len(set(transactions)) == PAYERS
    receipts: list[Any] = [chain.w3.eth.get_transaction_receipt(HexStr(tx)) for tx in transactions]
    assert all(r["status"] == 1 for r in receipts)
    settler = Web3.to_checksum_address(chain.accounts[0].address)
    assert all(Web3.to_checksum_address(r["from"]) == settler for r in receipts)
    blocks = sorted(r["blockNumber"] for r in receipts)
    per_block = {b: blocks.count(b) for b in blocks}
    assert blocks[-1] - blocks[0] <= MAX_BLOCK_SPREAD, (
        f"settlements spread over blocks {per_block}; request latencies (s) {latencies}"
    )
