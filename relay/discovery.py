"""The x402 Bazaar discovery extension of the 402: how to call POST /api/send and what it
answers, so a facilitator that settles a payment can list the relay in its catalogue."""

from __future__ import annotations

from functools import cache
from types import SimpleNamespace
from typing import Any

from x402.extensions.bazaar import (
    BAZAAR,
    OutputConfig,
    bazaar_resource_server_extension,
    declare_discovery_extension,
)

from relay.wire import SendResult, request_models

#: What an agent would send, and what it gets back (examples in the catalogue).
EXAMPLE_INPUT = {"message": "Your code is 123456", "to": "+14155550100"}
EXAMPLE_OUTPUT = {
    "sent": True,
    "message_id": "01J9Z8Y7X6W5V4T3S2R1Q0P9N8",
    "status": "queued",
    "to": "+14155550100",
    "segments": 1,
    "price_usd": 0.05,
    "paid_by": "0x857b06519E91e3A54538791bDbb0E22373e36b66",
    "transaction": "0x" + "ab" * 32,
}


@cache
def discovery_extension(max_message_chars: int) -> dict[str, Any]:
    """The extensions entry ({"bazaar": ...}) for POST /api/send; built once per bound."""
    _, send_request = request_models(max_message_chars)
    declared = declare_discovery_extension(
        input=EXAMPLE_INPUT,
        input_schema=_plain(send_request.model_json_schema()),
        body_type="json",
        output=OutputConfig(example=EXAMPLE_OUTPUT, schema=_plain(SendResult.model_json_schema())),
    )
    # The SDK adds the method from the request being answered; /api/send is always a POST.
    post = SimpleNamespace(method="POST")
    enriched = bazaar_resource_server_extension.enrich_declaration(declared[BAZAAR.key], post)
    return {BAZAAR.key: enriched}


def _plain(schema: dict[str, Any]) -> dict[str, Any]:
    """A self-contained JSON schema: pydantic's $defs inlined (the schema is embedded in
    another document, where "#/$defs/..." would point nowhere), without its top title."""
    definitions = schema.get("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(definitions[ref.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items() if key != "$defs"}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    inlined: dict[str, Any] = inline(schema)
    inlined.pop("title", None)
    return inlined
