"""The relay's JSON-RPC client (relay/chain.py ``web3_for``): web3 posting through one pool
of kept-alive connections, its failures raised as the requests exceptions web3 retries on."""

from __future__ import annotations

import base64
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from relay.chain import web3_for
from relay.dev.chain import DevChain
from relay.logs import hide_in_logs
from relay.nonces import _quantity
from tests.rpc_proxy import RpcProxy


@pytest.fixture
def proxy(chain: DevChain) -> Iterator[RpcProxy]:
    with RpcProxy(chain.rpc_url) as served:
        yield served


def test_threads_share_kept_alive_connections(chain: DevChain, proxy: RpcProxy) -> None:
    """Sixteen threads asking one after the other reuse one connection, not one each."""
    w3 = web3_for(proxy.url)
    heights: list[int] = []
    one_at_a_time, all_asked = threading.Lock(), threading.Barrier(16)

    def ask() -> None:
        with one_at_a_time:
            heights.append(w3.eth.block_number)
        all_asked.wait(timeout=10)  # every thread stays alive until all have asked

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(heights) == 16
    assert proxy.requests == 16
    assert proxy.connections == 1


def test_concurrent_calls_and_batches_get_their_own_answers(
    chain: DevChain, proxy: RpcProxy
) -> None:
    w3 = web3_for(proxy.url)
    accounts = [account.address for account in chain.accounts]

    def balances(address: str) -> tuple[int, int]:
        with w3.batch_requests() as batch:
            batch.add(w3.eth.get_balance(address))
            batch.add(w3.eth.get_transaction_count(address))
            balance, count = batch.execute()
        return int(balance), int(count)

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(balances, accounts * 4))
    eth = chain.w3.eth
    expected = [(eth.get_balance(a), eth.get_transaction_count(a)) for a in accounts]
    assert got == expected * 4
    assert proxy.batches == len(accounts) * 4


def test_a_node_answering_an_error_status_is_an_http_error(
    chain: DevChain, proxy: RpcProxy
) -> None:
    proxy.down = True
    with pytest.raises(requests.HTTPError):
        web3_for(proxy.url, retries=False).eth.get_block_number()


def test_a_refused_connection_is_a_connection_error() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(requests.ConnectionError):
        web3_for(f"http://127.0.0.1:{port}", retries=False).eth.get_block_number()


def test_a_node_that_never_answers_times_out() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)  # connections are queued, never answered
        port = silent.getsockname()[1]
        with pytest.raises(requests.Timeout):
            web3_for(f"http://127.0.0.1:{port}", timeout=0.3, retries=False).eth.get_block_number()


def test_a_call_is_one_request(chain: DevChain, proxy: RpcProxy) -> None:
    """web3's validation asks the node its chain id twice around every eth_call; the
    relay's clients sign their own transactions with the chain id they read, and leave it
    out (and with it the ENS look-ups of every address argument)."""
    owner = chain.accounts[3].address
    balance_of = "0x70a08231" + owner[2:].lower().rjust(64, "0")
    call: Any = {"from": owner, "to": chain.token.address, "data": balance_of}
    full = web3_for(proxy.url, lean=False)
    assert full.eth.call(call) == web3_for(proxy.url).eth.call(call)
    assert [name for name, _ in proxy.calls] == [
        *("eth_chainId", "eth_call", "eth_chainId"),
        "eth_call",
    ]


def test_credentials_in_the_url_are_sent_as_basic_authentication(
    chain: DevChain, proxy: RpcProxy
) -> None:
    """An RPC URL such as https://user:key@node.example/ (the key escaped) logs in."""
    proxy.required_authorization = "Basic " + base64.b64encode(b"user:k@y/1").decode()
    with pytest.raises(requests.HTTPError):
        web3_for(proxy.url, retries=False).eth.get_block_number()
    hide_in_logs(["k%40y%2F1", "k@y/1"])  # as the app does with the credentials of RPC_URL
    with_login = proxy.url.replace("http://", "http://user:k%40y%2F1@")
    assert web3_for(with_login).eth.get_block_number() == chain.w3.eth.get_block_number()


def test_a_moved_endpoint_is_followed_with_its_request(chain: DevChain, proxy: RpcProxy) -> None:
    with RpcProxy(chain.rpc_url) as old:
        old.moved_to = proxy.url + "/v2"
        assert web3_for(old.url).eth.get_block_number() == chain.w3.eth.get_block_number()
    assert proxy.targets == ["/v2"]
    assert proxy.count("eth_blockNumber") == 1  # the POST and its body, not a GET


def test_the_proxy_of_the_environment_is_used_unless_no_proxy_names_the_host(
    chain: DevChain, proxy: RpcProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY / HTTPS_PROXY and NO_PROXY, as requests (and web3's own client) read them."""
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    node = "http://node.invalid:8545/rpc"  # only the proxy can reach it
    assert web3_for(node).eth.get_block_number() == chain.w3.eth.get_block_number()
    assert proxy.targets == [node]
    monkeypatch.setenv("NO_PROXY", "node.invalid")
    with pytest.raises(requests.ConnectionError):
        web3_for(node, retries=False).eth.get_block_number()


@pytest.mark.parametrize(("answer", "number"), [("0x1a", 26), (26, 26), ("0x0", 0)])
def test_a_quantity_is_read_as_hex_or_as_a_number(answer: object, number: int) -> None:
    assert _quantity(answer) == number


@pytest.mark.parametrize("answer", ["26", None, True, "0xzz", 2.5])
def test_what_is_not_a_quantity_is_refused(answer: object) -> None:
    with pytest.raises(ValueError):
        _quantity(answer)
