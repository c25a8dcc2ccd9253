"""Sinch SMS (SPEC §10): the SmsSender protocol, a thin REST client over httpx, and the
development outbox. Sinch's callbacks are read in ``relay.sinch_webhooks``."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import quote

import httpx

from relay.configs import SinchConfig
from relay.ledger import Ledger
from relay.phone import mask
from relay.retry import Backoff, retry
from relay.transport import closed_with, never_sent

log = logging.getLogger(__name__)

PROVIDER = "sinch"

_LOOKUP_PAGE_SIZE = 100
_LOOKUP_MARGIN_SECONDS = 300  # clock skew between us and Sinch
_LOOKUP_MAX_PAGES = 3  # one client_reference holds one batch; bounded time under a lease


@dataclass(frozen=True)
class SendResult:
    """A message the provider accepted; message_id is the Sinch batch id."""

    message_id: str
    provider: str
    #: The provider holds the message as delivered at once (the development outbox).
    delivered: bool = False


class SmsSender(Protocol):
    """Anything that can hand one SMS to a carrier network."""

    def send(
        self,
        to: str,
        body: str,
        client_reference: str,
        keep_alive: Callable[[], None] | None = None,
    ) -> SendResult: ...

    def lookup(self, client_reference: str, since: float | None = None) -> SendResult | None: ...


class SmsDispatchError(Exception):
    """Sinch did not take the message. The message never holds a token, body or full number.

    retryable: sending again later may work (429, 5xx, network).
    maybe_sent: Sinch may hold the batch although it could not be confirmed; call
    SinchSender.lookup(client_reference) before any resend or refund.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        provider_code: str | None = None,
        retryable: bool = False,
        maybe_sent: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.provider_code = provider_code
        self.retryable = retryable
        self.maybe_sent = maybe_sent
        self.retry_after = retry_after


def compose_body(text: str, opt_out_line: str) -> str:
    """The body actually sent: the text, then the opt-out line on its own line."""
    return f"{text}\n{opt_out_line}" if opt_out_line else text


def sinch_client(
    base_url: str, service_plan_id: str, api_token: str, timeout: httpx.Timeout
) -> httpx.Client:
    """The HTTP client of Sinch's SMS REST API: the service plan's ``batches`` under
    ``base_url``, with its bearer token; close() it after use."""
    plan = quote(service_plan_id, safe="")
    return httpx.Client(
        base_url=f"{base_url.rstrip('/')}/xms/v1/{plan}/",
        headers={"Authorization": f"Bearer {api_token}", "Accept": "application/json"},
        timeout=timeout,
    )


class SinchSender:
    """Sends one SMS as a Sinch batch, retrying only where that cannot send it twice."""

    def __init__(
        self,
        config: SinchConfig,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 20.0,
        max_attempts: int = 3,
        backoff_seconds: float = 0.5,
        max_wait_seconds: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._sender = config.sender
        self._callback_url = config.callback_url
        timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        http = sinch_client(config.base_url, config.service_plan_id, config.api_token, timeout)
        self._http = closed_with(self, http)
        self._backoff = Backoff(max(max_attempts, 1), backoff_seconds, max_wait_seconds)
        self._sleep = sleep

    def close(self) -> None:
        """Release pooled connections."""
        self._http.close()

    def __enter__(self) -> SinchSender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def send(
        self,
        to: str,
        body: str,
        client_reference: str,
        keep_alive: Callable[[], None] | None = None,
    ) -> SendResult:
        """Create the batch; raise SmsDispatchError once retries are spent or pointless.

        ``keep_alive`` is called before each attempt and look-up (the caller renews its
        lease there, or raises to stop).
        """
        payload = self._payload(to, body, client_reference)

        def attempt(number: int) -> SendResult:
            if keep_alive is not None:
                keep_alive()
            try:
                return self._post(payload, to, client_reference)
            except SmsDispatchError as error:
                self._log_failure(error, to, client_reference, number)
                if error.retryable and error.maybe_sent:
                    return self._recover(error, client_reference, number, keep_alive)
                raise

        return retry(
            attempt,
            self._backoff,
            retryable=_worth_posting_again,
            asked=_asked_wait,
            sleep=self._sleep,
        )

    def _recover(
        self,
        error: SmsDispatchError,
        client_reference: str,
        attempt: int,
        keep_alive: Callable[[], None] | None,
    ) -> SendResult:
        """Wait, then find the batch a maybe-sent attempt created or give up: Sinch's list
        may lag behind its answer, so a batch missing from it is no proof that none was
        created, and a maybe-sent message is never posted again here (the reconciler looks
        once more, later, before any second hand-over or refund)."""
        # The whole wait, not a random part of it: it gives the list time to catch up.
        self._sleep(self._backoff.longest(attempt, error.retry_after))
        if keep_alive is not None:
            keep_alive()
        found = self.lookup(client_reference)
        if found is None:
            raise error
        return found

    def _log_failure(
        self, error: SmsDispatchError, to: str, client_reference: str, attempt: int
    ) -> None:
        log.warning(
            "sinch send to %s (ref %s) attempt %d/%d failed: %s",
            mask(to),
            client_reference,
            attempt,
            self._backoff.attempts,
            error,
        )

    def lookup(self, client_reference: str, since: float | None = None) -> SendResult | None:
        """The batch already created under client_reference at or after ``since`` (epoch
        seconds; the payment's creation) — Sinch lists only the last 24 hours unless asked.

        Raises SmsDispatchError(maybe_sent=True) when Sinch cannot be asked.
        """
        try:
            return self._find(client_reference, since)
        except (httpx.HTTPError, ValueError) as exc:
            raise SmsDispatchError(
                "Sinch did not confirm the message and could not be asked; it may have been sent.",
                maybe_sent=True,
            ) from exc

    def _find(self, client_reference: str, since: float | None) -> SendResult | None:
        for page in range(_LOOKUP_MAX_PAGES):
            batches, more = self._list_page(client_reference, page, since)
            for batch in batches:
                if batch.get("client_reference") == client_reference and batch.get("id"):
                    log.info("sinch batch %s found for ref %s", batch["id"], client_reference)
                    return SendResult(message_id=str(batch["id"]), provider=PROVIDER)
            if not more:
                return None
        return None

    def _payload(self, to: str, body: str, client_reference: str) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "from": self._sender,
            "to": [to],
            "body": body,
            "delivery_report": "per_recipient",
            "client_reference": client_reference,
        }
        if self._callback_url:
            payload["callback_url"] = self._callback_url
        return payload

    def _post(self, payload: dict[str, Any], to: str, client_reference: str) -> SendResult:
        try:
            response = self._http.post("batches", json=payload)
        except httpx.RequestError as exc:
            raise _transport_error(exc) from exc
        result = _created(response)
        log.info(
            "sinch batch %s created for %s (ref %s)",
            result.message_id,
            mask(to),
            client_reference,
        )
        return result

    def _list_page(
        self, client_reference: str, page: int, since: float | None
    ) -> tuple[list[dict[str, Any]], bool]:
        params: dict[str, str | int] = {
            "client_reference": client_reference,
            "page": page,
            "page_size": _LOOKUP_PAGE_SIZE,
        }
        if since is not None:
            params["start_date"] = _iso8601(since - _LOOKUP_MARGIN_SECONDS)
        response = self._http.get("batches", params=params)
        response.raise_for_status()
        data = response.json()
        if not isinstance(data, dict) or not isinstance(data.get("batches", []), list):
            raise ValueError("unexpected batch list from Sinch")
        batches = [b for b in data.get("batches", []) if isinstance(b, dict)]
        count = data.get("count")
        more = bool(batches) and isinstance(count, int) and (page + 1) * _LOOKUP_PAGE_SIZE < count
        return batches, more


def _worth_posting_again(error: Exception) -> bool:
    """Only a failure that cannot have created the batch is posted again."""
    return isinstance(error, SmsDispatchError) and error.retryable and not error.maybe_sent


def _asked_wait(error: Exception) -> float | None:
    return error.retry_after if isinstance(error, SmsDispatchError) else None


def _iso8601(epoch: float) -> str:
    """Sinch's date format: YYYY-MM-DDThh:mm:ss.SSSZ (UTC)."""
    moment = datetime.fromtimestamp(max(epoch, 0.0), UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _transport_error(exc: httpx.RequestError) -> SmsDispatchError:
    if never_sent(exc):
        return SmsDispatchError("Could not connect to Sinch.", retryable=True)
    kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "broke off"
    return SmsDispatchError(f"The request to Sinch {kind}.", retryable=True, maybe_sent=True)


def _created(response: httpx.Response) -> SendResult:
    if response.status_code in (200, 201):
        batch_id = _json(response).get("id")
        if isinstance(batch_id, str) and batch_id:
            return SendResult(message_id=batch_id, provider=PROVIDER)
        raise SmsDispatchError(
            "Sinch answered without a batch id.", retryable=True, maybe_sent=True
        )
    raise _http_error(response)


def _http_error(response: httpx.Response) -> SmsDispatchError:
    status = response.status_code
    code = _provider_code(_json(response))
    server_side = status >= 500
    return SmsDispatchError(
        f"Sinch answered HTTP {status}" + (f" ({code})." if code else "."),
        status=status,
        provider_code=code,
        retryable=server_side or status == 429,
        maybe_sent=server_side,
        retry_after=_retry_after(response.headers.get("Retry-After")),
    )


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _provider_code(data: Mapping[str, Any]) -> str | None:
    """Sinch's stable error code: {code, text}, or the newer {error: {status, ...}} shape."""
    code = data.get("code")
    if isinstance(code, str) and code:
        return code
    inner = data.get("error")
    status = inner.get("status") if isinstance(inner, dict) else None
    return status if isinstance(status, str) and status else None


def _retry_after(raw: str | None) -> float | None:
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


class OutboxSender:
    """Development SMS provider: messages are stored in the database, nothing leaves."""

    def __init__(self, ledger: Ledger, clock: Callable[[], float] = time.time) -> None:
        self._ledger = ledger
        self._clock = clock

    def send(
        self,
        to: str,
        body: str,
        client_reference: str,
        keep_alive: Callable[[], None] | None = None,
    ) -> SendResult:
        """Store the message once per client reference."""
        row = {
            "message_id": "outbox-" + secrets.token_hex(10),
            "client_reference": client_reference,
            "destination": to,
            "body": body,
            "created_at": self._clock(),
        }
        stored = self._ledger.outbox_put(row)
        log.info("outbox message to %s stored", mask(to))
        return SendResult(message_id=stored["message_id"], provider="outbox", delivered=True)

    def lookup(self, client_reference: str, since: float | None = None) -> SendResult | None:
        """The message stored under this client reference, if any (the outbox keeps all)."""
        found = self._ledger.outbox_find(client_reference)
        return None if found is None else SendResult(found["message_id"], "outbox", delivered=True)
