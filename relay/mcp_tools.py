"""`relay mcp`: MCP tools that quote, pay for and track SMS for agents that cannot sign.

Payments go through relay.client with one key, never above the caller's cap nor past the
budget of the whole server process; a repeated send_sms never pays a second time.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx
from mcp.server.mcpserver import MCPServer
from mcp.types import CallToolResult, TextContent

from relay.client import RelayClient, check_cap
from relay.errors import BudgetExceeded, InvalidInput, RelayError
from relay.pricing import from_atomic, to_atomic
from relay.settings import ClientSettings

#: The code, and the wait suggested, when the relay cannot be reached at all (as `relay send`).
UNREACHABLE = "relay_unreachable"
UNREACHABLE_RETRY_SECONDS = 5
MESSAGE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
INSTRUCTIONS = (
    "Send SMS through an x402 relay, paid in USDC by this server's wallet. Call quote_sms "
    "first, then send_sms with a max_price_usd at or above the quoted price_usd; sms_status "
    "follows a sent message. Errors are JSON with a stable `error` code and "
    "`retry_after_seconds` when waiting helps."
)


class SessionPayer:
    """Pays for sends with one client: never above a cap, never past the session budget,
    never twice for the same message to the same number."""

    def __init__(self, settings: ClientSettings) -> None:
        self.client = RelayClient(
            settings.relay_url,
            settings.payer_private_key,
            pay_password=settings.pay_password,
            on_step=self._note_step,
        )
        self._budget = to_atomic(settings.mcp_budget_usd)
        self._spent = 0
        self._lock = threading.Lock()
        self._answers: dict[tuple[str, str], dict[str, Any]] = {}
        self._payment_ids: dict[tuple[str, str], str] = {}
        self._signed = False

    def _note_step(self, step: str) -> None:
        """The client's progress: a signed payment is money that may move."""
        if step.startswith("payment signed"):
            self._signed = True

    def send(self, message: str, to: str, max_price_usd: Decimal) -> dict[str, Any]:
        """Quote, check cap and budget, then pay the quoted price once per (text, number)."""
        cap = _positive_atomic(max_price_usd)
        with self._lock:  # a repeated call waits for the first and finds its answer
            quoted = self.client.quote(message, to)
            key = (message, str(quoted["to_normalized"]))
            if key in self._answers:
                return self._answers[key]
            price = int(quoted["price_atomic"])
            check_cap(price, cap)
            self._check_budget(price)
            answer = self._pay(message, to, price, self._payment_ids.setdefault(key, _new_id()))
            self._answers[key] = answer
            return answer

    def _pay(self, message: str, to: str, price: int, payment_id: str) -> dict[str, Any]:
        """Send with the quoted price as the cap; count it once a payment is signed, whatever
        the relay answers: whoever holds a signed authorization can settle it until it
        expires, and an answer saying it failed may not be the truth."""
        self._signed = False
        try:
            return self.client.send(
                message, to, max_price_usd=from_atomic(price), payment_id=payment_id
            )
        finally:
            if self._signed:
                self._spent += price

    def _check_budget(self, price: int) -> None:
        if self._spent + price > self._budget:
            raise BudgetExceeded(
                f"The price {from_atomic(price)} USD would take this session past its budget of "
                f"{from_atomic(self._budget)} USD ({from_atomic(self._spent)} USD spent).",
                details={
                    "price_atomic": str(price),
                    "budget_atomic": str(self._budget),
                    "spent_atomic": str(self._spent),
                },
            )


def build_server(payer: SessionPayer) -> MCPServer:
    """The MCP server with the quote_sms, send_sms and sms_status tools."""
    client = payer.client
    server: MCPServer = MCPServer("relay", instructions=INSTRUCTIONS)

    @server.tool()
    def quote_sms(message: str, to: str) -> CallToolResult:
        """Moderate and price one SMS to `to` (E.164 or national); nothing is paid."""
        return tool_result(lambda: client.quote(message, to))

    @server.tool()
    def send_sms(message: str, to: str, max_price_usd: Decimal) -> CallToolResult:
        """Pay for and send one SMS, never above max_price_usd (USD); repeating it never pays
        twice."""
        return tool_result(lambda: payer.send(message, to, max_price_usd))

    @server.tool()
    def sms_status(message_id: str) -> CallToolResult:
        """The delivery status, payment and refund of a message sent with send_sms."""
        return tool_result(lambda: client.status(_message_id(message_id)))

    return server


def tool_result(call: Callable[[], dict[str, Any]]) -> CallToolResult:
    """The JSON answer of CALL, or an error result carrying the stable code."""
    try:
        answer = call()
    except RelayError as exc:
        return _result(exc.body(), is_error=True)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        return _result(_unreachable(exc), is_error=True)
    return _result(answer, is_error=False)


def serve(settings: ClientSettings, *, http: bool, host: str, port: int) -> None:
    """Run the server over stdio, or over streamable HTTP at http://HOST:PORT/mcp."""
    payer = SessionPayer(settings)
    with payer.client:
        server = build_server(payer)
        if http:
            server.run("streamable-http", host=host, port=port)
        else:
            server.run("stdio")


def _result(body: dict[str, Any], *, is_error: bool) -> CallToolResult:
    text = json.dumps(body, default=str)
    return CallToolResult(
        content=[TextContent(type="text", text=text)],
        structured_content=None if is_error else body,
        is_error=is_error,
    )


def _unreachable(exc: httpx.HTTPError | httpx.InvalidURL) -> dict[str, Any]:
    return {
        "error": UNREACHABLE,
        "message": f"Cannot reach the relay ({type(exc).__name__}).",
        "retryable": True,
        "retry_after_seconds": UNREACHABLE_RETRY_SECONDS,
        "details": {},
    }


def _positive_atomic(amount_usd: Decimal) -> int:
    if not amount_usd.is_finite() or amount_usd <= 0:
        raise InvalidInput("max_price_usd must be a positive amount.")
    return to_atomic(amount_usd)


def _message_id(raw: str) -> str:
    """A message id as the relay hands them out; anything else would change the URL path."""
    if not MESSAGE_ID.fullmatch(raw):
        raise InvalidInput("Not a message id.", details={"field": "message_id"})
    return raw


def _new_id() -> str:
    return "pay_" + secrets.token_hex(16)
