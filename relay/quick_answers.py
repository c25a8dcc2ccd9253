"""The 402s of an unpaid POST /api/send, answered below Flask.

An agent's first request is unpaid: the bare probe, or a quoted send without a payment.
Its answer is the 402 challenge, built once per amount and URL (relay.flows.answers), so
what costs is the framework around it. ``QuickAnswers`` sits in the WSGI stack in front
of Flask (behind ProxyFix, so it sees the client's address and host as Flask does), takes
only those requests, and runs the very same flow Flask's view runs (``answers.probe``,
``sending.send``) with the same request id, CORS headers and metrics as every answer.
Anything else, and any request whose answer is not a 402 (an expired token, an opted-out
number, a body that does not parse), goes on to Flask unchanged, which answers it in full.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING

from werkzeug import Request

from relay import metrics
from relay.flows import answers, sending
from relay.inputs import MessageRequest, parse_json_object, parse_message_request
from relay.memo import Memo
from relay.payment_headers import PAYMENT_HEADERS
from relay.ratelimit import rate_key
from relay.services import Services
from relay.wire import SendRequest

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

ROUTE = "/api/send"
#: A quoted send's body is its message, number and token: a few KiB at most.
MAX_BODY_BYTES = 8192
#: Bodies already parsed, by their bytes (each at most MAX_BODY_BYTES).
PARSED_BODIES = 2048
_PAYMENT_KEYS = tuple("HTTP_" + name.upper().replace("-", "_") for name in PAYMENT_HEADERS)
_STATUS = f"402 {HTTPStatus.PAYMENT_REQUIRED.phrase}"
#: What a request's URL is made of (werkzeug's Request.base_url reads these).
_URL_PARTS = (
    "wsgi.url_scheme",
    "HTTP_HOST",
    "SERVER_NAME",
    "SERVER_PORT",
    "SCRIPT_NAME",
    "PATH_INFO",
)

#: What every answer carries beside its own headers (its request id, CORS), from the
#: X-Request-Id and Origin sent and the method.
AnswerHeaders = Callable[[str, str | None, str], list[tuple[str, str]]]


class QuickAnswers:
    """WSGI middleware: the unpaid /api/send's 402s, without the framework."""

    def __init__(
        self,
        app: WSGIApplication,
        services: Services,
        common_headers: AnswerHeaders,
        *,
        trusts_proxies: bool,
    ) -> None:
        self._app = app
        self._services = services
        self._common_headers = common_headers
        self._trusts_proxies = trusts_proxies
        self._parsed: Memo[bytes, MessageRequest] = Memo(PARSED_BODIES)
        self._urls: Memo[tuple[object, ...], str] = Memo(PARSED_BODIES)
        #: Answers given here (for the tests and the curious).
        self.answered = 0

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if not self._takes(environ):
            return self._app(environ, start_response)
        started = time.perf_counter()
        length = int(environ.get("CONTENT_LENGTH") or 0)
        raw = environ["wsgi.input"].read(length) if length else b""
        outcome = self._outcome(raw, environ)
        if outcome is None:  # Flask answers it, reading the same body
            environ["wsgi.input"] = io.BytesIO(raw)
            return self._app(environ, start_response)
        body = outcome.json().encode()
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            *outcome.headers.items(),
            *self._common_headers(
                environ.get("HTTP_X_REQUEST_ID", ""), environ.get("HTTP_ORIGIN"), "POST"
            ),
        ]
        start_response(_STATUS, headers)
        metrics.count_answer(ROUTE, outcome.status, time.perf_counter() - started)
        self.answered += 1
        return [body]

    def _takes(self, environ: WSGIEnvironment) -> bool:
        """An unpaid POST /api/send with a small body of known length, no password to check
        and no proxy in front that the app does not trust (Flask's hook warns of it)."""
        length = environ.get("CONTENT_LENGTH") or "0"
        return (
            environ.get("PATH_INFO") == ROUTE
            and environ.get("REQUEST_METHOD") == "POST"
            and not any(key in environ for key in _PAYMENT_KEYS)
            and "HTTP_TRANSFER_ENCODING" not in environ
            and length.isdigit()
            and int(length) <= MAX_BODY_BYTES
            and not self._services.settings.pay_password
            and (self._trusts_proxies or "HTTP_X_FORWARDED_FOR" not in environ)
        )

    def _outcome(self, raw: bytes, environ: WSGIEnvironment) -> answers.Outcome | None:
        """The 402 the view would answer, or None to leave the request to it."""
        svc = self._services
        try:
            url = self._url(environ)
            if not raw.strip():
                return answers.probe(svc, url)
            req = self._parsed.get(raw)
            if req is None:
                parsed = parse_message_request(
                    parse_json_object(raw),
                    allow_token=True,
                    max_message_chars=svc.settings.max_message_chars,
                )
                req = self._parsed.put(raw, parsed)
            if req.quote_token is None or (isinstance(req, SendRequest) and req.callback_url):
                return None  # a one-shot send may call the model: the full path counts it
            client = rate_key(environ.get("REMOTE_ADDR") or "unknown")
            outcome = sending.send(svc, req, {}, url, client)
        except Exception:  # the view answers it again, with its error handling
            return None
        return outcome if outcome.status == HTTPStatus.PAYMENT_REQUIRED else None

    def _url(self, environ: WSGIEnvironment) -> str:
        """The resource URL, worked out once per scheme, host and path."""
        key = tuple(environ.get(name) for name in _URL_PARTS)
        return self._urls.get_or_make(key, lambda: resource_url(self._services, Request(environ)))


def resource_url(svc: Services, request: Request) -> str:
    """The x402 resource URL of a request: the public address when configured (behind
    proxies), else the URL it came to, without its query."""
    public = svc.settings.public_base_url
    return public.rstrip("/") + request.path if public else request.base_url
