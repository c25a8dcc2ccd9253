"""`relay mcp`, driven by the mcp SDK's own client over stdio (and once over streamable HTTP),
paying a real `relay serve` on a real local chain."""

from __future__ import annotations

import json
import logging
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, TextContent

from relay.dev.chain import DevChain
from relay.ledger import Ledger
from relay.settings import ClientSettings, SettingsError, load_client_settings
from tests.conftest import new_wallet
from tests.processes import REPO, RelayProcess, free_port, migrated

US = "+13012576365"
PRICE_ATOMIC = 50_000  # one GSM-7 segment at 0.05 USD; rules moderation costs nothing
PAYER_USDC = 10_000_000
START_TIMEOUT = 30.0

Call = tuple[str, dict[str, Any]]


@dataclass
class Stack:
    relay: RelayProcess
    ledger: Ledger
    chain: DevChain
    logs: Path

    def env(self, payer_key: str, **more: str) -> dict[str, str]:
        """What an agent host would put in the server's environment."""
        return {"RELAY_URL": self.relay.url, "PAYER_PRIVATE_KEY": payer_key, **more}

    def outbox(self, text: str) -> list[dict[str, Any]]:
        return [m for m in self.ledger.outbox_messages() if text in m["body"]]


@pytest.fixture(scope="module")
def stack(chain: DevChain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("mcp")
    with migrated(chain, folder) as (env, ledger), RelayProcess(env, folder / "relay.log") as relay:
        yield Stack(relay, ledger, chain, folder)


def stdio_params(env: dict[str, str]) -> StdioServerParameters:
    """`relay mcp` as an agent host starts it, with ENV."""
    return StdioServerParameters(
        command=sys.executable, args=["-m", "relay.cli", "mcp"], env=env, cwd=REPO
    )


def call_tools(stack: Stack, env: dict[str, str], calls: list[Call]) -> list[CallToolResult]:
    """Spawn `relay mcp` over stdio, make CALLS in one session, and return their results."""
    params = stdio_params(env)

    async def session() -> list[CallToolResult]:
        with (stack.logs / "mcp-stderr.log").open("a") as errlog:
            async with (
                stdio_client(params, errlog=errlog) as (read, write),
                ClientSession(read, write) as client,
            ):
                await client.initialize()
                return [await client.call_tool(name, args) for name, args in calls]

    return anyio.run(session)


def body(result: CallToolResult) -> dict[str, Any]:
    """The JSON a tool answered (its one text block)."""
    assert len(result.content) == 1
    block = result.content[0]
    assert isinstance(block, TextContent)
    data: dict[str, Any] = json.loads(block.text)
    return data


def error(result: CallToolResult) -> dict[str, Any]:
    """The error a tool answered: isError with our stable code and retry_after_seconds."""
    assert result.is_error, result
    data = body(result)
    assert {"error", "message", "retry_after_seconds"} <= set(data)
    return data


def send(text: str, max_price_usd: str = "0.10") -> Call:
    return ("send_sms", {"message": text, "to": US, "max_price_usd": max_price_usd})


def unique(text: str) -> str:
    return f"{text} {secrets.token_hex(3)}"


def test_the_tools_and_their_arguments(stack: Stack) -> None:
    params = stdio_params(stack.env("0x" + "11" * 32))

    async def listed() -> dict[str, set[str]]:
        with (stack.logs / "mcp-stderr.log").open("a") as errlog:
            async with (
                stdio_client(params, errlog=errlog) as (read, write),
                ClientSession(read, write) as client,
            ):
                await client.initialize()
                tools = (await client.list_tools()).tools
                return {t.name: set(t.input_schema["required"]) for t in tools}

    assert anyio.run(listed) == {
        "quote_sms": {"message", "to"},
        "send_sms": {"message", "to", "max_price_usd"},
        "sms_status": {"message_id"},
    }


def test_send_pays_once_even_when_the_call_is_repeated(stack: Stack) -> None:
    payer = new_wallet(stack.chain, PAYER_USDC)
    text = unique("Hello over MCP")
    before = stack.chain.usdc_balance(payer.address)
    quoted, first, again = call_tools(
        stack,
        stack.env(payer.key),
        [("quote_sms", {"message": text, "to": US}), send(text), send(text)],
    )
    assert not quoted.is_error and body(quoted)["price_atomic"] == str(PRICE_ATOMIC)
    assert not first.is_error, body(first)
    sent = body(first)
    assert sent["sent"] is True and sent["message_id"] and sent["transaction"]
    assert first.structured_content == sent
    assert body(again) == sent  # the repeated call answers the first send again
    assert before - stack.chain.usdc_balance(payer.address) == PRICE_ATOMIC
    assert len(stack.outbox(text)) == 1


def test_sms_status_follows_a_sent_message(stack: Stack) -> None:
    payer = new_wallet(stack.chain, PAYER_USDC)
    env = stack.env(payer.key)
    (sent,) = call_tools(stack, env, [send(unique("Status over MCP"))])
    message_id = body(sent)["message_id"]
    found, missing, bad = call_tools(
        stack,
        env,
        [
            ("sms_status", {"message_id": message_id}),
            ("sms_status", {"message_id": "nope"}),
            ("sms_status", {"message_id": "../quote"}),
        ],
    )
    assert not found.is_error, body(found)
    assert body(found)["message_id"] == message_id
    assert body(found)["payment"]["transaction"] == body(sent)["transaction"]
    assert error(missing)["error"] == "not_found"
    assert error(bad)["error"] == "invalid_input"


def test_a_price_above_the_cap_is_refused_before_signing(stack: Stack) -> None:
    payer = new_wallet(stack.chain, PAYER_USDC)
    text = unique("Too dear over MCP")
    before = len(stack.ledger.list_payments(10_000))
    (refused,) = call_tools(stack, stack.env(payer.key), [send(text, "0.01")])
    refusal = error(refused)
    assert refusal["error"] == "price_limit_exceeded"
    assert refusal["details"] == {"price_atomic": str(PRICE_ATOMIC), "max_atomic": "10000"}
    assert stack.chain.usdc_balance(payer.address) == PAYER_USDC
    assert len(stack.ledger.list_payments(10_000)) == before
    assert stack.outbox(text) == []


def test_the_session_budget_is_never_exceeded(stack: Stack) -> None:
    payer = new_wallet(stack.chain, PAYER_USDC)
    first_text, second_text = unique("Within budget"), unique("Past the budget")
    env = stack.env(payer.key, MCP_BUDGET_USD="0.08")
    first, second = call_tools(stack, env, [send(first_text), send(second_text)])
    assert not first.is_error, body(first)
    refusal = error(second)
    assert refusal["error"] == "budget_exceeded"
    assert refusal["details"] == {
        "price_atomic": str(PRICE_ATOMIC),
        "budget_atomic": "80000",
        "spent_atomic": str(PRICE_ATOMIC),
    }
    assert PAYER_USDC - stack.chain.usdc_balance(payer.address) == PRICE_ATOMIC
    assert stack.outbox(second_text) == []
    # A new session starts with the whole budget again.
    (third,) = call_tools(stack, env, [send(second_text)])
    assert not third.is_error, body(third)
    assert len(stack.outbox(second_text)) == 1


def test_a_signed_payment_counts_whatever_the_relay_answers(stack: Stack) -> None:
    """Whoever holds a signed authorization can settle it until it expires, and a relay
    that says the payment failed may not be telling the truth: once signed, it counts."""
    poor = new_wallet(stack.chain, PRICE_ATOMIC - 1)
    env = stack.env(poor.key, MCP_BUDGET_USD="0.05")
    failed, refused = call_tools(stack, env, [send(unique("No funds")), send(unique("No funds"))])
    assert error(failed)["error"] == "payment_verify_failed"
    assert error(refused)["error"] == "budget_exceeded"


def test_bad_input_and_an_unreachable_relay_are_coded_errors(stack: Stack) -> None:
    payer = new_wallet(stack.chain)
    bad_number, bad_price = call_tools(
        stack,
        stack.env(payer.key),
        [("quote_sms", {"message": "Hi", "to": "12"}), send("Hi", "-1")],
    )
    assert error(bad_number)["error"] == "invalid_input"
    assert error(bad_price)["error"] == "invalid_input"
    away = {**stack.env(payer.key), "RELAY_URL": f"http://127.0.0.1:{free_port()}"}
    (unreachable,) = call_tools(stack, away, [("quote_sms", {"message": "Hi", "to": US})])
    assert error(unreachable) == {
        "error": "relay_unreachable",
        "message": "Cannot reach the relay (ConnectError).",
        "retryable": True,
        "retry_after_seconds": 5,
        "details": {},
    }


def test_over_streamable_http(stack: Stack) -> None:
    payer = new_wallet(stack.chain, PAYER_USDC)
    port = free_port()
    text = unique("Hello over MCP HTTP")
    with (stack.logs / "mcp-http.log").open("ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "relay.cli", "mcp", "--http", "--port", str(port)],
            cwd=REPO,
            env={**base_env(), **stack.env(payer.key)},
            stdout=subprocess.DEVNULL,
            stderr=log,
        )

    async def session() -> list[CallToolResult]:
        async with (
            streamable_http_client(f"http://127.0.0.1:{port}/mcp") as (read, write),
            ClientSession(read, write) as client,
        ):
            await client.initialize()
            return [
                await client.call_tool("quote_sms", {"message": text, "to": US}),
                await client.call_tool(*send(text)),
            ]

    # The SDK client's DEBUG lines echo every message (the agent's numbers and texts included).
    sdk_log = logging.getLogger("mcp.client.streamable_http")
    level = sdk_log.level
    sdk_log.setLevel(logging.INFO)
    try:
        wait_listening(port)
        quoted, sent = anyio.run(session)
    finally:
        sdk_log.setLevel(level)
        server.terminate()
        server.wait(10)
    assert body(quoted)["price_atomic"] == str(PRICE_ATOMIC)
    assert body(sent)["sent"] is True
    assert len(stack.outbox(text)) == 1


def test_without_a_payer_key_it_does_not_start(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "relay.cli", "mcp"],
        cwd=REPO,
        env=base_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
    )
    assert result.returncode == 2
    assert "PAYER_PRIVATE_KEY" in result.stderr and result.stdout == ""


def test_the_budget_setting() -> None:
    assert load_client_settings({}).mcp_budget_usd == Decimal("1.00")
    assert load_client_settings({"MCP_BUDGET_USD": "0.25"}) == ClientSettings(
        mcp_budget_usd=Decimal("0.25")
    )
    with pytest.raises(SettingsError, match="MCP_BUDGET_USD"):
        load_client_settings({"MCP_BUDGET_USD": "lots"})


def base_env() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    pytest.fail(f"relay mcp --http did not listen on {port}")
