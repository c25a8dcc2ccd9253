"""Signed delivery callbacks to an agent's `callback_url` (Standard Webhooks).

An agent shares no secret with the relay, so each paid message gets its own: a random
`whsec_…` secret returned in the paid answer, with which the agent verifies the
`webhook-signature` of every event about that message (any Standard Webhooks library does).

A callback URL is a request the relay makes on an agent's behalf, so it must never reach
the relay's own network: every address its host resolves to must be a global one (no
loopback, private, link-local — cloud metadata — shared, reserved or multicast address).
This is checked when the URL is given, and again when each event is sent, on the address
actually connected to (a name that resolved to a public address once may not the next
time). `ALLOW_PRIVATE_CALLBACKS` lifts the rule for development.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import secrets
import socket
import ssl
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from standardwebhooks import Webhook

from relay.errors import InvalidInput

MAX_URL_CHARS = 2048
#: Each delivery attempt: connect within the first, each read within the second...
CONNECT_TIMEOUT_SECONDS = 5.0
DELIVERY_TIMEOUT_SECONDS = 10.0
#: ...and the whole attempt, up to the answer's status line and headers, within this (its
#: body is never read): an endpoint that answers a byte at a time, or never stops, holds a
#: worker no longer, and sends nothing into its memory.
DELIVERY_DEADLINE_SECONDS = 15.0
#: Attempts under way at once in a process (the rest wait their turn, within the deadline).
DELIVERY_THREADS = 4

Resolver = Callable[[str, int], list[str]]


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (the system resolver)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def new_secret() -> str:
    """A fresh signing secret for one message's events, as Standard Webhooks writes it."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True)
class CallbackPolicy:
    """Where callbacks may go."""

    allow_private: bool = False
    resolver: Resolver = resolve

    def check(self, url: str) -> str:
        """The URL if events may be sent there; InvalidInput (field callback_url) if not."""
        parsed = _parse(url, self.allow_private)
        self.addresses(parsed)
        return url

    def addresses(self, url: httpx.URL) -> list[str]:
        """The addresses of the URL's host, every one of them allowed; InvalidInput if not."""
        host = url.host
        try:
            found = [host] if _is_ip(host) else self.resolver(host, url.port or _port(url))
        except OSError:
            raise _refused("unresolvable", "its host name does not resolve") from None
        if not found:
            raise _refused("unresolvable", "its host name does not resolve")
        if not self.allow_private:
            for address in found:
                if not ipaddress.ip_address(address.split("%")[0]).is_global:
                    raise _refused("private_address", "it points into a private network")
        return found


@dataclass(frozen=True)
class Delivery:
    """One event as it goes out: its id, when, and the JSON body."""

    event_id: str
    at: float
    body: str


class CallbackSender:
    """POSTs signed events, connecting only to an address the policy allows, each attempt
    bounded by DELIVERY_DEADLINE_SECONDS."""

    def __init__(self, policy: CallbackPolicy) -> None:
        self.policy = policy
        self._threads = ThreadPoolExecutor(DELIVERY_THREADS, thread_name_prefix="relay-callback")
        self._tls: ssl.SSLContext | None = None

    def send(self, url: str, secret: str, delivery: Delivery) -> None:
        """Deliver once; raises CallbackFailed with a short reason unless the agent took it
        (any 2xx answer)."""
        target = httpx.URL(url)
        try:
            address = self.policy.addresses(target)[0]
        except InvalidInput as refused:
            raise CallbackFailed(str(refused.details.get("reason"))) from None
        headers = signed_headers(secret, delivery)
        headers["Host"] = target.netloc.decode()
        headers["Content-Type"] = "application/json"
        pinned = target.copy_with(host=address)  # the address that was checked, not a new lookup
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        # A client of its own, so that an attempt past the deadline is cut off alone (its
        # thread ends at its next read); the TLS context is made once.
        timeout = httpx.Timeout(DELIVERY_TIMEOUT_SECONDS, connect=CONNECT_TIMEOUT_SECONDS)
        client = httpx.Client(timeout=timeout, follow_redirects=False, verify=self._context())
        attempt = self._threads.submit(
            _status_of, client, pinned, delivery.body, headers, extensions
        )
        try:
            status = attempt.result(timeout=DELIVERY_DEADLINE_SECONDS)
        except (FutureTimeout, httpx.TimeoutException):
            attempt.cancel()  # not started yet: it never will be
            raise CallbackFailed("timed out") from None
        except httpx.HTTPError as exc:
            raise CallbackFailed(f"no answer ({type(exc).__name__})") from None
        finally:
            client.close()
        if not 200 <= status < 300:
            raise CallbackFailed(f"HTTP {status}")

    def close(self) -> None:
        """Stop taking attempts (those under way end at their deadline)."""
        self._threads.shutdown(wait=False, cancel_futures=True)

    def _context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = httpx.create_ssl_context()
        return self._tls


def _status_of(
    client: httpx.Client,
    url: httpx.URL,
    body: str,
    headers: dict[str, str],
    extensions: dict[str, Any],
) -> int:
    """The status of the answer to one POST; its body is left unread."""
    with client.stream("POST", url, content=body, headers=headers, extensions=extensions) as answer:
        return answer.status_code


class CallbackFailed(Exception):
    """The agent did not take an event; the reason is safe to store and show."""


def signed_headers(secret: str, delivery: Delivery) -> dict[str, str]:
    """webhook-id, webhook-timestamp and webhook-signature (v1, HMAC-SHA256)."""
    moment = datetime.fromtimestamp(int(delivery.at), tz=UTC)
    signature = Webhook(secret).sign(delivery.event_id, moment, delivery.body)
    return {
        "webhook-id": delivery.event_id,
        "webhook-timestamp": str(int(delivery.at)),
        "webhook-signature": signature,
    }


def event_body(event_type: str, at: float, data: Mapping[str, Any]) -> str:
    """The JSON of an event: its type, when it happened, and what it is about."""
    moment = datetime.fromtimestamp(at, tz=UTC).isoformat().replace("+00:00", "Z")
    return json.dumps({"type": event_type, "timestamp": moment, "data": dict(data)}, default=str)


def _parse(url: str, allow_private: bool) -> httpx.URL:
    if len(url) > MAX_URL_CHARS:
        raise _refused("too_long", f"it is longer than {MAX_URL_CHARS} characters")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise _refused("not_a_url", "it is not a URL") from None
    schemes = ("https", "http") if allow_private else ("https",)
    if parsed.scheme not in schemes:
        raise _refused("scheme", f"it must be {' or '.join(schemes)}")
    if not parsed.host:
        raise _refused("not_a_url", "it has no host")
    if parsed.userinfo:
        raise _refused("credentials", "it must not carry credentials")
    return parsed


def _refused(reason: str, why: str) -> InvalidInput:
    return InvalidInput(
        f"callback_url is refused: {why}.", details={"field": "callback_url", "reason": reason}
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _port(url: httpx.URL) -> int:
    return 443 if url.scheme == "https" else 80
