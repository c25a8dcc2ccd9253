"""The OpenAPI 3.1 document (GET /openapi.json).

What is written here is what only a person can say: the operations (paths, parameters,
which status and error code each answers) and what each error code means to a caller.
Every schema is generated from the models in ``relay.wire`` (and ``relay.errors.ErrorBody``);
the code -> status table and the retryable flags come from ``relay.errors``.
``tests/test_docs.py`` checks the document against the answers the app actually sends.

Over 500 lines on purpose: it is one document, an operation a function, read top to bottom;
split across modules it would have to be pieced together again to be read.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, models_json_schema

from relay import wire
from relay.errors import RelayError, all_error_classes
from relay.settings import Settings

OPENAPI_VERSION = "3.1.0"
REF_TEMPLATE = "#/components/schemas/{model}"

# Codes any request can meet, whatever the operation.
GLOBAL_CODES = ("not_found", "method_not_allowed", "internal_error")
# Codes raised by the Python client (relay.client) before any request; never sent by the server.
CLIENT_ONLY_CODES = ("price_limit_exceeded", "payment_terms_mismatch", "budget_exceeded")

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
    "storage_unavailable": "the shared rate-limit and verdict storage (Redis) is unreachable; "
    "retry after Retry-After",
    "delivery_report_too_early": "a delivery report about a message handed over but not yet "
    "recorded; Sinch sends it again later",
    "settlement_pending": "not a failure: settlement broadcast, not yet confirmed; repeat the "
    "same request (same payment header) after Retry-After",
    "price_limit_exceeded": "client only: the quoted price is above your max_price_usd; "
    "nothing was signed",
    "payment_terms_mismatch": "client only: the 402 asked for another amount, network, asset "
    "or payee than the quote, or for an authorization valid too long; nothing was signed",
    "budget_exceeded": "client only (`relay mcp`): the send would overspend MCP_BUDGET_USD; "
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
# A send may quote (one-shot), so it answers every quote code too.
SEND_CODES = (
    *QUOTE_CODES,
    "settlement_pending",
    "quote_content_mismatch",
    "quote_expired",
    "unauthorized",
    "payment_required",
    "payment_verify_failed",
    "payment_settlement_failed",
    "quote_already_used",
    "request_in_progress",
    "idempotency_key_reused",
    "sinch_send_failed_after_payment",
    "chain_unavailable",
)
MESSAGE_CODES = ("unauthorized", "not_found", "internal_error")
WEBHOOK_CODES = (
    "invalid_input",
    "unauthorized",
    "not_found",
    "payload_too_large",
    "delivery_report_too_early",
    "internal_error",
)
PLAIN_CODES = ("internal_error",)
METRICS_CODES = ("unauthorized", "not_found", "internal_error")


def _error_classes() -> dict[str, type[RelayError]]:
    return {cls.code: cls for cls in all_error_classes()}


def error_codes() -> dict[str, int]:
    """Every stable error code and its fixed HTTP status, from relay.errors."""
    return {code: cls.status for code, cls in _error_classes().items()}


def operation_codes() -> dict[str, tuple[str, ...]]:
    """The error codes each documented operation can answer."""
    return {
        "POST /api/quote": QUOTE_CODES,
        "POST /api/send": SEND_CODES,
        "GET /api/messages/{message_id}": MESSAGE_CODES,
        "POST /webhooks/sinch/{secret}": WEBHOOK_CODES,
    }


# Schemas -----------------------------------------------------------------------------


class _Untitled(GenerateJsonSchema):
    """JSON Schema without a title on every property (the names say it)."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        """Never: a property's name is its title."""
        return False


@cache
def component_schemas(max_message_chars: int) -> dict[str, Any]:
    """components.schemas, generated from the wire models (once per message bound; the
    result is shared, callers copy before changing it)."""
    quote_request, send_request = wire.request_models(max_message_chars)
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (quote_request, "validation"),
        (send_request, "validation"),
        *((model, "serialization") for model in wire.ANSWERS),
    ]
    _, top = models_json_schema(models, ref_template=REF_TEMPLATE, schema_generator=_Untitled)
    schemas: dict[str, Any] = top["$defs"]
    schemas["ErrorBody"]["properties"]["error"]["description"] += "\n\n" + _code_table()
    return schemas


def _code_table() -> str:
    return "\n".join(
        f"- `{code}` ({cls.status}{', retryable' if cls.retryable else ''}): {when(cls)}"
        for code, cls in _error_classes().items()
    )


def when(cls: type[RelayError]) -> str:
    """What an error code means to a caller."""
    return WHEN.get(cls.code, cls.default_message)


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _schema(name: str) -> dict[str, str]:
    return _ref("schemas", name)


STR: dict[str, Any] = {"type": "string"}


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
        base = _schema(special.get(status, "ErrorBody"))
        narrowed = {"type": "object", "properties": {"error": {"enum": found}}}
        response: dict[str, Any] = {
            "description": "; ".join(f"`{c}`: {when(classes[c])}" for c in found),
            "content": {"application/json": {"schema": {"allOf": [base, narrowed]}}},
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
            "200": _json(
                "WebhookAck",
                "Applied; or, with `duplicate`, a replay of a signed call already applied, "
                "acknowledged and not applied again.",
            ),
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


def _callback_operation() -> dict[str, Any]:
    """What the relay POSTs to a send's callback_url (Standard Webhooks)."""
    return {
        "summary": "An event about a paid message, POSTed to its callback_url",
        "description": "Signed per Standard Webhooks: `webhook-id` (stable per event, the same "
        "on every retry), `webhook-timestamp` and `webhook-signature` (`v1,` + base64 "
        "HMAC-SHA256 of `id.timestamp.body`) with the message's `webhook.secret` from the "
        "paid answer. Sent at least once, retried with backoff for about a day until the "
        "endpoint answers 2xx.",
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _schema("WebhookEvent")}},
        },
        "responses": {"2XX": {"description": "Taken; any other answer is retried."}},
    }


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
        "webhooks": {"messageEvent": {"post": _callback_operation()}},
        "components": {
            "schemas": copy.deepcopy(component_schemas(settings.max_message_chars)),
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
