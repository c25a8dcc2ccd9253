"""Outbound HTTP through httpx, the one client library: what a failed request proves, and
clients that are closed with the adapter that owns them."""

from __future__ import annotations

import weakref

import httpx


def never_sent(error: BaseException) -> bool:
    """Whether the request certainly never reached the other side: no connection was made.

    Anything later (a timeout, a connection dropped mid-answer) may come after the other side
    acted on the request.
    """
    return isinstance(error, httpx.ConnectError | httpx.ConnectTimeout)


def closed_with(owner: object, client: httpx.Client) -> httpx.Client:
    """``client``, closed when ``owner`` is garbage collected if not closed before: adapters
    live as long as their app, and nothing closes them."""
    weakref.finalize(owner, client.close)
    return client
