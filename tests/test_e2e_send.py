"""`relay serve` as a process against anvil, fake Gemini and fake Sinch, paid by three clients.

The clients: ours (``relay.client.RelayClient``: quote → 402 → pay), the stock PyPI ``x402``
requests adapter and the stock npm ``@x402/fetch`` (``tests/node/pay.mjs``, driven from here),
both unmodified and one-shot (no quote token). Each test checks the exact USDC movement on
the chain (payer down, payTo up by the price, in the settlement transaction's Transfer log)
and the one SMS the fake Sinch received.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from eth_account import Account
from web3 import Web3
from web3.logs import DISCARD
from x402 import x402ClientSync
from x402.http.clients.requests import x402_requests
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.exact import register_exact_evm_client

from relay.client import RelayClient
from relay.dev.chain import NETWORK, USDC_ADDRESS, DevChain
from relay.errors import PriceLimitExceeded
from tests.conftest import Wallet, new_wallet
from tests.fake_gemini import FAKE_API_KEY, FakeGemini
from tests.fake_sinch import FakeSinch
from tests.processes import REPO, RelayProcess

US = "+13012576365"
PASSWORD = "e2e-pay-password-0123"
SINCH_PLAN = "e2eplan0123456789abcdef"
SINCH_TOKEN = "e2e-sinch-token"
SINCH_FROM = "+12025550123"
OPT_OUT = "\nReply STOP to opt out"
FUNDS = 1_000_000  # 1 USDC per payer
# One GSM-7 segment ($0.05) + the fake Gemini's default usage (412 input, 144 output and
# 57 thinking tokens on gemini-2.5-flash at $0.30 / $2.50 per million = $0.000626).
FRESH_PRICE = 50_626
NODE_TIMEOUT = 120


@dataclass
class Stack:
    """The running service and what it talks to."""

    chain: DevChain
    gemini: FakeGemini
    sinch: FakeSinch
    relay: RelayProcess
    pay_to: str


@dataclass
class Snapshot:
    """The payer's and payTo's USDC and the fake Sinch's batch count at one moment."""

    payer: int
    pay_to: int
    batches: int


@dataclass
class Recorder:
    """Every response a requests.Session or an httpx.Client received: (method, path, status,
    response)."""

    seen: list[tuple[str, str, int, Any]] = field(default_factory=list)

    def __call__(self, response: Any, *args: Any, **kwargs: Any) -> None:
        path = urlsplit(str(response.request.url)).path
        self.seen.append((str(response.request.method), path, response.status_code, response))

    def calls(self) -> list[tuple[str, str, int]]:
        return [(method, path, status) for method, path, status, _ in self.seen]

    def json_of(self, path: str, status: int) -> dict[str, Any]:
        (found,) = [r for _, p, s, r in self.seen if (p, s) == (path, status)]
        data: dict[str, Any] = found.json()
        return data

    def headers_of(self, path: str, status: int) -> Mapping[str, str]:
        (found,) = [r for _, p, s, r in self.seen if (p, s) == (path, status)]
        return found.headers


@pytest.fixture(scope="module")
def stack(chain: DevChain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("e2e-send")
    pay_to = new_wallet(chain).address
    with FakeGemini() as gemini, FakeSinch(plan_id=SINCH_PLAN, token=SINCH_TOKEN) as sinch:
        env = {
            "QUOTE_SECRET": "e2e-send-quote-secret-0123456789",
            "PAY_TO_ADDRESS": pay_to,
            "FACILITATOR": "local",
            "RPC_URL": chain.rpc_url,
            "SETTLER_PRIVATE_KEY": chain.accounts[0].private_key,
            "MODERATION_PROVIDER": "gemini",
            "GEMINI_API_KEY": FAKE_API_KEY,
            "GEMINI_BASE_URL": gemini.url,
            "SMS_PROVIDER": "sinch",
            "SINCH_SERVICE_PLAN_ID": SINCH_PLAN,
            "SINCH_API_TOKEN": SINCH_TOKEN,
            "SINCH_FROM": SINCH_FROM,
            "SINCH_BASE_URL": sinch.base_url,
            "DATABASE_URL": f"sqlite:///{tmp / 'relay.db'}",
            "PAY_PASSWORD": PASSWORD,
            "QUOTE_RATE_LIMIT": "1000/minute",
        }
        relay = RelayProcess(env, tmp / "relay.log")
        try:
            relay.start(timeout=60)
            yield Stack(chain, gemini, sinch, relay, pay_to)
        finally:
            relay.stop()


def snapshot(stack: Stack, payer: Wallet) -> Snapshot:
    return Snapshot(
        stack.chain.usdc_balance(payer.address),
        stack.chain.usdc_balance(stack.pay_to),
        len(stack.sinch.batches),
    )


def atomic(usd: float | str) -> int:
    """A JSON dollar amount (written exactly from a Decimal) in USDC atomic units."""
    return int(Decimal(str(usd)) * 10**6)


def decode_header(value: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(base64.b64decode(value))
    return data


def moderation_calls(stack: Stack, text: str) -> int:
    """How many times the fake Gemini was asked about this text."""
    return sum(text in request.user_text for request in stack.gemini.requests)


def assert_node_payer_paid(
    stack: Stack, result: dict[str, Any], payer: Wallet, before: Snapshot, text: str
) -> None:
    """A payer's result (``payer``, ``body``, decoded ``paymentResponse``, as the node
    payers print it): settled by this payer, paid once at the fresh price, sent once."""
    assert result["payer"] == payer.address
    body = result["body"]
    settled = result["paymentResponse"]
    assert settled["success"] is True
    assert settled["transaction"] == body["transaction"]
    assert settled["network"] == NETWORK
    assert Web3.to_checksum_address(settled["payer"]) == payer.address
    assert_paid_and_sent(stack, payer, before, body, text, FRESH_PRICE)
    assert moderation_calls(stack, text) == 1


def assert_paid_and_sent(
    stack: Stack,
    payer: Wallet,
    before: Snapshot,
    body: dict[str, Any],
    text: str,
    price: int,
) -> None:
    """The exact USDC movement, its on-chain transfer, and the one SMS that left."""
    assert body["sent"] is True
    assert body["status"] == "queued"
    assert body["to"] == US
    assert body["segments"] == 1
    assert atomic(body["price_usd"]) == price
    assert body["paid_by"] == payer.address.lower()

    after = snapshot(stack, payer)
    assert after.payer == before.payer - price
    assert after.pay_to == before.pay_to + price

    receipt = stack.chain.w3.eth.get_transaction_receipt(body["transaction"])
    assert receipt["status"] == 1
    transfers = stack.chain.token.events.Transfer().process_receipt(receipt, errors=DISCARD)
    assert [(t["address"], dict(t["args"])) for t in transfers] == [
        (USDC_ADDRESS, {"from": payer.address, "to": stack.pay_to, "value": price})
    ]

    assert after.batches == before.batches + 1
    batch = stack.sinch.batches[-1]
    assert batch["body"] == text + OPT_OUT
    assert batch["to"] == [US]
    assert batch["from"] == SINCH_FROM
    assert batch["id"] == body["message_id"]


# Client 1: ours ----------------------------------------------------------------------------


def test_our_client_quotes_pays_and_sends(stack: Stack) -> None:
    payer = new_wallet(stack.chain, FUNDS)
    text = "Client one: your order 1001 has shipped"
    before = snapshot(stack, payer)
    recorder = Recorder()
    with httpx.Client(event_hooks={"response": [recorder]}) as http:
        client = RelayClient(stack.relay.url, payer.key, pay_password=PASSWORD, http=http)
        body = client.send(text, "(301) 257-6365", max_price_usd="0.10")

    assert recorder.calls() == [
        ("POST", "/api/quote", 200),
        ("POST", "/api/send", 402),
        ("POST", "/api/send", 200),
    ]
    quoted = recorder.json_of("/api/quote", 200)
    price = int(quoted["price_atomic"])
    assert price == FRESH_PRICE
    assert quoted["to_normalized"] == US
    challenge = decode_header(recorder.headers_of("/api/send", 402)["PAYMENT-REQUIRED"])
    assert [accept["amount"] for accept in challenge["accepts"]] == [str(price)]
    settled = decode_header(recorder.headers_of("/api/send", 200)["PAYMENT-RESPONSE"])
    assert settled["success"] is True
    assert settled["transaction"] == body["transaction"]
    assert settled["network"] == NETWORK

    assert_paid_and_sent(stack, payer, before, body, text, price)
    assert moderation_calls(stack, text) == 1


def test_our_client_refuses_a_price_above_its_cap(stack: Stack) -> None:
    payer = new_wallet(stack.chain, FUNDS)
    text = "Client one: your table for two is ready"
    before = snapshot(stack, payer)
    recorder = Recorder()
    with httpx.Client(event_hooks={"response": [recorder]}) as http:
        client = RelayClient(stack.relay.url, payer.key, pay_password=PASSWORD, http=http)
        with pytest.raises(PriceLimitExceeded) as raised:
            client.send(text, US, max_price_usd="0.05")

    assert raised.value.details == {"price_atomic": str(FRESH_PRICE), "max_atomic": "50000"}
    # Only the quote was asked for: no challenge fetched, nothing signed, nothing paid.
    assert recorder.calls() == [("POST", "/api/quote", 200)]
    assert snapshot(stack, payer) == before


# Client 2: the stock PyPI x402 requests adapter --------------------------------------------


def test_stock_python_requests_adapter_pays_one_shot(stack: Stack) -> None:
    payer = new_wallet(stack.chain, FUNDS)
    text = "Client two: your parcel is at the front desk"
    before = snapshot(stack, payer)
    x402 = register_exact_evm_client(
        x402ClientSync(), EthAccountSigner(Account.from_key(payer.key)), networks=NETWORK
    )
    url = stack.relay.url + "/api/send"
    with x402_requests(x402) as session:
        # Without the password the service answers 401 before any challenge: nothing is paid.
        refused = session.post(url, json={"message": text, "to": US}, timeout=60)
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"] == "unauthorized"
        assert snapshot(stack, payer) == before

        response = session.post(
            url,
            json={"message": text, "to": "301.257.6365"},
            headers={"X-Pay-Password": PASSWORD},
            timeout=120,
        )
        assert response.status_code == 200, f"{response.text}\n{stack.relay.log()}"
        settled = decode_header(response.headers["PAYMENT-RESPONSE"])
        result = {"payer": payer.address, "body": response.json(), "paymentResponse": settled}

    # One-shot: the price of a freshly moderated text, the same on the 402 and the paid retry.
    assert_node_payer_paid(stack, result, payer, before, text)


# Client 3: the stock npm @x402/fetch -------------------------------------------------------


def run_node_payer(stack: Stack, payer: Wallet, body: dict[str, Any]) -> dict[str, Any]:
    """tests/node/pay.mjs: wrapFetchWithPayment + the exact EVM scheme + a viem account."""
    env = {
        **os.environ,
        "PAYER_PRIVATE_KEY": payer.key,
        "PAY_PASSWORD": PASSWORD,
        "RPC_URL": stack.chain.rpc_url,
    }
    script = str(Path("tests") / "node" / "pay.mjs")
    done = subprocess.run(
        ["node", script, stack.relay.url + "/api/send", json.dumps(body)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{stack.relay.log()}"
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_stock_npm_fetch_client_pays_one_shot(stack: Stack) -> None:
    payer = new_wallet(stack.chain, FUNDS)
    text = "Client three: your appointment is confirmed for 9am"
    before = snapshot(stack, payer)

    result = run_node_payer(stack, payer, {"message": text, "to": "+1 301 257 6365"})

    assert result["status"] == 200, f"{result}\n{stack.relay.log()}"
    assert_node_payer_paid(stack, result, payer, before, text)
