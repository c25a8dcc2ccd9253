"""Thin HTTP views: parse, call a flow, serialise."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from relay import flows
from relay.errors import RateLimited
from relay.inputs import parse_json_object, parse_message_request
from relay.pricing import token_prices
from relay.services import Services

api = Blueprint("relay", __name__)


def services() -> Services:
    """The services of the running app."""
    found: Services = current_app.extensions["relay"]
    return found


def client_address() -> str:
    """The caller's address (the app applies ProxyFix when behind trusted proxies)."""
    return request.remote_addr or "unknown"


@api.post("/api/quote")
def post_quote() -> Response:
    """Moderate and price a message; answer a signed quote (SPEC §3)."""
    svc = services()
    wait = svc.quote_limiter.hit("quote", client_address())
    if wait is not None:
        raise RateLimited(retry_after=wait, details={"limit": svc.settings.quote_rate_limit})
    req = parse_message_request(parse_json_object(request.get_data()), allow_token=False)
    return jsonify(quote_body(svc, flows.quote(svc, req)))


def quote_body(svc: Services, q: flows.Quote) -> dict[str, Any]:
    """The JSON of an approved quote."""
    settings = svc.settings
    v = q.verdict
    body: dict[str, Any] = {
        "approved": True,
        "category": v.category,
        "confidence": v.confidence,
        "segments": q.segments.segments,
        "encoding": q.segments.encoding,
        "sms_price_usd": q.price.sms_usd,
        "moderation_cost_usd": q.price.moderation_usd,
        "price_usd": q.price.total_usd,
        "price_atomic": str(q.price.atomic),
        "moderation_usage": {
            "model": v.model,
            "input_tokens": v.input_tokens,
            "output_tokens": v.output_tokens,
            "thinking_tokens": v.thinking_tokens,
            "cached": v.cached,
        },
        "to_normalized": q.to,
        "quote_token": q.token,
        "expires_in_seconds": settings.quote_ttl_seconds,
        "next_step": next_step(svc, q),
    }
    if q.claims.smart_encoding:
        body["smart_encoding"] = smart_encoding_body(svc, q)
    return body


def next_step(svc: Services, q: flows.Quote) -> dict[str, Any]:
    """How to pay for this quote."""
    settings = svc.settings
    return {
        "method": "POST",
        "path": "/api/send",
        "body": {"message": q.message, "to": q.to, "quote_token": q.token},
        "payment": {
            "protocol": "x402",
            "network": settings.x402_network,
            "amount_usd": q.price.total_usd,
            "amount_atomic": str(q.price.atomic),
            "asset": settings.usdc_address,
            "recipient": settings.pay_to_address,
        },
    }


def smart_encoding_body(svc: Services, q: flows.Quote) -> dict[str, Any]:
    """What smart encoding changed and saved."""
    saved = q.original_segments.segments - q.segments.segments
    return {
        "applied": q.text != q.message,
        "text": q.text,
        "encoding_before": q.original_segments.encoding,
        "segments_before": q.original_segments.segments,
        "segments_saved": saved,
        "savings_usd": saved * svc.settings.price_per_segment_usd,
    }


@api.get("/api/pricing")
def get_pricing() -> Response:
    """The public price list."""
    settings = services().settings
    prices = token_prices(
        settings.gemini_model, settings.gemini_price_input_per_m, settings.gemini_price_output_per_m
    )
    return jsonify(
        {
            "price_per_segment_usd": settings.price_per_segment_usd,
            "max_segments": settings.max_segments,
            "segment_sizes": {"GSM-7": [160, 153], "UCS-2": [70, 67]},
            "network": settings.x402_network,
            "asset": settings.usdc_address,
            "pay_to": settings.pay_to_address,
            "quote_ttl_seconds": settings.quote_ttl_seconds,
            "moderation": {
                "provider": settings.moderation_provider,
                "model": settings.gemini_model,
                "input_per_million_usd": prices.input_per_m,
                "output_per_million_usd": prices.output_per_m,
            },
            "opt_out_line": settings.opt_out_line,
        }
    )


@api.get("/health")
def get_health() -> Response:
    """Liveness and readiness."""
    svc = services()
    checks: dict[str, str] = {}
    try:
        svc.ledger.ping()
        checks["database"] = "ok"
    except Exception:
        checks["database"] = "unreachable"
    ok = all(value == "ok" for value in checks.values())
    response = jsonify({"status": "ok" if ok else "degraded", "checks": checks})
    response.status_code = 200 if ok else 503
    return response
