"""`relay mcp --paid`: the relay's paid send_sms tool, paid by the x402 SDK's own MCP client
(x402MCPClient) on a real local chain, over the mcp SDK's stdio transport."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from eth_account import Account
from mcp import ClientSession, StdioServerParameters, stdio_client
from x402 import PaymentPayload, x402Client
from x402.mcp import MCPToolCallResult, x402MCPClient
from x402.mcp.types import AfterPaymentContext
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.exact import register_exact_evm_client

from relay.dev.chain import DevChain
from relay.ledger import Ledger
from tests.conftest import new_wallet
from tests.processes import REPO, migrated

US = "+13012576365"
PRICE_ATOMIC = 50_000  # one GSM-7 segment at 0.05 USD; rules moderation costs nothing
PAYER_USDC = 10_000_000


@dataclass
class Paid:
    env: dict[str, str]
    ledger: Ledger
    chain: DevChain
    logs: Path

    def outbox(self, text: str) -> list[dict[str, Any]]:
        return [m for m in self.ledger.outbox_messages() if text in m["body"]]


@pytest.fixture(scope="module")
def paid(chain: DevChain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Paid]:
    folder = tmp_path_factory.mktemp("mcp-paid")
    with migrated(chain, folder) as (env, ledger):
        yield Paid(env, ledger, chain, folder)


class SessionClient:
    """The call_tool(params) client x402MCPClient drives, over an mcp 2.x ClientSession
    (whose results name their fields in snake case)."""

    def __init__(self, session: ClientSession) -> None:
        self._session = session

    async def call_tool(
        self, params: dict[str, Any], read_timeout_seconds: timedelta | None = None
    ) -> SimpleNamespace:
        result = await self._session.call_tool(
            params["name"],
            params["arguments"],
            read_timeout_seconds=read_timeout_seconds and read_timeout_seconds.total_seconds(),
            meta=params.get("_meta"),
        )
        return SimpleNamespace(
            content=[block.model_dump(by_alias=True) for block in result.content],
            isError=result.is_error,
            structuredContent=result.structured_content,
            _meta=result.meta or {},
        )


@dataclass
class Calls:
    results: list[MCPToolCallResult]
    payloads: list[PaymentPayload]
    replayed: MCPToolCallResult | None


@asynccontextmanager
async def paid_session(paid: Paid) -> AsyncIterator[ClientSession]:
    """An initialised MCP session with `relay mcp --paid`, spawned over stdio."""
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "relay.cli", "mcp", "--paid"], env=paid.env, cwd=REPO
    )
    with (paid.logs / "mcp-paid-stderr.log").open("a") as errlog:
        async with (
            stdio_client(params, errlog=errlog) as (read, write),
            ClientSession(read, write) as mcp_session,
        ):
            await mcp_session.initialize()
            yield mcp_session


def pay_and_call(paid: Paid, key: str, arguments: list[dict[str, Any]], replay: bool) -> Calls:
    """Spawn `relay mcp --paid` over stdio and call send_sms through x402MCPClient with
    KEY, once per ARGUMENTS; with REPLAY, send the first payment again."""
    payer = x402Client()
    register_exact_evm_client(payer, EthAccountSigner(Account.from_key(key)))
    payloads: list[PaymentPayload] = []

    def keep(context: AfterPaymentContext) -> None:
        payloads.append(context.payment_payload)

    async def session() -> Calls:
        async with paid_session(paid) as mcp_session:
            client = x402MCPClient(SessionClient(mcp_session), payer)
            client.on_after_payment(keep)
            results = [await client.call_tool("send_sms", args) for args in arguments]
            replayed = None
            if replay:
                replayed = await client.call_tool_with_payment(
                    "send_sms", arguments[0], payloads[0]
                )
            return Calls(results, payloads, replayed)

    return anyio.run(session)


def text_of(result: MCPToolCallResult) -> dict[str, Any]:
    block = result.content[0]
    data: dict[str, Any] = json.loads(block["text"])
    return data


def test_the_sdk_client_pays_and_a_replay_sends_nothing_more(paid: Paid) -> None:
    payer = new_wallet(paid.chain, PAYER_USDC)
    text = f"Paid over MCP {secrets.token_hex(3)}"
    calls = pay_and_call(paid, payer.key, [{"message": text, "to": US}], replay=True)
    (first,) = calls.results
    assert first.payment_made and not first.is_error, first.content
    sent = text_of(first)
    assert sent["sent"] is True and sent["to"] == US and sent["message_id"]
    settlement = first.payment_response
    assert settlement is not None and settlement.success
    assert settlement.transaction == sent["transaction"]
    assert calls.payloads[0].accepted.amount == str(PRICE_ATOMIC)
    assert PAYER_USDC - paid.chain.usdc_balance(payer.address) == PRICE_ATOMIC
    replayed = calls.replayed
    assert replayed is not None and not replayed.is_error
    assert text_of(replayed) == sent
    assert replayed.payment_response is not None
    assert replayed.payment_response.transaction == settlement.transaction
    assert PAYER_USDC - paid.chain.usdc_balance(payer.address) == PRICE_ATOMIC
    assert len(paid.outbox(text)) == 1


def test_moderation_comes_before_payment(paid: Paid) -> None:
    payer = new_wallet(paid.chain, PAYER_USDC)
    phishing = "Your account is locked, verify your password at http://bit.ly/x now"
    calls = pay_and_call(paid, payer.key, [{"message": phishing, "to": US}], replay=False)
    (refused,) = calls.results
    assert refused.is_error and not refused.payment_made
    assert text_of(refused)["error"] == "rejected"
    assert paid.chain.usdc_balance(payer.address) == PAYER_USDC
    assert paid.outbox(phishing) == []


def test_a_bad_payment_in_meta_is_a_coded_error(paid: Paid) -> None:
    async def session() -> Any:
        async with paid_session(paid) as mcp_session:
            return await mcp_session.call_tool(
                "send_sms",
                {"message": "Hi", "to": US},
                meta={"x402/payment": {"not": "a payment"}},
            )

    result = anyio.run(session)
    assert result.is_error
    assert json.loads(result.content[0].text)["error"] == "invalid_input"


def test_it_does_not_start_where_a_pay_password_guards_sends(paid: Paid) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "relay.cli", "mcp", "--paid"],
        cwd=REPO,
        env={**os.environ, **paid.env, "PAY_PASSWORD": "secret-password"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "PAY_PASSWORD" in result.stderr and result.stdout == ""
