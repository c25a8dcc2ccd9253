"""Thin HTTP views: parse, call a flow, serialise."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from decimal import Decimal
from typing import Any, cast

from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug import Request

from relay import wire
from relay.errors import NotFound, Unauthorized
from relay.flows import answers, quoting, sending
from relay.flows.status import message_status, sinch_callback
from relay.inputs import MessageRequest, parse_json_object, parse_message_request
from relay.moderation import Category
from relay.payment_headers import PAYMENT_HEADERS
from relay.phishing_rules import RulesModerator
from relay.pricing import token_prices
from relay.ratelimit import rate_key
from relay.segments import MULTI_SEGMENT_UNITS, SINGLE_SEGMENT_UNITS
from relay.services import Services
from relay.settings import Settings

api = Blueprint("relay", __name__)


def services() -> Services:
    """The services of the running app."""
    found: Services = current_app.extensions["relay"]
    return found


def client_address() -> str:
    """The caller's address (the app applies ProxyFix when behind trusted proxies)."""
    return request.remote_addr or "unknown"


def client_key() -> str:
    """Whom limits count against: the caller's IPv4 address, or its IPv6 /64 (one host
    commonly holds a whole /64)."""
    return rate_key(client_address())


@api.post("/api/quote")
def post_quote() -> Response:
    """Moderate and price a message; answer a signed quote (SPEC §3)."""
    return jsonify(answer_quote(services(), request.get_data(), client_key()))


def answer_quote(svc: Services, raw: bytes, client: str) -> dict[str, Any]:
    """The quote of the request body ``raw``, counted against ``client``'s limit as it
    starts; the limit's answer is awaited before anything but this process's memory is
    used (a query, a model call, a metric) and before the quote leaves."""
    with quoting.model_calls_counted(svc, client) as admit:
        req = message_request(svc, raw, allow_token=False)
        return quote_body(svc, quoting.quote(svc, req, admit=admit))


def message_request(svc: Services, raw: bytes, *, allow_token: bool) -> MessageRequest:
    """The message request in the body ``raw`` (a send's may carry a quote token)."""
    return parse_message_request(
        parse_json_object(raw),
        allow_token=allow_token,
        max_message_chars=svc.settings.max_message_chars,
    )


def quote_body(svc: Services, q: quoting.Quote) -> dict[str, Any]:
    """The JSON of an approved quote."""
    v = q.verdict
    return wire.Quote(
        approved=True,
        category=cast(Category, v.category),  # checked by the model
        confidence=v.confidence,
        segments=q.segments.segments,
        encoding=q.segments.encoding,
        sms_price_usd=q.price.sms_usd,
        moderation_cost_usd=q.price.moderation_usd,
        price_usd=q.price.total_usd,
        price_atomic=str(q.price.atomic),
        moderation_usage=wire.ModerationUsage(
            model=v.model,
            input_tokens=v.input_tokens,
            output_tokens=v.output_tokens,
            thinking_tokens=v.thinking_tokens,
            cached=v.cached,
        ),
        to_normalized=q.to,
        quote_token=q.token,
        expires_in_seconds=svc.settings.quote_ttl_seconds,
        next_step=next_step(svc, q),
        smart_encoding=smart_encoding_body(svc, q) if q.claims.smart_encoding else None,
    ).model_dump()


def next_step(svc: Services, q: quoting.Quote) -> wire.NextStep:
    """How to pay for this quote."""
    settings = svc.settings
    return wire.NextStep(
        method="POST",
        path="/api/send",
        body=wire.NextStepBody(message=q.message, to=q.to, quote_token=q.token),
        payment=wire.PaymentInstructions(
            protocol="x402",
            network=settings.x402_network,
            amount_usd=q.price.total_usd,
            amount_atomic=str(q.price.atomic),
            asset=settings.usdc_address,
            recipient=settings.pay_to_address,
        ),
    )


def smart_encoding_body(svc: Services, q: quoting.Quote) -> wire.SmartEncoding:
    """What smart encoding changed and saved."""
    saved = q.original_segments.segments - q.segments.segments
    return wire.SmartEncoding(
        applied=q.text != q.message,
        text=q.text,
        encoding_before=q.original_segments.encoding,
        segments_before=q.original_segments.segments,
        segments_saved=saved,
        savings_usd=saved * svc.settings.price_per_segment_usd,
    )


@api.get("/api/pricing")
def get_pricing() -> Response:
    """The public price list."""
    settings = services().settings
    sizes = {e: [SINGLE_SEGMENT_UNITS[e], MULTI_SEGMENT_UNITS[e]] for e in SINGLE_SEGMENT_UNITS}
    pricing = wire.Pricing(
        price_per_segment_usd=settings.price_per_segment_usd,
        max_segments=settings.max_segments,
        segment_sizes=sizes,
        network=settings.x402_network,
        asset=settings.usdc_address,
        pay_to=settings.pay_to_address,
        quote_ttl_seconds=settings.quote_ttl_seconds,
        moderation=moderation_prices(settings),
        opt_out_line=settings.opt_out_line,
    )
    return jsonify(pricing.model_dump())


def moderation_prices(settings: Settings) -> wire.ModerationPrices:
    """The moderator and the token prices a quote passes on (none for the rules)."""
    if settings.moderation_provider == "rules":
        return wire.ModerationPrices(
            provider="rules",
            model=RulesModerator.model,
            input_per_million_usd=Decimal(0),
            output_per_million_usd=Decimal(0),
        )
    prices = token_prices(
        settings.gemini_model, settings.gemini_price_input_per_m, settings.gemini_price_output_per_m
    )
    return wire.ModerationPrices(
        provider="gemini",
        model=settings.gemini_model,
        input_per_million_usd=prices.input_per_m,
        output_per_million_usd=prices.output_per_m,
    )


@api.get("/health")
def get_health() -> Response:
    """Liveness and readiness: database, chain or facilitator, providers.

    200 while the process and its database work; ``?strict=1`` answers 503 unless every
    dependency is ready (for load balancers that should route around a node).
    """
    svc = services()
    checks = wire.HealthChecks(
        database=_check(svc.ledger.ping),
        chain=_check(svc.payments.ping),
        rate_limit_storage=_check(svc.quote_limiter.ping),
        moderation=svc.settings.moderation_provider,
        sms=svc.settings.sms_provider,
    )
    ready = "ok" == checks.database == checks.chain == checks.rate_limit_storage
    strict = request.args.get("strict") in ("1", "true")
    health = wire.Health(status="ok" if ready else "degraded", ready=ready, checks=checks)
    response = jsonify(health.model_dump())
    alive = checks.database == "ok"
    response.status_code = 200 if (ready if strict else alive) else 503
    return response


def _check(probe: Callable[[], None]) -> wire.Reachability:
    try:
        probe()
    except Exception:  # any failure means not ready; details stay in the log
        return "unreachable"
    return "ok"


def resource_url(svc: Services, request: Request) -> str:
    """The x402 resource URL of a request: the public address when configured (behind
    proxies), else the URL it came to, without its query."""
    public = svc.settings.public_base_url
    return public.rstrip("/") + request.path if public else request.base_url


def require_password(svc: Services) -> None:
    """Enforce X-Pay-Password when PAY_PASSWORD is set, with a lock-out after failures."""
    expected = svc.settings.pay_password
    if not expected:
        return
    client = client_key()  # an IPv6 host's whole /64, as every limit counts it
    wait = svc.password_limiter.blocked("password", client)
    if wait is not None:
        raise Unauthorized("Too many wrong passwords; try again later.", retry_after=wait)
    given = request.headers.get("X-Pay-Password", "")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        svc.password_limiter.hit("password", client)
        raise Unauthorized(retry_after=svc.password_limiter.blocked("password", client))


@api.post("/api/send")
def post_send() -> Response:
    """The x402 paid send (SPEC §2, §9): 402 challenge, or verify → settle → dispatch."""
    svc = services()
    require_password(svc)
    raw = request.get_data()
    paying = any(name in request.headers for name in PAYMENT_HEADERS)
    if not raw.strip() and not paying:
        outcome = answers.probe(svc, resource_url(svc, request))
    else:
        req = message_request(svc, raw, allow_token=True)
        outcome = sending.send(
            svc, req, dict(request.headers), resource_url(svc, request), client_key()
        )
    response = Response(outcome.json(), outcome.status, mimetype="application/json")
    response.headers.update(outcome.headers)
    return response


@api.get("/api/messages/<message_id>")
def get_message(message_id: str) -> Response:
    """Status of a message: history, payment and refund."""
    svc = services()
    require_password(svc)
    status = message_status(svc.ledger, message_id)
    if status is None:
        raise NotFound("No message with this id.", details={"message_id": message_id})
    return jsonify(status)


@api.post("/webhooks/sinch/<secret>")
def sinch_webhook(secret: str) -> Response:
    """Delivery reports and inbound texts (STOP/START) from Sinch."""
    svc = services()
    expected = svc.settings.sinch_callback_secret or ""
    if not expected or not hmac.compare_digest(secret.encode(), expected.encode()):
        raise NotFound()
    raw = request.get_data()
    applied = sinch_callback(svc, parse_json_object(raw), raw, dict(request.headers))
    return jsonify(wire.WebhookAck(ok=True, duplicate=None if applied else True).model_dump())
