"""Machine-readable documentation: GET /openapi.json (OpenAPI 3.1) and GET /llms.txt.

Both are built from Python data at request time. The error-code enum, the code -> status
table and the retryable flags come from ``relay.errors``; the request limits from
``relay.inputs``; prices, network, asset and payTo from the running settings. Nothing here
can drift from the code it documents without ``tests/test_docs.py`` failing.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import simplejson
from flask import Blueprint, Response, current_app

from relay.errors import RelayError, all_error_classes
from relay.inputs import MAX_TO_CHARS, MAX_TOKEN_CHARS
from relay.settings import Settings
from relay.states import PaymentState, RefundState

docs = Blueprint("docs", __name__)

OPENAPI_VERSION = "3.1.0"
MESSAGE_STATUSES = ("queued", "dispatched", "delivered", "failed", "refunded")
MODERATION_CATEGORIES = (
    "ok",
    "spam",
    "phishing",
    "fraud",
    "shaft",
    "political",
    "harassment",
    "illegal",
    "other",
)

# Codes any request can meet, whatever the operation.
GLOBAL_CODES = ("not_found", "method_not_allowed", "internal_error")
# Codes raised by the Python client (relay.client) before any request; never sent by the server.
CLIENT_ONLY_CODES = ("price_limit_exceeded",)

# What each code means to a caller; a code missing here falls back to its default message.
WHEN: dict[str, str] = {
    "invalid_input": "malformed JSON, wrong types, unknown fields, bad characters or number, "
    "bad quote token or payment header",
    "quote_content_mismatch": "message or destination differ from the quote",
    "quote_expired": "the quote is older than its TTL; quote again",
    "unauthorized": "missing or wrong X-Pay-Password (Retry-After during a lock-out), "
    "or a bad webhook signature",
    "payment_required": "no payment attached: the x402 challenge",
    "payment_verify_failed": "the payment did not verify (facilitator reason in details)",
    "payment_settlement_failed": "verified but not settled on-chain; no SMS sent",
    "not_found": "unknown path or message id",
    "method_not_allowed": "wrong HTTP method (see the Allow header)",
    "quote_already_used": "the quote already paid for an SMS",
    "request_in_progress": "the same payment is still being processed; repeat it after Retry-After",
    "idempotency_key_reused": "a payment identifier reused with another payment",
    "payload_too_large": "request body over the size limit",
    "rejected": "moderation rejected the text (approved, category, confidence, reason)",
    "recipient_opted_out": "the recipient replied STOP",
    "unsupported_destination": "a number type that cannot take an SMS (premium rate, pager...)",
    "message_too_long": "more segments than the operator allows",
    "rate_limited": "too many requests; wait Retry-After seconds",
    "internal_error": "a bug; details only in the server log",
    "sinch_send_failed_after_payment": "settled, but the SMS provider refused; carries the "
    "transaction and the refund when one was made",
    "moderation_unavailable": "moderation failed or timed out; retry after Retry-After",
    "chain_unavailable": "the chain or facilitator is unreachable; retry after Retry-After",
    "storage_unavailable": "the shared rate-limit storage (Redis) is unreachable; retry after "
    "Retry-After",
    "settlement_pending": "not a failure: settlement broadcast, not yet confirmed; repeat the "
    "same request (same payment header) after Retry-After",
    "price_limit_exceeded": "client only: the quoted price is above your max_price_usd; "
    "nothing was signed",
}

# Error codes per operation (statuses come from relay.errors). Schemas for special statuses.
QUOTE_CODES = (
    "invalid_input",
    "payload_too_large",
    "rejected",
    "recipient_opted_out",
    "unsupported_destination",
    "message_too_long",
    "rate_limited",
    "moderation_unavailable",
    "storage_unavailable",
    "internal_error",
)
SEND_CODES = (
    "settlement_pending",
    "invalid_input",
    "quote_content_mismatch",
    "quote_expired",
    "unauthorized",
    "payment_required",
    "payment_verify_failed",
    "payment_settlement_failed",
    "quote_already_used",
    "request_in_progress",
    "idempotency_key_reused",
    "payload_too_large",
    "rejected",
    "recipient_opted_out",
    "unsupported_destination",
    "message_too_long",
    "rate_limited",
    "sinch_send_failed_after_payment",
    "moderation_unavailable",
    "chain_unavailable",
    "storage_unavailable",
    "internal_error",
)
MESSAGE_CODES = ("unauthorized", "not_found", "internal_error")
WEBHOOK_CODES = (
    "invalid_input",
    "unauthorized",
    "not_found",
    "payload_too_large",
    "internal_error",
)
PLAIN_CODES = ("internal_error",)
METRICS_CODES = ("unauthorized", "not_found", "internal_error")

REQUEST_HEADERS = ("PAYMENT-SIGNATURE", "X-PAYMENT", "X-Pay-Password")
RESPONSE_HEADERS = ("PAYMENT-REQUIRED", "PAYMENT-RESPONSE", "X-PAYMENT-RESPONSE", "Retry-After")


def _error_classes() -> dict[str, type[RelayError]]:
    return {cls.code: cls for cls in all_error_classes()}


def error_codes() -> dict[str, int]:
    """Every stable error code and its fixed HTTP status, from relay.errors."""
    return {code: cls.status for code, cls in _error_classes().items()}


def operation_codes() -> dict[str, tuple[str, ...]]:
    """The error codes each documented operation can answer (for tests and llms.txt)."""
    return {
        "POST /api/quote": QUOTE_CODES,
        "POST /api/send": SEND_CODES,
        "GET /api/messages/{message_id}": MESSAGE_CODES,
        "POST /webhooks/sinch/{secret}": WEBHOOK_CODES,
    }


# Schemas -----------------------------------------------------------------------------


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _schema(name: str) -> dict[str, str]:
    return _ref("schemas", name)


def _obj(properties: dict[str, Any], required: Iterable[str] = (), **more: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    required = list(required)
    if required:
        schema["required"] = required
    schema.update(more)
    return schema


def _extends_error(description: str, properties: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "allOf": [_schema("Error"), _obj(properties)]}


STR: dict[str, Any] = {"type": "string"}
INT: dict[str, Any] = {"type": "integer"}
USD: dict[str, Any] = {
    "type": "number",
    "minimum": 0,
    "description": "US dollars, exact decimal with at most 6 decimals (written from Decimal).",
}
ATOMIC: dict[str, Any] = {
    "type": "string",
    "pattern": "^[0-9]+$",
    "description": "USDC atomic units (10^-6 USD) as a decimal integer string.",
}
ADDRESS: dict[str, Any] = {"type": "string", "pattern": "^0x[0-9a-fA-F]{40}$"}
TX_HASH: dict[str, Any] = {"type": ["string", "null"], "description": "Transaction hash."}
TIMESTAMP: dict[str, Any] = {"type": "number", "description": "Unix time in seconds."}


def _request_schemas(settings: Settings) -> dict[str, Any]:
    message = {
        "type": "string",
        "minLength": 1,
        "maxLength": settings.max_message_chars,
        "description": "The SMS text. Priced as submitted; the opt-out line is added at dispatch.",
    }
    to = {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_TO_CHARS,
        "description": "Destination in any common format; normalised to E.164 (default region US).",
        "examples": ["+13012576365", "(301) 257-6365"],
    }
    smart = {
        "type": "boolean",
        "default": False,
        "description": "Replace typographic look-alikes (curly quotes, dashes, ellipsis, odd "
        "spaces) with GSM-7 characters when that makes the message GSM-7.",
    }
    token = {
        "type": "string",
        "maxLength": MAX_TOKEN_CHARS,
        "description": "The quote_token of POST /api/quote. Omit it for a one-shot send: the "
        "server quotes the message itself and challenges for that price.",
    }
    return {
        "QuoteRequest": _obj(
            {"message": message, "to": to, "smart_encoding": smart},
            ["message", "to"],
            additionalProperties=False,
        ),
        "SendRequest": _obj(
            {"message": message, "to": to, "quote_token": token, "smart_encoding": smart},
            ["message", "to"],
            additionalProperties=False,
        ),
    }


def _quote_schemas() -> dict[str, Any]:
    usage = _obj(
        {
            "model": STR,
            "input_tokens": INT,
            "output_tokens": INT,
            "thinking_tokens": INT,
            "cached": {
                "type": "boolean",
                "description": "The verdict came from the cache; moderation_cost_usd is 0.",
            },
        },
        ["model", "input_tokens", "output_tokens", "thinking_tokens", "cached"],
    )
    payment = _obj(
        {
            "protocol": {"const": "x402"},
            "network": {**STR, "description": "CAIP-2 network, e.g. eip155:84532."},
            "amount_usd": USD,
            "amount_atomic": ATOMIC,
            "asset": ADDRESS,
            "recipient": ADDRESS,
        },
        ["protocol", "network", "amount_usd", "amount_atomic", "asset", "recipient"],
    )
    next_step = _obj(
        {
            "method": {"const": "POST"},
            "path": {"const": "/api/send"},
            "body": _obj(
                {"message": STR, "to": STR, "quote_token": STR}, ["message", "to", "quote_token"]
            ),
            "payment": payment,
        },
        ["method", "path", "body", "payment"],
    )
    smart = _obj(
        {
            "applied": {"type": "boolean"},
            "text": {**STR, "description": "The text that will be sent."},
            "encoding_before": {"enum": ["GSM-7", "UCS-2"]},
            "segments_before": INT,
            "segments_saved": INT,
            "savings_usd": USD,
        },
        ["applied", "text", "encoding_before", "segments_before", "segments_saved", "savings_usd"],
    )
    quote = _obj(
        {
            "approved": {"const": True},
            "category": {"enum": list(MODERATION_CATEGORIES)},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "segments": {"type": "integer", "minimum": 1},
            "encoding": {"enum": ["GSM-7", "UCS-2"]},
            "sms_price_usd": USD,
            "moderation_cost_usd": USD,
            "price_usd": {**USD, "description": "sms_price_usd + moderation_cost_usd, 6 dp."},
            "price_atomic": {**ATOMIC, "description": "The authoritative x402 amount."},
            "moderation_usage": usage,
            "to_normalized": {**STR, "description": "E.164; the value the token is bound to."},
            "quote_token": STR,
            "expires_in_seconds": INT,
            "next_step": next_step,
            "smart_encoding": {**smart, "description": "Present when smart_encoding was asked."},
        },
        [
            "approved",
            "category",
            "confidence",
            "segments",
            "encoding",
            "sms_price_usd",
            "moderation_cost_usd",
            "price_usd",
            "price_atomic",
            "moderation_usage",
            "to_normalized",
            "quote_token",
            "expires_in_seconds",
            "next_step",
        ],
    )
    return {"Quote": quote}


def _send_schemas() -> dict[str, Any]:
    sent = _obj(
        {
            "sent": {"const": True},
            "message_id": {**STR, "description": "Use with GET /api/messages/{message_id}."},
            "status": {"enum": list(MESSAGE_STATUSES)},
            "to": STR,
            "segments": INT,
            "price_usd": USD,
            "paid_by": ADDRESS,
            "transaction": {**STR, "description": "The settlement transaction hash."},
        },
        ["sent", "message_id", "status", "to", "segments", "price_usd", "paid_by", "transaction"],
    )
    refund = {
        "type": ["object", "null"],
        "properties": {
            "transaction": TX_HASH,
            "amount_atomic": ATOMIC,
            "state": {"enum": [state.value for state in RefundState]},
        },
    }
    status = _obj(
        {
            "message_id": STR,
            "status": {"enum": list(MESSAGE_STATUSES)},
            "to": {**STR, "description": "Masked destination."},
            "segments": INT,
            "provider": STR,
            "created_at": TIMESTAMP,
            "updated_at": TIMESTAMP,
            "events": {
                "type": "array",
                "items": _obj(
                    {"status": STR, "at": TIMESTAMP, "detail": {"type": ["string", "null"]}},
                    ["status", "at"],
                ),
            },
            "payment": _obj(
                {
                    "payer": {"type": ["string", "null"]},
                    "amount_atomic": STR,
                    "price_usd": USD,
                    "network": {"type": ["string", "null"]},
                    "transaction": TX_HASH,
                    "state": {"enum": [*(state.value for state in PaymentState), None]},
                }
            ),
            "refund": refund,
        },
        ["message_id", "status", "to", "segments", "created_at", "updated_at", "events"],
    )
    return {"SendResult": sent, "MessageStatus": status, "Refund": refund}


def _x402_schemas() -> dict[str, Any]:
    v1 = _obj(
        {
            "scheme": {"const": "exact"},
            "network": {**STR, "description": "v1 network name, e.g. base-sepolia."},
            "maxAmountRequired": ATOMIC,
            "resource": STR,
            "description": STR,
            "mimeType": STR,
            "payTo": ADDRESS,
            "maxTimeoutSeconds": INT,
            "asset": ADDRESS,
            "extra": {"type": "object"},
        },
        ["scheme", "network", "maxAmountRequired", "payTo", "asset"],
    )
    accepts_v2 = _obj(
        {
            "scheme": {"const": "exact"},
            "network": {**STR, "description": "CAIP-2 network, e.g. eip155:84532."},
            "amount": ATOMIC,
            "asset": ADDRESS,
            "payTo": ADDRESS,
            "maxTimeoutSeconds": INT,
            "extra": _obj(
                {"name": STR, "version": STR, "paymentFlow": {"const": "upfront"}},
                description="EIP-712 domain of the token, and the payment flow.",
            ),
        },
        ["scheme", "network", "amount", "asset", "payTo"],
    )
    required = _obj(
        {
            "x402Version": {"const": 2},
            "error": {"type": ["string", "null"]},
            "resource": _obj({"url": STR, "description": STR, "mimeType": STR}),
            "accepts": {"type": "array", "items": accepts_v2},
            "extensions": {
                "type": "object",
                "description": "Declares payment-identifier: put a 16-128 character id "
                "([A-Za-z0-9_-]) in the payload's extensions.payment-identifier.info.id.",
            },
        },
        ["x402Version", "accepts"],
        description="The JSON inside the base64 PAYMENT-REQUIRED header (x402 v2).",
    )
    return {"X402AcceptV1": v1, "X402PaymentRequired": required}


def _error_schemas() -> dict[str, Any]:
    classes = _error_classes()
    table = "\n".join(
        f"- `{code}` ({cls.status}{', retryable' if cls.retryable else ''}): "
        f"{WHEN.get(code, cls.default_message)}"
        for code, cls in classes.items()
    )
    error = _obj(
        {
            "error": {
                "type": "string",
                "enum": list(classes),
                "description": "Stable code; branch on this, never on message.\n\n" + table,
            },
            "message": STR,
            "retryable": {"type": "boolean"},
            "retry_after_seconds": {
                "type": ["integer", "null"],
                "description": "Also sent as the Retry-After header when set.",
            },
            "details": {"type": "object"},
        },
        ["error", "message", "retryable", "retry_after_seconds", "details"],
        description="Every error has this shape; some codes add fields (see the responses).",
    )
    return {
        "Error": error,
        "PaymentRequiredError": _extends_error(
            "402: the challenge (payment_required) or a failed payment. The body carries x402 "
            "v1 fields (x402Version 1, accepts) for v1 clients; v2 clients read the "
            "PAYMENT-REQUIRED header.",
            {
                "protocol": {"const": "x402"},
                "price_usd": USD,
                "how_to_pay": STR,
                "x402Version": {"const": 1},
                "accepts": {"type": "array", "items": _schema("X402AcceptV1")},
                "price_rule": _obj(
                    {
                        "per_segment_usd": USD,
                        "plus": STR,
                        "max_segments": INT,
                        "how_to_quote": STR,
                    },
                    description="Only on a bare probe (POST /api/send with no body).",
                ),
                "reason": {
                    **STR,
                    "description": "Facilitator reason, e.g. "
                    "invalid_exact_evm_insufficient_balance.",
                },
            },
        ),
        "RejectedError": _extends_error(
            "422. For `rejected`, the moderation verdict is repeated at the top level.",
            {
                "approved": {"const": False},
                "category": {"enum": list(MODERATION_CATEGORIES)},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                "reason": {"type": ["string", "null"]},
            },
        ),
        "SettlementPendingError": _extends_error(
            "202 settlement_pending: repeat the same request after Retry-After; never pay again.",
            {"transaction": TX_HASH},
        ),
        "DispatchFailedError": _extends_error(
            "502 sinch_send_failed_after_payment: the payment settled but no SMS left.",
            {"transaction": TX_HASH, "refund": _schema("Refund"), "message_id": STR},
        ),
    }


def _misc_schemas() -> dict[str, Any]:
    pricing = _obj(
        {
            "price_per_segment_usd": USD,
            "max_segments": INT,
            "segment_sizes": {
                "type": "object",
                "description": "[single-segment size, size per segment when split]",
                "additionalProperties": {"type": "array", "items": INT},
            },
            "network": STR,
            "asset": ADDRESS,
            "pay_to": ADDRESS,
            "quote_ttl_seconds": INT,
            "moderation": _obj(
                {
                    "provider": {"enum": ["gemini", "rules"]},
                    "model": STR,
                    "input_per_million_usd": USD,
                    "output_per_million_usd": USD,
                }
            ),
            "opt_out_line": STR,
        },
        ["price_per_segment_usd", "max_segments", "network", "asset", "pay_to"],
    )
    health = _obj(
        {
            "status": {"enum": ["ok", "degraded"]},
            "ready": {"type": "boolean"},
            "checks": {"type": "object", "additionalProperties": STR},
        },
        ["status", "ready", "checks"],
    )
    return {"Pricing": pricing, "Health": health}


def _schemas(settings: Settings) -> dict[str, Any]:
    return {
        **_request_schemas(settings),
        **_quote_schemas(),
        **_send_schemas(),
        **_x402_schemas(),
        **_error_schemas(),
        **_misc_schemas(),
    }


# Headers and responses ---------------------------------------------------------------


def _headers() -> dict[str, Any]:
    def header(description: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {"description": description, "schema": schema}

    return {
        "PaymentRequired": header(
            "x402 v2 challenge: base64 of X402PaymentRequired (accepts, resource, extensions).",
            STR,
        ),
        "PaymentResponse": header("x402 v2: base64 of the settlement response.", STR),
        "XPaymentResponse": header("x402 v1: base64 of the settlement response.", STR),
        "RetryAfter": header("Seconds to wait before retrying.", {"type": "integer"}),
    }


def _parameters() -> dict[str, Any]:
    def header(name: str, description: str) -> dict[str, Any]:
        return {
            "name": name,
            "in": "header",
            "required": False,
            "description": description,
            "schema": STR,
        }

    return {
        "PaymentSignature": header(
            "PAYMENT-SIGNATURE",
            "x402 v2: base64 of the signed PaymentPayload (EIP-3009 transferWithAuthorization "
            "for exactly the challenged amount). Resending the same value is idempotent.",
        ),
        "XPayment": header("X-PAYMENT", "x402 v1: base64 of the signed v1 PaymentPayload."),
    }


RETRY_AFTER_CODES = ("unauthorized",)  # the password lock-out sets Retry-After too


def _error_responses(codes: Iterable[str], special: dict[int, str] | None = None) -> dict[str, Any]:
    """One response per status, its schema narrowed to the codes this operation answers."""
    classes = _error_classes()
    by_status: dict[int, list[str]] = {}
    for code in codes:
        by_status.setdefault(classes[code].status, []).append(code)
    special = special or {}
    responses: dict[str, Any] = {}
    for status, found in sorted(by_status.items()):
        base = _schema(special.get(status, "Error"))
        response: dict[str, Any] = {
            "description": "; ".join(
                f"`{c}`: {WHEN.get(c, classes[c].default_message)}" for c in found
            ),
            "content": {
                "application/json": {"schema": {"allOf": [base, _obj({"error": {"enum": found}})]}}
            },
        }
        if any(classes[c].retryable or c in RETRY_AFTER_CODES for c in found):
            response["headers"] = {"Retry-After": _ref("headers", "RetryAfter")}
        responses[str(status)] = response
    return responses


def _json(schema_name: str, description: str, **more: Any) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _schema(schema_name)}},
    }
    response.update(more)
    return response


# Operations --------------------------------------------------------------------------


def _quote_operation(settings: Settings) -> dict[str, Any]:
    return {
        "operationId": "quote",
        "tags": ["sms"],
        "summary": "Moderate and price a message; returns a signed quote_token",
        "description": "Normalises `to` to E.164, counts GSM-7/UCS-2 segments, moderates the "
        "text (free for a cached verdict), prices it and signs a quote token bound to "
        f"(message, destination, price) valid for {settings.quote_ttl_seconds} s. "
        f"Rate limited per client ({settings.quote_rate_limit}).",
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _schema("QuoteRequest")}},
        },
        "responses": {
            "200": _json("Quote", "Approved and priced."),
            **_error_responses(QUOTE_CODES, {422: "RejectedError"}),
        },
    }


def _send_operation(settings: Settings) -> dict[str, Any]:
    payment_headers = {
        "PAYMENT-RESPONSE": _ref("headers", "PaymentResponse"),
        "X-PAYMENT-RESPONSE": _ref("headers", "XPaymentResponse"),
    }
    responses = _error_responses(
        SEND_CODES,
        {
            202: "SettlementPendingError",
            402: "PaymentRequiredError",
            422: "RejectedError",
            502: "DispatchFailedError",
        },
    )
    responses["402"]["headers"] = {"PAYMENT-REQUIRED": _ref("headers", "PaymentRequired")}
    responses["502"]["headers"] = payment_headers
    return {
        "operationId": "send",
        "tags": ["sms"],
        "summary": "Pay with x402 and send the SMS (verify, settle, then dispatch)",
        "description": "Without a payment header: `402` with `PAYMENT-REQUIRED` (v2) and a "
        "v1-readable body. With `PAYMENT-SIGNATURE` (v2) or `X-PAYMENT` (v1) for exactly the "
        "challenged amount: verify, settle on-chain, then dispatch, and `200` with "
        "`PAYMENT-RESPONSE` (`X-PAYMENT-RESPONSE` for v1). `quote_token` may be omitted "
        "(one-shot: the server quotes the text itself, so a stock x402 client sends in one "
        "call). A bare probe (no body) answers 402 describing the price rule. The same "
        "payment payload sent again returns the stored response: never a second charge or "
        "SMS. The x402 `payment-identifier` extension is honoured.",
        "security": [{"PayPassword": []}, {}],
        "parameters": [
            _ref("parameters", "PaymentSignature"),
            _ref("parameters", "XPayment"),
        ],
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": _schema("SendRequest")}},
        },
        "responses": {
            "200": _json(
                "SendResult",
                "Paid, settled and handed to the SMS provider.",
                headers=payment_headers,
            ),
            **responses,
        },
        "x-x402": _x402_info(settings),
    }


def _x402_info(settings: Settings) -> dict[str, Any]:
    return {
        "scheme": "exact",
        "network": settings.x402_network,
        "asset": settings.usdc_address,
        "payTo": settings.pay_to_address,
        "price_per_segment_usd": str(settings.price_per_segment_usd),
        "price": "segments x price_per_segment_usd + moderation token cost, 6 dp",
        "paymentFlow": "upfront",
        "extensions": ["payment-identifier"],
    }


def _message_operation() -> dict[str, Any]:
    return {
        "operationId": "getMessage",
        "tags": ["sms"],
        "summary": "Status of a sent message, with its history, payment and refund",
        "security": [{"PayPassword": []}, {}],
        "parameters": [
            {"name": "message_id", "in": "path", "required": True, "schema": STR},
        ],
        "responses": {
            "200": _json("MessageStatus", "The message."),
            **_error_responses(MESSAGE_CODES),
        },
    }


def _webhook_operation() -> dict[str, Any]:
    def signature(name: str) -> dict[str, Any]:
        return {
            "name": name,
            "in": "header",
            "required": False,
            "description": "Sinch HMAC signing; checked when SINCH_SIGNING_SECRET is set.",
            "schema": STR,
        }

    return {
        "operationId": "sinchCallback",
        "tags": ["provider"],
        "summary": "Sinch delivery reports and inbound texts (STOP/START opt-out)",
        "description": "For the SMS provider, not for agents. A wrong secret answers 404.",
        "parameters": [
            {
                "name": "secret",
                "in": "path",
                "required": True,
                "description": "SINCH_CALLBACK_SECRET.",
                "schema": STR,
            },
            signature("x-sinch-webhook-signature"),
            signature("x-sinch-webhook-signature-nonce"),
            signature("x-sinch-webhook-signature-timestamp"),
        ],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        "responses": {
            "200": {
                "description": "Applied; or, with `duplicate`, a replay of a signed call "
                "already applied, acknowledged and not applied again.",
                "content": {
                    "application/json": {
                        "schema": _obj(
                            {"ok": {"const": True}, "duplicate": {"const": True}}, ["ok"]
                        )
                    }
                },
            },
            **_error_responses(WEBHOOK_CODES),
        },
    }


def _plain_operations() -> dict[str, Any]:
    errors = _error_responses(PLAIN_CODES)
    return {
        "/api/pricing": {
            "get": {
                "operationId": "getPricing",
                "tags": ["sms"],
                "summary": "Per-segment price, network, asset, payTo, quote TTL, moderation",
                "responses": {"200": _json("Pricing", "The price list."), **errors},
            }
        },
        "/health": {
            "get": {
                "operationId": "health",
                "tags": ["meta"],
                "summary": "Liveness and readiness",
                "parameters": [
                    {
                        "name": "strict",
                        "in": "query",
                        "required": False,
                        "schema": {"enum": ["1", "true"]},
                        "description": "Answer 503 unless the database and the chain are ready.",
                    }
                ],
                "responses": {
                    "200": _json("Health", "Alive (and, with strict, ready)."),
                    "503": _json("Health", "The database, or with strict the chain, is down."),
                    **errors,
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "tags": ["meta"],
                "summary": "This OpenAPI 3.1 document",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    **errors,
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "tags": ["meta"],
                "summary": "Prometheus metrics, for the operator",
                "description": "Answers 404 unless METRICS_TOKEN is set; then requires "
                "`Authorization: Bearer <METRICS_TOKEN>`.",
                "security": [{"MetricsToken": []}],
                "responses": {
                    "200": {
                        "description": "The Prometheus text format, version 0.0.4.",
                        "content": {"text/plain": {"schema": STR}},
                    },
                    **_error_responses(METRICS_CODES),
                },
            }
        },
        "/llms.txt": {
            "get": {
                "operationId": "llmsTxt",
                "tags": ["meta"],
                "summary": "A short plain-text guide for agents",
                "responses": {
                    "200": {
                        "description": "Markdown-flavoured plain text.",
                        "content": {"text/plain": {"schema": STR}},
                    },
                    **errors,
                },
            }
        },
    }


def _package_version() -> str:
    try:
        return version("relay")
    except PackageNotFoundError:
        return "0.0.0"


def openapi_document(settings: Settings) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every endpoint, for these settings."""
    document: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "x402 SMS relay",
            "version": _package_version(),
            "summary": "Pay-per-message SMS for software agents: LLM-moderated quotes, x402 "
            "USDC payments, Sinch dispatch.",
            "description": "Quote (POST /api/quote), then POST /api/send: a 402 challenge, then "
            "the same request with an x402 payment. Errors are `{error, message, retryable, "
            "retry_after_seconds, details}` with a stable `error` code whose HTTP status is "
            "fixed (see `x-error-codes`). A guide for agents is at /llms.txt.",
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "tags": [
            {"name": "sms", "description": "Quote, pay, send and track SMS."},
            {"name": "provider", "description": "Callbacks from the SMS provider."},
            {"name": "meta", "description": "Health and documentation."},
        ],
        "paths": {
            "/api/quote": {"post": _quote_operation(settings)},
            "/api/send": {"post": _send_operation(settings)},
            "/api/messages/{message_id}": {"get": _message_operation()},
            "/webhooks/sinch/{secret}": {"post": _webhook_operation()},
            **_plain_operations(),
        },
        "components": {
            "schemas": _schemas(settings),
            "headers": _headers(),
            "parameters": _parameters(),
            "securitySchemes": {
                "PayPassword": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-Pay-Password",
                    "description": "Required on /api/send and /api/messages when the operator "
                    "sets PAY_PASSWORD (send it on both the unpaid and the paid request). "
                    "Repeated failures lock the client out (401 with Retry-After).",
                },
                "MetricsToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "METRICS_TOKEN, for /metrics.",
                },
            },
        },
        "x-error-codes": error_codes(),
    }
    if settings.public_base_url:
        document["servers"] = [{"url": settings.public_base_url.rstrip("/")}]
    return document


# llms.txt ----------------------------------------------------------------------------


def _error_lines() -> list[str]:
    lines = ["| code | HTTP | retryable | when |", "|---|---|---|---|"]
    for code, cls in _error_classes().items():
        retry = "yes" if cls.retryable else "no"
        lines.append(
            f"| `{code}` | {cls.status} | {retry} | {WHEN.get(code, cls.default_message)} |"
        )
    return lines


def llms_txt(settings: Settings) -> str:
    """The plain-text guide for agents (llmstxt.org style), for these settings."""
    base = (settings.public_base_url or "").rstrip("/")
    price = settings.price_per_segment_usd
    password = "required here" if settings.pay_password else "not set here, so optional"
    moderation = settings.gemini_model if settings.moderation_provider == "gemini" else "rules"
    lines = [
        "# x402 SMS relay",
        "",
        "> Send one SMS per request and pay for it in USDC over x402. Every message is "
        "moderated by an LLM before anyone pays; payment is settled on-chain before the "
        "SMS leaves. No account, no API key: the payment is the authorisation.",
        "",
        f"- OpenAPI 3.1 (source of truth): {base}/openapi.json",
        f"- Price list: {base}/api/pricing",
        "",
        "## Flow",
        "",
        '1. `POST /api/quote {"message", "to"}` -> 200 with `price_usd`, `price_atomic`, '
        f"`quote_token` (valid {settings.quote_ttl_seconds} s), `to_normalized` and `next_step`;",
        "   or 422 `rejected` (moderation said no; nothing to pay).",
        '2. `POST /api/send {"message", "to", "quote_token"}` without payment -> 402 with '
        "the `PAYMENT-REQUIRED` header",
        "   (base64 JSON, x402 v2: `accepts[0]` has scheme exact, network, amount, asset, "
        "payTo, extra {name, version}).",
        "3. Sign an EIP-3009 `transferWithAuthorization` for exactly `amount` to `payTo` and "
        "repeat the SAME request",
        "   with `PAYMENT-SIGNATURE: <base64 PaymentPayload>` (v1 clients: `X-PAYMENT`).",
        "4. 200 `{sent, message_id, status, to, segments, price_usd, paid_by, transaction}` "
        "with `PAYMENT-RESPONSE`",
        "   (v1: `X-PAYMENT-RESPONSE`). Track it: `GET /api/messages/{message_id}`.",
        "",
        "One-shot: omit `quote_token`. The server quotes the text itself and challenges for "
        "that price, so a stock",
        "x402 client (`@x402/fetch` wrapFetchWithPayment, PyPI `x402` httpx/requests) sends "
        "in a single call.",
        "A bare `POST /api/send` with no body answers 402 with the price rule.",
        "",
        "## Headers",
        "",
        "- `PAYMENT-REQUIRED` (response, 402): base64 x402 v2 challenge. The JSON body also "
        "has v1 `x402Version: 1, accepts`.",
        "- `PAYMENT-SIGNATURE` (request): base64 x402 v2 PaymentPayload. `X-PAYMENT`: the "
        "v1 equivalent.",
        "- `PAYMENT-RESPONSE` / `X-PAYMENT-RESPONSE` (response): base64 settlement result "
        "(v2 / v1).",
        f"- `X-Pay-Password` (request): operator's shared password, {password}; send it on "
        "/api/send (both passes)",
        "  and /api/messages. Wrong or missing: 401 `unauthorized`; repeated failures lock "
        "you out (Retry-After).",
        "- `Retry-After` (response): seconds to wait, on 429, 503, 409 `request_in_progress`, "
        "202 `settlement_pending`.",
        "",
        "## Price",
        "",
        f"- price_usd = segments x {price} USD + the moderation call's token cost, rounded "
        "half-up to 6 decimals;",
        "  amount (atomic) = price_usd x 10^6. The token cost is 0 when the verdict is "
        "cached; a one-shot send",
        "  always charges it, so the unpaid and paid requests agree.",
        f"- network `{settings.x402_network}`, asset (USDC) `{settings.usdc_address}`, "
        f"payTo `{settings.pay_to_address}`",
        "- Segments: GSM-7 160 chars (153 per part when split), otherwise UCS-2 70 (67). "
        f"At most {settings.max_segments} segments.",
        "- `smart_encoding: true` swaps curly quotes, dashes and the like for GSM-7 "
        "characters to save segments.",
        f"- Moderation ({moderation}) runs at quote time, before any payment.",
        f'- Every SMS ends with the opt-out line "{settings.opt_out_line}"; it is not billed.',
        "",
        "## Idempotency and retries",
        "",
        "- Resending the same payment payload returns the stored response (body and "
        "PAYMENT-RESPONSE): never a",
        "  second charge or SMS. While the first is still running: 409 `request_in_progress` "
        "with Retry-After.",
        "- x402 `payment-identifier` extension (advertised in PAYMENT-REQUIRED): put an id "
        "(16-128 of [A-Za-z0-9_-])",
        '  in `extensions["payment-identifier"].info.id` of your payload. Same id + same '
        "payload -> stored response;",
        "  same id + another payload -> 409 `idempotency_key_reused`.",
        "- 202 `settlement_pending`: the transaction is broadcast but unconfirmed. Repeat the "
        "SAME request (do not",
        "  sign a new payment) after Retry-After, or poll /api/messages.",
        "- One quote pays for one SMS: reusing it is 409 `quote_already_used`. Quote again "
        "after 400 `quote_expired`.",
        "- 502 `sinch_send_failed_after_payment`: paid, not sent; the body has the "
        "transaction and any refund.",
        "",
        "## Errors",
        "",
        'Every error: `{"error": code, "message", "retryable", "retry_after_seconds", "details"}`.',
        "Branch on `error`, never on `message`. The status of each code is fixed:",
        "",
        *_error_lines(),
        "",
        "## Other endpoints",
        "",
        "- `GET /api/pricing`: the price list. `GET /health`: liveness and readiness.",
        "- `GET /api/messages/{message_id}`: queued, dispatched, delivered, failed or refunded, "
        "with history.",
        "- `GET /openapi.json`: every request and response schema. `GET /llms.txt`: this file.",
    ]
    return "\n".join(lines) + "\n"


# Routes ------------------------------------------------------------------------------


def _settings() -> Settings:
    found: Settings = current_app.extensions["relay"].settings
    return found


def _public(response: Response) -> Response:
    response.headers["Cache-Control"] = "public, max-age=300"
    response.headers["Access-Control-Allow-Origin"] = "*"
    return response


@docs.get("/openapi.json")
def get_openapi() -> Response:
    """The OpenAPI 3.1 document."""
    body = simplejson.dumps(openapi_document(_settings()), use_decimal=True)
    return _public(Response(body, mimetype="application/json"))


@docs.get("/llms.txt")
def get_llms_txt() -> Response:
    """The plain-text guide for agents."""
    return _public(Response(llms_txt(_settings()), content_type="text/plain; charset=utf-8"))
