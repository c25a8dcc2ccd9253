"""Every JSON body on the wire, as one model each: requests are parsed with them, answers
built with them, and the OpenAPI components generated from them (relay/openapi.py), so the
document cannot drift from the code.

The error shape every failure carries is ``relay.errors.ErrorBody``; the models here that
extend it name the fields some codes add. States come from ``relay.states``, moderation
categories from ``relay.moderation``, encodings from ``relay.segments``.
"""

from __future__ import annotations

from decimal import Decimal
from functools import cache
from typing import Annotated, Any, Literal

import simplejson
from pydantic import BaseModel, ConfigDict, Field, Strict, WithJsonSchema, create_model
from pydantic.json_schema import SkipJsonSchema

from relay.errors import ErrorBody
from relay.moderation import Category
from relay.segments import Encoding
from relay.states import MessageState, PaymentState, RefundState

MAX_TO_CHARS = 64
MAX_TOKEN_CHARS = 2048
MAX_CALLBACK_CHARS = 2048


_ENCODER = simplejson.JSONEncoder(use_decimal=True)


def to_json(obj: Any, **options: Any) -> str:
    """The JSON text of an answer: Decimal amounts written as exact numbers, never floats."""
    if options:
        return simplejson.dumps(obj, use_decimal=True, **options)
    return _ENCODER.encode(obj)


class WireModel(BaseModel):
    """A JSON body: exact types (no coercion), no field the model does not name."""

    model_config = ConfigDict(extra="forbid", strict=True, use_enum_values=True)


class _ErrorWithFields(ErrorBody):
    """An error body with the fields its codes add, and nothing else."""

    model_config = WireModel.model_config


def _absent(value: object) -> bool:
    return value is None


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def _omitted_when_none(description: str | None = None) -> Any:
    """A field left out of the JSON when it has no value (never written as null)."""
    return Field(
        default=None, exclude_if=_absent, description=description, json_schema_extra=_no_default
    )


# Money is Decimal end to end: an exact JSON number, never a float on the way.
Usd = Annotated[
    Decimal,
    Strict(),
    WithJsonSchema(
        {
            "type": "number",
            "minimum": 0,
            "description": "US dollars, exact decimal with at most 6 decimals.",
        }
    ),
]
Atomic = Annotated[
    str,
    Field(pattern=r"^[0-9]+$", description="USDC atomic units (10^-6 USD), a decimal string."),
]
Address = Annotated[str, Field(pattern=r"^0x[0-9a-fA-F]{40}$")]
TxHash = Annotated[str | None, Field(description="Transaction hash.")]
Timestamp = Annotated[float, Field(description="Unix time in seconds.")]
Confidence = Annotated[float, Field(ge=0, le=1)]
Network = Annotated[str, Field(description="CAIP-2 network, e.g. eip155:84532.")]
# States are read back from the ledger as their stored values.
StoredMessageState = Annotated[MessageState, Strict(False)]
StoredPaymentState = Annotated[PaymentState, Strict(False)]
StoredRefundState = Annotated[RefundState, Strict(False)]
Reachability = Literal["ok", "unreachable"]
EventType = Literal["message.dispatched", "message.delivered", "message.failed", "message.refunded"]


# Requests ----------------------------------------------------------------------------

MESSAGE_HELP = "The SMS text. Priced as submitted; the opt-out line is added at dispatch."


class _Message(WireModel):
    model_config = ConfigDict(frozen=True)

    message: str = Field(description=MESSAGE_HELP)
    to: str = Field(
        max_length=MAX_TO_CHARS,
        description="Destination in any common format; normalised to E.164 (default region US).",
        examples=["+13012576365", "(301) 257-6365"],
    )
    smart_encoding: bool = Field(
        default=False,
        description="Replace typographic look-alikes (curly quotes, dashes, ellipsis, odd "
        "spaces) with GSM-7 characters when that makes the message GSM-7.",
    )


class QuoteRequest(_Message):
    """The body of POST /api/quote."""

    @property
    def quote_token(self) -> None:
        """A quote request carries no token (so flows read either request alike)."""
        return None


class SendRequest(_Message):
    """The body of POST /api/send."""

    quote_token: str | None = Field(
        default=None,
        max_length=MAX_TOKEN_CHARS,
        description="The quote_token of POST /api/quote. Omit it for a one-shot send: the "
        "server quotes the message itself and challenges for that price.",
    )
    callback_url: str | None = Field(
        default=None,
        max_length=MAX_CALLBACK_CHARS,
        description="An https URL to POST signed events about this message to "
        "(message.dispatched, message.delivered, message.failed, message.refunded), per "
        "Standard Webhooks, verified with the secret in the paid answer's `webhook`.",
    )


MessageRequest = QuoteRequest | SendRequest


@cache
def request_models(max_message_chars: int) -> tuple[type[QuoteRequest], type[SendRequest]]:
    """The request models with ``message`` bounded by MAX_SEGMENTS
    (Settings.max_message_chars): built once per bound, for the parser and the document."""
    message: Any = (str, Field(max_length=max_message_chars, description=MESSAGE_HELP))
    return (
        create_model(
            "QuoteRequest",
            __base__=QuoteRequest,
            __doc__=QuoteRequest.__doc__,
            __module__=__name__,
            message=message,
        ),
        create_model(
            "SendRequest",
            __base__=SendRequest,
            __doc__=SendRequest.__doc__,
            __module__=__name__,
            message=message,
        ),
    )


# POST /api/quote ---------------------------------------------------------------------


class ModerationUsage(WireModel):
    """What the moderation call used."""

    model: str
    input_tokens: int
    output_tokens: int
    thinking_tokens: int
    cached: bool = Field(description="The verdict came from the cache; moderation_cost_usd is 0.")


class PaymentInstructions(WireModel):
    """The x402 payment the quote asks for."""

    protocol: Literal["x402"]
    network: Network
    amount_usd: Usd
    amount_atomic: Atomic
    asset: Address
    recipient: Address


class NextStepBody(WireModel):
    """The body to send to POST /api/send."""

    message: str
    to: str
    quote_token: str


class NextStep(WireModel):
    """How to pay for the quote."""

    method: Literal["POST"]
    path: Literal["/api/send"]
    body: NextStepBody
    payment: PaymentInstructions


class SmartEncoding(WireModel):
    """What smart encoding changed and saved."""

    applied: bool
    text: str = Field(description="The text that will be sent.")
    encoding_before: Encoding
    segments_before: int
    segments_saved: int
    savings_usd: Usd


class Quote(WireModel):
    """The 200 of POST /api/quote: approved, priced and signed."""

    approved: Literal[True]
    category: Category
    confidence: Confidence
    segments: int = Field(ge=1)
    encoding: Encoding
    sms_price_usd: Usd
    moderation_cost_usd: Usd
    price_usd: Usd = Field(description="sms_price_usd + moderation_cost_usd, 6 dp.")
    price_atomic: Atomic = Field(description="The authoritative x402 amount.")
    moderation_usage: ModerationUsage
    to_normalized: str = Field(description="E.164; the value the token is bound to.")
    quote_token: str
    expires_in_seconds: int
    next_step: NextStep
    smart_encoding: SmartEncoding | SkipJsonSchema[None] = _omitted_when_none(
        "Present when smart_encoding was asked."
    )


# POST /api/send and GET /api/messages/{message_id} ----------------------------------------


class WebhookInfo(WireModel):
    """Where this message's events go, and the secret that signs them."""

    url: str
    secret: str = Field(
        description="whsec_… : verify each event's webhook-signature with it (Standard Webhooks)."
    )
    events: list[EventType]


class WebhookEvent(WireModel):
    """The body of an event POSTed to a callback_url."""

    type: EventType
    timestamp: str = Field(description="When it happened (ISO 8601, UTC).")
    data: EventData


class EventData(WireModel):
    """What an event is about."""

    message_id: str
    status: StoredMessageState
    to: str = Field(description="Masked destination.")
    transaction: str | None = Field(description="The settlement transaction hash.")
    refund: Refund | SkipJsonSchema[None] = _omitted_when_none()


class SendResult(WireModel):
    """The 200 of POST /api/send: paid, settled and handed to the SMS provider."""

    sent: Literal[True]
    message_id: str = Field(description="Use with GET /api/messages/{message_id}.")
    status: StoredMessageState
    to: str
    segments: int
    price_usd: Usd
    paid_by: Address
    transaction: str = Field(description="The settlement transaction hash.")
    webhook: WebhookInfo | SkipJsonSchema[None] = _omitted_when_none()


class Refund(WireModel):
    """The refund of a payment whose SMS could not be sent."""

    transaction: TxHash
    amount_atomic: Atomic
    state: StoredRefundState


class Event(WireModel):
    """One step of a message's history."""

    status: StoredMessageState
    at: Timestamp
    detail: str | None


class PaymentSummary(WireModel):
    """The payment behind a message."""

    payer: str | None
    amount_atomic: Atomic
    price_usd: Usd
    network: str | None
    transaction: TxHash
    state: StoredPaymentState | None


class MessageStatus(WireModel):
    """The 200 of GET /api/messages/{message_id}: status, history, payment and refund."""

    message_id: str
    status: StoredMessageState
    to: str = Field(description="Masked destination.")
    segments: int
    provider: str
    created_at: Timestamp
    updated_at: Timestamp
    events: list[Event]
    payment: PaymentSummary
    refund: Refund | None


# x402 ---------------------------------------------------------------------------------


class X402AcceptV1(WireModel):
    """An x402 v1 payment requirement, as v1 clients read it from the 402 body."""

    scheme: Literal["exact"]
    network: str = Field(description="v1 network name, e.g. base-sepolia.")
    maxAmountRequired: Atomic
    resource: str
    description: str
    mimeType: str
    payTo: Address
    maxTimeoutSeconds: int
    asset: Address
    extra: dict[str, Any]


class X402Extra(WireModel):
    """The token's EIP-712 domain, and the payment flow."""

    name: str
    version: str
    paymentFlow: Literal["upfront"]


class X402AcceptV2(WireModel):
    """An x402 v2 payment requirement."""

    scheme: Literal["exact"]
    network: Network
    amount: Atomic
    asset: Address
    payTo: Address
    maxTimeoutSeconds: int
    extra: X402Extra


class X402Resource(WireModel):
    """What is paid for."""

    url: str
    description: str
    mimeType: str


class X402PaymentRequired(WireModel):
    """The JSON inside the base64 PAYMENT-REQUIRED header (x402 v2)."""

    x402Version: Literal[2]
    error: str | None
    resource: X402Resource
    accepts: list[X402AcceptV2]
    extensions: dict[str, Any] = Field(
        description="Declares payment-identifier: put a 16-128 character id ([A-Za-z0-9_-]) "
        "in the payload's extensions.payment-identifier.info.id."
    )


# Errors that add fields --------------------------------------------------------------


class PriceRule(WireModel):
    """How a message is priced (on a bare probe: POST /api/send with no body)."""

    per_segment_usd: Usd
    plus: str
    max_segments: int
    how_to_quote: str


class PaymentRequiredError(_ErrorWithFields):
    """402: the challenge (payment_required) or a failed payment. The challenge carries x402
    v1 fields (x402Version 1, accepts) for v1 clients; v2 clients read the PAYMENT-REQUIRED
    header."""

    protocol: Literal["x402"] | SkipJsonSchema[None] = _omitted_when_none()
    price_usd: Usd | SkipJsonSchema[None] = _omitted_when_none()
    how_to_pay: str | SkipJsonSchema[None] = _omitted_when_none()
    x402Version: Literal[1] | SkipJsonSchema[None] = _omitted_when_none()
    accepts: list[X402AcceptV1] | SkipJsonSchema[None] = _omitted_when_none()
    price_rule: PriceRule | SkipJsonSchema[None] = _omitted_when_none()
    reason: str | SkipJsonSchema[None] = _omitted_when_none(
        "Facilitator reason, e.g. invalid_exact_evm_insufficient_balance."
    )
    transaction: TxHash = _omitted_when_none()


class RejectedError(_ErrorWithFields):
    """422. For ``rejected``, the moderation verdict is repeated at the top level."""

    approved: Literal[False] | SkipJsonSchema[None] = _omitted_when_none()
    category: Category | SkipJsonSchema[None] = _omitted_when_none()
    confidence: Confidence | SkipJsonSchema[None] = _omitted_when_none()
    reason: str | None = _omitted_when_none()


class SettlementPendingError(_ErrorWithFields):
    """202 settlement_pending: repeat the same request after Retry-After; never pay again."""

    transaction: TxHash


class DispatchFailedError(_ErrorWithFields):
    """502 sinch_send_failed_after_payment: the payment settled but no SMS left."""

    transaction: TxHash
    refund: Refund | None = _omitted_when_none()
    message_id: str | SkipJsonSchema[None] = _omitted_when_none()


# Other answers -----------------------------------------------------------------------


class ModerationPrices(WireModel):
    """Who moderates, and the token prices the quote passes on."""

    provider: Literal["gemini", "rules"]
    model: str
    input_per_million_usd: Usd
    output_per_million_usd: Usd


class Pricing(WireModel):
    """The 200 of GET /api/pricing."""

    price_per_segment_usd: Usd
    max_segments: int
    segment_sizes: dict[Encoding, list[int]] = Field(
        description="[single-segment size, size per segment when split]"
    )
    network: Network
    asset: Address
    pay_to: Address
    quote_ttl_seconds: int
    moderation: ModerationPrices
    opt_out_line: str


class HealthChecks(WireModel):
    """Each dependency: reachable or not; the providers by name."""

    database: Reachability
    chain: Reachability
    rate_limit_storage: Reachability
    moderation: Literal["gemini", "rules"]
    sms: Literal["sinch", "outbox"]


class Health(WireModel):
    """GET /health: alive, and ready when every dependency is."""

    status: Literal["ok", "degraded"]
    ready: bool
    checks: HealthChecks


class WebhookAck(WireModel):
    """The 200 of a Sinch callback: applied; or, with ``duplicate``, a replay of a signed
    call already applied, acknowledged and not applied again."""

    ok: Literal[True]
    duplicate: Literal[True] | SkipJsonSchema[None] = _omitted_when_none()


#: The answers the document describes (request models come from request_models()).
ANSWERS: tuple[type[BaseModel], ...] = (
    Quote,
    SendResult,
    MessageStatus,
    Pricing,
    Health,
    WebhookAck,
    ErrorBody,
    PaymentRequiredError,
    RejectedError,
    SettlementPendingError,
    DispatchFailedError,
    X402PaymentRequired,
    WebhookEvent,
)
