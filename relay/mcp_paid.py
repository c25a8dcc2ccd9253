"""The relay's paid MCP tool: send_sms priced and paid exactly like POST /api/send.

The payment travels in the tool call's `_meta` (x402.mcp); it is handed to the one paid
path, relay.flows.sending.send, as the PAYMENT-SIGNATURE header it stands for, so
moderation comes first and the ledger, replays and exactly-once all apply. The answers
take x402.mcp's shapes: the payment requirements as an error result, or the send answer
with the settlement in `_meta`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import simplejson
from mcp.server.mcpserver import Context, MCPServer
from mcp.types import CallToolResult, TextContent
from x402.http import (
    decode_payment_required_header,
    decode_payment_response_header,
    encode_payment_signature_header,
)
from x402.mcp import MCP_PAYMENT_META_KEY, MCP_PAYMENT_RESPONSE_META_KEY
from x402.mcp.utils import extract_payment_from_meta

from relay.errors import InvalidInput, RelayError
from relay.flows.answers import Outcome
from relay.flows.sending import send
from relay.inputs import parse_message_request
from relay.payments import V2_RESPONSE_HEADER
from relay.services import Services, build_services
from relay.settings import Settings, SettingsError

#: The x402 resource a paid call buys (x402.mcp names tools mcp://tool/<name>).
RESOURCE_URL = "mcp://tool/send_sms"
#: Whom the unpaid-call limit counts against: MCP callers carry no address we can trust.
CLIENT = "mcp"
INSTRUCTIONS = (
    "send_sms is paid with x402: call it, pay the requirements it answers with, and call it "
    f"again with the payment in _meta['{MCP_PAYMENT_META_KEY}']. Repeating a paid call with "
    "the same payment returns the same answer and never sends twice."
)


def build_server(services: Services) -> MCPServer:
    """The MCP server with the paid send_sms tool."""
    server: MCPServer = MCPServer("relay-paid", instructions=INSTRUCTIONS)

    @server.tool()
    def send_sms(
        message: str,
        to: str,
        ctx: Context,
        quote_token: str | None = None,
        smart_encoding: bool = False,
    ) -> CallToolResult:
        """Moderate, price and send one SMS, paid in USDC with x402 (the price of /api/send)."""
        arguments = {"message": message, "to": to, "smart_encoding": smart_encoding}
        if quote_token is not None:
            arguments["quote_token"] = quote_token
        return paid_send(services, arguments, ctx.request_context.meta)

    return server


def paid_send(
    services: Services, arguments: dict[str, Any], meta: Mapping[str, Any] | None
) -> CallToolResult:
    """One call of the paid tool: the challenge, or the paid send's answer."""
    try:
        req = parse_message_request(
            arguments, allow_token=True, max_message_chars=services.settings.max_message_chars
        )
        outcome = send(services, req, payment_headers(meta), RESOURCE_URL, CLIENT)
    except RelayError as exc:
        return _result(exc.body(), is_error=True)
    return tool_answer(outcome)


def payment_headers(meta: Mapping[str, Any] | None) -> dict[str, str]:
    """The PAYMENT-SIGNATURE header the payment in `_meta` stands for; {} without one."""
    if not meta or MCP_PAYMENT_META_KEY not in meta:
        return {}
    payload = extract_payment_from_meta({"_meta": dict(meta)})
    if payload is None:
        raise InvalidInput(
            "The payment in _meta is not an x402 payment payload.",
            details={"field": f"_meta.{MCP_PAYMENT_META_KEY}"},
        )
    return {"PAYMENT-SIGNATURE": encode_payment_signature_header(payload)}


def tool_answer(outcome: Outcome) -> CallToolResult:
    """An /api/send answer in x402.mcp's shapes."""
    challenge = outcome.headers.get("PAYMENT-REQUIRED")
    if challenge is not None:
        required = decode_payment_required_header(challenge)
        return _result(required.model_dump(by_alias=True, exclude_none=True), is_error=True)
    settled = outcome.headers.get(V2_RESPONSE_HEADER)
    meta = None
    if settled is not None:
        settlement = decode_payment_response_header(settled)
        meta = {MCP_PAYMENT_RESPONSE_META_KEY: settlement.model_dump(by_alias=True)}
    return _result(_plain(outcome.body), is_error=outcome.status != 200, meta=meta)


def serve(settings: Settings, *, http: bool, host: str, port: int) -> None:
    """Run the paid tool over stdio, or over streamable HTTP at http://HOST:PORT/mcp."""
    if settings.pay_password:  # MCP calls carry no X-Pay-Password to check
        raise SettingsError(
            ["PAY_PASSWORD is set, and the paid MCP tool cannot ask for it: unset it to serve"]
        )
    server = build_server(build_services(settings))
    if http:
        server.run("streamable-http", host=host, port=port)
    else:
        server.run("stdio")


def _plain(body: dict[str, Any]) -> dict[str, Any]:
    """The body as plain JSON values (Decimal prices become numbers, as the API sends them)."""
    plain: dict[str, Any] = json.loads(simplejson.dumps(body, use_decimal=True))
    return plain


def _result(
    body: dict[str, Any], *, is_error: bool, meta: dict[str, Any] | None = None
) -> CallToolResult:
    return CallToolResult(
        content=[TextContent(type="text", text=json.dumps(body, default=str))],
        structured_content=body,
        is_error=is_error,
        _meta=meta,
    )
