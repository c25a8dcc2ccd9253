"""The documents for machines: GET /openapi.json (built in relay.openapi) and GET /llms.txt
(the template relay/templates/llms.txt, filled with the running settings)."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

import jinja2
import simplejson
from flask import Blueprint, Response, current_app

from relay import wire
from relay.errors import all_error_classes
from relay.openapi import openapi_document, when
from relay.settings import Settings
from relay.states import MessageState

docs = Blueprint("docs", __name__)


# llms.txt ----------------------------------------------------------------------------


@cache
def _llms_template() -> jinja2.Template:
    source = files("relay").joinpath("templates/llms.txt").read_text(encoding="utf-8")
    plain_text = jinja2.Environment(
        autoescape=False,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    return plain_text.from_string(source)


def llms_txt(settings: Settings) -> str:
    """The plain-text guide for agents (llmstxt.org style), for these settings."""
    return _llms_template().render(
        base=(settings.public_base_url or "").rstrip("/"),
        quote_ttl_seconds=settings.quote_ttl_seconds,
        price_per_segment_usd=settings.price_per_segment_usd,
        password=bool(settings.pay_password),
        network=settings.x402_network,
        asset=settings.usdc_address,
        pay_to=settings.pay_to_address,
        max_segments=settings.max_segments,
        moderation=settings.gemini_model if settings.moderation_provider == "gemini" else "rules",
        opt_out_line=settings.opt_out_line,
        sent_fields=list(wire.SendResult.model_fields),
        message_states=[state.value for state in MessageState],
        errors=[
            {"code": cls.code, "status": cls.status, "retryable": cls.retryable, "when": when(cls)}
            for cls in all_error_classes()
        ],
    )


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
