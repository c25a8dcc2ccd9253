"""The Flask application factory."""

from __future__ import annotations

import logging
from typing import Any

import simplejson
from flask import Flask, Response
from flask.json.provider import JSONProvider
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from relay.errors import (
    InternalError,
    InvalidInput,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RelayError,
)
from relay.services import Services, build_services
from relay.settings import Settings, load_settings

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
        return simplejson.dumps(obj, use_decimal=True, **kwargs)

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        """Parse JSON."""
        return simplejson.loads(s, **kwargs)


def create_app(settings: Settings | None = None, services: Services | None = None) -> Flask:
    """Build the relay app; settings default to the environment, services to the settings."""
    if services is None:
        services = build_services(settings or load_settings())
    app = Flask(__name__)
    app.json = DecimalJSONProvider(app)
    app.config["MAX_CONTENT_LENGTH"] = services.settings.max_body_bytes
    app.extensions["relay"] = services
    hops = services.settings.trusted_proxy_hops
    if hops:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)  # type: ignore[method-assign]
    from relay.api import api
    from relay.docs import docs

    app.register_blueprint(api)
    app.register_blueprint(docs)
    _register_error_handlers(app)
    return app


def error_response(error: RelayError) -> Response:
    """The one JSON shape of every error (SPEC §4)."""
    response = Response(
        simplejson.dumps(error.body(), use_decimal=True),
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
    def unexpected(error: Exception) -> Response:
        log.exception("unhandled error", exc_info=error)
        return error_response(InternalError())
