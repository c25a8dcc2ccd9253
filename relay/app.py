"""The Flask application factory."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import simplejson
from flask import Flask, Response, request
from flask.json.provider import JSONProvider
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from relay import metrics
from relay.api import api
from relay.docs import docs
from relay.errors import (
    InternalError,
    InvalidInput,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RelayError,
    unexpected,
)
from relay.ledger import FORWARDED_NOTICE
from relay.logs import configure_logging, hide_in_logs
from relay.quick_answers import REQUEST_ID_KEY, QuickAnswers
from relay.services import Services, build_services
from relay.settings import Settings, load_settings
from relay.wire import to_json

log = logging.getLogger(__name__)

_HTTP_ERRORS: dict[int, type[RelayError]] = {
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
}


class DecimalJSONProvider(JSONProvider):
    """JSON that writes Decimal amounts as exact numbers (never through a float)."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        """Serialise with Decimal support."""
        return to_json(obj, **kwargs)

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        """Parse JSON."""
        return simplejson.loads(s, **kwargs)


def create_app(settings: Settings | None = None, services: Services | None = None) -> Flask:
    """Build the relay app; settings default to the environment, services to the settings."""
    if services is None:
        services = build_services(settings or load_settings())
    hide_in_logs(services.settings.secrets())
    configure_logging(services.settings.log_level, services.settings.log_format)
    app = Flask(__name__)
    app.json = DecimalJSONProvider(app)
    app.config["MAX_CONTENT_LENGTH"] = services.settings.body_limit
    app.extensions["relay"] = services
    hops = services.settings.trusted_proxy_hops
    origins = services.settings.cors_origin_list

    def common_headers(request_id: str, origin: str | None, method: str) -> list[tuple[str, str]]:
        return [("X-Request-Id", request_id), *cors_headers(origins, origin, method)]

    app.wsgi_app = QuickAnswers(  # type: ignore[method-assign]
        app.wsgi_app, services, common_headers, trusts_proxies=bool(hops)
    )
    if hops:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)  # type: ignore[method-assign]

    app.register_blueprint(api)
    app.register_blueprint(docs)
    metrics.init_app(app)
    _register_error_handlers(app)
    app.after_request(_echo_request_id)
    app.after_request(_cors(origins))
    if not hops:
        app.before_request(_warn_about_proxies(services))
        _warn_if_proxied_before(services)
    return app


def _echo_request_id(response: Response) -> Response:
    """X-Request-Id on every answer, so a client can quote it in a report (the id every
    log line of the request carries: relay.quick_answers gives it to each request)."""
    response.headers["X-Request-Id"] = request.environ[REQUEST_ID_KEY]
    return response


#: What a browser agent needs: the x402 headers it sends (the stock @x402/fetch client also
#: sends Access-Control-Expose-Headers on its paid retry), and those it must read.
CORS_ALLOW_HEADERS = (
    "Content-Type, PAYMENT-SIGNATURE, X-PAYMENT, X-Pay-Password, Access-Control-Expose-Headers"
)
CORS_EXPOSE_HEADERS = (
    "PAYMENT-REQUIRED, PAYMENT-RESPONSE, X-PAYMENT-RESPONSE, Retry-After, X-Request-Id"
)
CORS_MAX_AGE_SECONDS = 600


def _cors(origins: tuple[str, ...]) -> Callable[[Response], Response]:
    """CORS for browser agents (CORS_ORIGINS) on every answer."""

    def add_headers(response: Response) -> Response:
        for name, value in cors_headers(origins, request.headers.get("Origin"), request.method):
            if name == "Vary":
                response.vary.add(value)
            else:
                response.headers[name] = value
        return response

    return add_headers


def cors_headers(
    origins: tuple[str, ...], origin: str | None, method: str
) -> list[tuple[str, str]]:
    """The CORS headers of an answer to ``origin``: preflights answered, x402 headers
    allowed and exposed. No cookies are used, so no credentials are ever allowed."""
    headers = [] if not origins or "*" in origins else [("Vary", "Origin")]  # one per origin
    if not origin or not origins:
        return headers
    if "*" in origins:
        headers.append(("Access-Control-Allow-Origin", "*"))
    elif origin.rstrip("/") in origins:
        headers.append(("Access-Control-Allow-Origin", origin))
    else:
        return headers
    headers.append(("Access-Control-Expose-Headers", CORS_EXPOSE_HEADERS))
    if method == "OPTIONS":
        headers += [
            ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
            ("Access-Control-Allow-Headers", CORS_ALLOW_HEADERS),
            ("Access-Control-Max-Age", str(CORS_MAX_AGE_SECONDS)),
        ]
    return headers


def _warn_about_proxies(services: Services) -> Callable[[], None]:
    """With TRUSTED_PROXY_HOPS=0 every client behind a proxy shares the proxy's address
    (one rate limit for all): say so once per process, and note it for `relay doctor`."""
    warned = threading.Event()

    def check() -> None:
        if warned.is_set() or "X-Forwarded-For" not in request.headers:
            return
        warned.set()
        log.warning(
            "requests arrive with X-Forwarded-For but TRUSTED_PROXY_HOPS=0: every client "
            "behind the proxy shares one address and one rate limit"
        )
        try:
            services.ledger.note(FORWARDED_NOTICE, services.clock())
        except Exception:  # a note for the operator must never fail a request
            log.warning("could not record the proxy notice")

    return check


def _warn_if_proxied_before(services: Services) -> None:
    """The start-up log repeats the warning when a proxy was seen before."""
    try:
        seen = services.ledger.noted(FORWARDED_NOTICE)
    except Exception:
        return
    if seen is not None:
        log.warning(
            "earlier requests arrived with X-Forwarded-For but TRUSTED_PROXY_HOPS=0: set it "
            "to the number of proxies in front, or every client shares one rate limit"
        )


def error_response(error: RelayError) -> Response:
    """The one JSON shape of every error (SPEC §4)."""
    response = Response(
        to_json(error.body()),
        status=error.status,
        mimetype="application/json",
    )
    for name, value in error.response_headers().items():
        response.headers[name] = value
    return response


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(RelayError)
    def relay_error(error: RelayError) -> Response:
        return error_response(error)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        cls = _HTTP_ERRORS.get(status, InvalidInput if status < 500 else InternalError)
        relay = cls(details={"http_status": status}) if cls is InvalidInput else cls()
        response = error_response(relay)
        for name, value in error.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception) -> Response:
        return error_response(unexpected(error))
