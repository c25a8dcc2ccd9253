"""relay.transport against real sockets: what a failed request proves, and owned clients."""

from __future__ import annotations

import gc
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest

from relay.transport import closed_with, never_sent


def free_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def silent() -> Iterator[str]:
    """A server that accepts a connection, reads the request and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        accepted.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/"
    thread.join(timeout=5)
    for conn in accepted:
        conn.close()
    server.close()


def failure(url: str) -> httpx.RequestError:
    with pytest.raises(httpx.RequestError) as caught, httpx.Client(timeout=0.3) as http:
        http.post(url, json={"to": "somewhere"})
    return caught.value


def test_a_refused_connection_was_never_sent() -> None:
    assert never_sent(failure(f"http://127.0.0.1:{free_port()}/"))


def test_a_request_without_an_answer_may_have_been_acted_on(silent: str) -> None:
    error = failure(silent)
    assert isinstance(error, httpx.ReadTimeout)
    assert not never_sent(error)


def test_a_client_is_closed_with_its_owner() -> None:
    class Owner:
        pass

    owner = Owner()
    client = closed_with(owner, httpx.Client())
    assert not client.is_closed
    del owner
    gc.collect()
    assert client.is_closed
