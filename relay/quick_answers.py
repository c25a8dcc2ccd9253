"""The busiest answers of the API, given below Flask: quotes, and the 402s of an unpaid
POST /api/send.

An agent quotes, then its first send is unpaid: the bare probe, or a quoted send without a
payment, whose answer is the 402 challenge built once per amount and URL
(relay.flows.answers). Around such work the framework costs as much as the work itself.
``QuickAnswers`` sits in the WSGI stack in front of Flask (behind ProxyFix, so it sees the
client's address and host as Flask does), gives every request its id (``relay.logs``: each
log line of the request carries it, Flask's answers echo it too), and runs, for those
requests, the very functions
Flask's views run (``api.answer_quote``, ``answers.probe``, ``sending.send``), with the same
request id, CORS headers, metrics and error bodies as every answer.

What it leaves to Flask, untouched: other routes and methods, bodies over QUICK_BODY_BYTES
(or the app's own limit) or of unknown length, requests through a proxy the app does not
trust (Flask's hook warns of it), and any /api/send that carries a payment, needs the pay
password, may call the model (no quote token) or is answered with anything but a 402.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from werkzeug import Request
from werkzeug.http import HTTP_STATUS_CODES

from relay import metrics
from relay.api import answer_quote, message_request, resource_url
from relay.errors import RelayError, unexpected
from relay.flows import answers, sending
from relay.inputs import MessageRequest
from relay.logs import request_id_of, serving
from relay.memo import Memo
from relay.payment_headers import PAYMENT_HEADERS
from relay.ratelimit import rate_key
from relay.services import Services
from relay.wire import SendRequest, to_json

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

SEND, QUOTE = "/api/send", "/api/quote"
#: Where the request's id (relay.logs) waits in the WSGI environment for Flask's hooks.
REQUEST_ID_KEY = "relay.request_id"
#: A message, its number and a quote token: a few KiB at most.
QUICK_BODY_BYTES = 8192
#: Bodies of quoted sends already answered, by their bytes (each at most QUICK_BODY_BYTES).
PARSED_BODIES = 2048
_PAYMENT_KEYS = tuple("HTTP_" + name.upper().replace("-", "_") for name in PAYMENT_HEADERS)
#: What a request's URL is made of (werkzeug's Request.base_url reads these).
_URL_PARTS = (
    "wsgi.url_scheme", "HTTP_HOST", "SERVER_NAME", "SERVER_PORT", "SCRIPT_NAME", "PATH_INFO"
)  # fmt: skip

#: What every answer carries beside its own headers (its request id, CORS), from its
#: request id, the Origin sent and the method.
AnswerHeaders = Callable[[str, str | None, str], list[tuple[str, str]]]
#: Status, JSON body and headers.
Answer = tuple[int, str, dict[str, str]]


class QuickAnswers:
    """WSGI middleware: quotes and the unpaid /api/send's 402s, without the framework."""

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
        #: Never more than Flask would read: a larger body is its 413.
        self._max_body = min(QUICK_BODY_BYTES, services.settings.body_limit)
        self._parsed: Memo[bytes, MessageRequest] = Memo(PARSED_BODIES)
        self._urls: Memo[tuple[object, ...], str] = Memo(PARSED_BODIES)
        #: Answers given here (for the tests and the curious).
        self.answered = 0

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request_id = request_id_of(environ.get("HTTP_X_REQUEST_ID", ""))
        environ[REQUEST_ID_KEY] = request_id
        with serving(request_id):
            return self._answer(environ, start_response, request_id)

    def _answer(
        self, environ: WSGIEnvironment, start_response: StartResponse, request_id: str
    ) -> Iterable[bytes]:
        route = self._route(environ)
        if route is None:
            return self._app(environ, start_response)
        started = time.perf_counter()
        length = int(environ.get("CONTENT_LENGTH") or 0)
        raw = environ["wsgi.input"].read(length) if length else b""
        answer = self._quote(raw, environ) if route == QUOTE else self._send(raw, environ)
        if answer is None:  # Flask answers it, reading the same body
            environ["wsgi.input"] = io.BytesIO(raw)
            return self._app(environ, start_response)
        status, text, own = answer
        body = text.encode()
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            *own.items(),
            *self._common_headers(request_id, environ.get("HTTP_ORIGIN"), "POST"),
        ]
        start_response(f"{status} {HTTP_STATUS_CODES[status].upper()}", headers)
        metrics.count_answer(route, status, time.perf_counter() - started)
        self.answered += 1
        return [body]

    def _route(self, environ: WSGIEnvironment) -> str | None:
        """The route this layer answers, for a POST with a small body of known length and
        no proxy in front that the app does not trust; None for anything else."""
        route = environ.get("PATH_INFO")
        length = environ.get("CONTENT_LENGTH") or "0"
        taken = (
            route in (SEND, QUOTE)
            and environ.get("REQUEST_METHOD") == "POST"
            and "HTTP_TRANSFER_ENCODING" not in environ
            and length.isdigit()
            and int(length) <= self._max_body
            and (self._trusts_proxies or "HTTP_X_FORWARDED_FOR" not in environ)
        )
        if not taken or (route == SEND and not self._unpaid(environ)):
            return None
        return str(route)

    def _unpaid(self, environ: WSGIEnvironment) -> bool:
        """A send with no payment and no pay password to check."""
        paying = any(key in environ for key in _PAYMENT_KEYS)
        return not paying and not self._services.settings.pay_password

    def _quote(self, raw: bytes, environ: WSGIEnvironment) -> Answer:
        """The quote view's answer: the quote, or the error it raised."""
        client = rate_key(environ.get("REMOTE_ADDR") or "unknown")
        try:
            return 200, to_json(answer_quote(self._services, raw, client)), {}
        except Exception as error:
            failed = error if isinstance(error, RelayError) else unexpected(error)
            return failed.status, to_json(failed.body()), failed.response_headers()

    def _send(self, raw: bytes, environ: WSGIEnvironment) -> Answer | None:
        """The 402 the send view would answer, or None to leave the request to it."""
        try:
            outcome = self._unpaid_send(raw, environ)
        except Exception:  # the view answers it again, with its error handling
            return None
        if outcome is None or outcome.status != 402:
            return None
        return outcome.status, outcome.json(), outcome.headers

    def _unpaid_send(self, raw: bytes, environ: WSGIEnvironment) -> answers.Outcome | None:
        """The send view's flow for an unpaid send; None for one without a quote token (it
        may call the model: the view counts it) or with a callback to check."""
        svc = self._services
        url = self._url(environ)
        if not raw.strip():
            return answers.probe(svc, url)
        known = self._parsed.get(raw)
        req = known if known is not None else message_request(svc, raw, allow_token=True)
        if req.quote_token is None or (isinstance(req, SendRequest) and req.callback_url):
            return None
        client = rate_key(environ.get("REMOTE_ADDR") or "unknown")
        outcome = sending.send(svc, req, {}, url, client)
        if known is None and outcome.status == 402:  # a genuine, fresh quote's body
            self._parsed.put(raw, req)
        return outcome

    def _url(self, environ: WSGIEnvironment) -> str:
        """The resource URL, worked out once per scheme, host and path."""
        key = tuple(environ.get(name) for name in _URL_PARTS)
        return self._urls.get_or_make(key, lambda: resource_url(self._services, Request(environ)))
