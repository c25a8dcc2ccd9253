"""The pay-and-send client: quote → 402 → sign with an eth-account key → paid retry (SPEC §14)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx
from eth_account import Account
from x402 import PaymentRequired, PaymentRequirements, x402ClientSync
from x402.extensions.payment_identifier import append_payment_identifier_to_extensions
from x402.http import decode_payment_required_header, encode_payment_signature_header
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.exact import register_exact_evm_client

from relay.errors import (
    InvalidInput,
    PaymentTermsMismatch,
    PriceLimitExceeded,
    RelayError,
    error_for_code,
)
from relay.pricing import from_atomic, to_atomic
from relay.retry import Backoff, retry
from relay.transport import closed_with

RETRYABLE_CODES = {"settlement_pending", "request_in_progress", "rate_limited"}
RETRYABLE_CODES |= {"chain_unavailable", "moderation_unavailable", "internal_error"}
DEFAULT_TIMEOUT = 60.0
#: A message's statuses after which nothing more happens to it.
FINAL_STATUSES = ("delivered", "failed", "refunded")
#: Polling a message's status: first after up to 1 s, then up to 2, 4, 8, 15, 15... s apart.
POLL_FIRST_SECONDS = 1.0
POLL_CAP_SECONDS = 15.0
DEFAULT_WAIT_SECONDS = 300.0
#: Waits between paid attempts without a Retry-After: up to 2, 4, 8... seconds.
FIRST_WAIT_SECONDS = 2.0
#: The longest validity the client signs an authorization for (the relay asks for 300 s).
MAX_VALIDITY_SECONDS = 900


class RelayClient:
    """Quotes, pays and sends through one relay with one payer key."""

    def __init__(
        self,
        base_url: str,
        private_key: str | None = None,
        *,
        pay_password: str | None = None,
        max_attempts: int = 8,
        max_wait_seconds: float = 30.0,
        http: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
        on_step: Callable[[str], None] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._on_step = on_step or (lambda _step: None)
        self._account = Account.from_key(private_key) if private_key else None
        self._x402 = x402ClientSync()
        if self._account is not None:
            register_exact_evm_client(self._x402, EthAccountSigner(self._account))
        self._password = pay_password
        self._backoff = Backoff(max_attempts, FIRST_WAIT_SECONDS, max_wait_seconds)
        self._owns_http = http is None
        self._http = closed_with(self, httpx.Client()) if http is None else http
        self._sleep = sleep

    def close(self) -> None:
        """Release the HTTP connections (those of a client passed in stay its owner's)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> RelayClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def address(self) -> str | None:
        """The payer's address, when the client can pay."""
        return None if self._account is None else str(self._account.address)

    def quote(self, message: str, to: str, *, smart_encoding: bool = False) -> dict[str, Any]:
        """POST /api/quote; raises the RelayError of the answer's code."""
        body = {"message": message, "to": to, "smart_encoding": smart_encoding}
        return self._ok(self._post("/api/quote", body, {}))

    def status(self, message_id: str) -> dict[str, Any]:
        """GET /api/messages/{message_id}: the message's status document."""
        response = self._http.get(
            f"{self.base_url}/api/messages/{message_id}",
            headers=self._auth(),
            timeout=DEFAULT_TIMEOUT,
        )
        return self._ok(response)

    def wait(self, message_id: str, timeout: float = DEFAULT_WAIT_SECONDS) -> dict[str, Any]:
        """Poll the message's status until it is delivered, failed or refunded, or until
        ``timeout`` seconds have passed; the last status document either way."""
        return poll_until_final(lambda: self.status(message_id), timeout, sleep=self._sleep)

    def send(
        self,
        message: str,
        to: str,
        *,
        max_price_usd: Decimal | str | int,
        smart_encoding: bool = False,
        payment_id: str | None = None,
    ) -> dict[str, Any]:
        """Quote, check the cap, pay once and send; the send answer (message_id, transaction).

        A caller that may repeat a send passes the same ``payment_id`` each time: the relay
        refuses a second payment under an identifier it has already taken."""
        if self._account is None:
            raise InvalidInput("A payer private key is needed to send.")
        cap = to_atomic(Decimal(str(max_price_usd)))
        quoted = self.quote(message, to, smart_encoding=smart_encoding)
        self._on_step(f"quoted {quoted['price_usd']} USD for {quoted['segments']} segment(s)")
        check_cap(int(quoted["price_atomic"]), cap)
        body = {
            "message": message,
            "to": quoted["to_normalized"],
            "quote_token": quoted["quote_token"],
            "smart_encoding": smart_encoding,
        }
        challenge = self._post("/api/send", body, self._auth())
        if challenge.status_code != 402:
            self._ok(challenge)
            raise InvalidInput("The relay did not ask for payment.")
        self._on_step("402 Payment Required received")
        header = self._pay(challenge, quoted, payment_id or new_payment_id())
        self._on_step(f"payment signed by {self.address}; settling on-chain")
        return self._paid_retry(body, header)

    def _pay(self, challenge: httpx.Response, quoted: dict[str, Any], payment_id: str) -> str:
        """Sign the challenge's requirement that is exactly the quote's (its price, already
        under the cap, its network, asset and payee, for a bounded time); refuse any other."""
        required = decode_payment_required_header(challenge.headers["PAYMENT-REQUIRED"])
        assert isinstance(required, PaymentRequired)
        offers = [accept for accept in required.accepts if as_quoted(accept, quoted)]
        if not offers:
            raise PaymentTermsMismatch(details={"quoted": quoted["next_step"]["payment"]})
        extensions = append_payment_identifier_to_extensions(
            dict(required.extensions or {}), payment_id
        )
        chosen = required.model_copy(update={"accepts": offers[:1]})
        payload = self._x402.create_payment_payload(chosen, extensions=extensions)
        return str(encode_payment_signature_header(payload))

    def _paid_retry(self, body: dict[str, Any], header: str) -> dict[str, Any]:
        """Send the one signed payment, repeating the identical request while retryable."""
        headers = {**self._auth(), "PAYMENT-SIGNATURE": header}

        def attempt(number: int) -> httpx.Response:
            response = self._post("/api/send", body, headers)
            if _retryable(response) and number < self._backoff.attempts:
                self._on_step(f"{_json(response).get('error')}; retrying the same payment")
                raise _AnswerWorthRepeating(response)
            return response

        return self._ok(
            retry(
                attempt,
                self._backoff,
                retryable=_worth_repeating,
                asked=_asked_wait,
                sleep=self._sleep,
            )
        )

    def _auth(self) -> dict[str, str]:
        return {"X-Pay-Password": self._password} if self._password else {}

    def _post(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
        return self._http.post(
            self.base_url + path, json=body, headers=headers, timeout=DEFAULT_TIMEOUT
        )

    def _ok(self, response: httpx.Response) -> dict[str, Any]:
        """The JSON of a 200, or the typed RelayError of its error code."""
        data = _json(response)
        if response.status_code == 200:
            return data
        cls = error_for_code(str(data.get("error", "internal_error")))
        raise _as_error(cls, data, response)


def send(
    message: str,
    to: str,
    *,
    max_price_usd: Decimal | str | int,
    base_url: str,
    private_key: str,
    pay_password: str | None = None,
    smart_encoding: bool = False,
    payment_id: str | None = None,
) -> dict[str, Any]:
    """Quote, pay and send one SMS in one call; never pays more than ``max_price_usd``.
    Repeat a call that ended in doubt with the same ``payment_id``: it never pays twice."""
    with RelayClient(base_url, private_key, pay_password=pay_password) as client:
        return client.send(
            message,
            to,
            max_price_usd=max_price_usd,
            smart_encoding=smart_encoding,
            payment_id=payment_id,
        )


def poll_until_final(
    fetch: Callable[[], dict[str, Any]],
    timeout: float,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Fetch a status document until its status is final or ``timeout`` has passed, backing
    off (up to POLL_CAP_SECONDS apart) and waiting as long as a busy relay asks (Retry-After).
    The last document fetched; the error itself when none could be fetched."""
    latest: dict[str, Any] = {}
    polls = Backoff(attempts=10**6, first=POLL_FIRST_SECONDS, cap=POLL_CAP_SECONDS, budget=timeout)
    deadline = clock() + timeout
    polled = [0]

    def attempt(number: int) -> dict[str, Any]:
        nonlocal latest
        polled[0] = number
        try:
            latest = fetch()
        except RelayError as exc:
            if not exc.retryable:
                raise
            raise _NotFinal(exc.retry_after) from exc
        if latest.get("status") in FINAL_STATUSES:
            return latest
        raise _NotFinal(None)

    def next_wait(error: Exception) -> float:
        """What the relay asked for, else the backoff's wait; the last poll at the deadline."""
        asked = error.asked if isinstance(error, _NotFinal) else None
        wanted = polls.wait(polled[0]) if asked is None else asked
        return max(0.0, min(wanted, deadline - clock()))

    try:
        return retry(
            attempt,
            polls,
            retryable=lambda error: isinstance(error, _NotFinal),
            asked=next_wait,
            sleep=sleep,
            clock=clock,
        )
    except _NotFinal as not_final:
        if latest:
            return latest
        assert not_final.__cause__ is not None
        raise not_final.__cause__ from None


class _NotFinal(Exception):
    """The message is still on its way (or the relay asked to wait ``asked`` seconds)."""

    def __init__(self, asked: int | None) -> None:
        super().__init__(asked)
        self.asked = None if asked is None else float(asked)


def new_payment_id() -> str:
    """A fresh x402 payment identifier."""
    return "pay_" + secrets.token_hex(16)


def as_quoted(accept: PaymentRequirements, quoted: dict[str, Any]) -> bool:
    """Whether a 402's requirement is the quote's: the exact scheme, its price, network,
    asset and payee, and a validity no longer than MAX_VALIDITY_SECONDS."""
    terms = quoted["next_step"]["payment"]
    return (
        accept.scheme == "exact"
        and accept.amount == str(quoted["price_atomic"])
        and accept.network == terms["network"]
        and accept.asset.lower() == str(terms["asset"]).lower()
        and accept.pay_to.lower() == str(terms["recipient"]).lower()
        and 0 < accept.max_timeout_seconds <= MAX_VALIDITY_SECONDS
    )


def check_cap(amount_atomic: int, cap_atomic: int) -> None:
    """Refuse, before signing, an amount above the cap."""
    if amount_atomic > cap_atomic:
        raise PriceLimitExceeded(
            f"The price {from_atomic(amount_atomic)} USD is above the limit "
            f"{from_atomic(cap_atomic)} USD.",
            details={"price_atomic": str(amount_atomic), "max_atomic": str(cap_atomic)},
        )


class _AnswerWorthRepeating(Exception):
    """An answer to the paid request that asks for the identical request again."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(response.status_code)
        self.response = response


def _worth_repeating(error: Exception) -> bool:
    """A retryable answer, or no answer at all (refused, timed out or cut off): the relay
    settles one payment once, so the identical request is always safe to repeat."""
    return isinstance(
        error,
        _AnswerWorthRepeating
        | httpx.TimeoutException
        | httpx.NetworkError
        | httpx.RemoteProtocolError,
    )


def _asked_wait(error: Exception) -> float | None:
    """The answer's Retry-After, in whole seconds."""
    if not isinstance(error, _AnswerWorthRepeating):
        return None
    retry_after = error.response.headers.get("Retry-After", "")
    return float(retry_after) if retry_after.isdigit() else None


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return {"error": "internal_error", "message": f"HTTP {response.status_code}"}
    return data


def _retryable(response: httpx.Response) -> bool:
    """Worth repeating the identical paid request: pending, busy, or a gateway hiccup."""
    if response.status_code == 200:
        return False
    return str(_json(response).get("error", "")) in RETRYABLE_CODES


def _as_error(cls: type[RelayError], data: dict[str, Any], response: httpx.Response) -> RelayError:
    known = {"error", "message", "retryable", "retry_after_seconds", "details"}
    retry_after = data.get("retry_after_seconds")
    return cls(
        str(data.get("message") or f"HTTP {response.status_code}"),
        details=dict(data.get("details") or {}),
        retry_after=retry_after if isinstance(retry_after, int) else None,
        extra={k: v for k, v in data.items() if k not in known},
    )
