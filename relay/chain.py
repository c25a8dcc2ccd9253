"""The chain: the one way a Web3 client is built, and reading what the chain did — receipts,
its height, and the fate of an EIP-3009 authorization found in the token's logs."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote

import certifi
import requests
import urllib3
from eth_typing import URI, ChecksumAddress, HexStr
from requests.utils import get_environ_proxies
from web3 import Web3
from web3._utils.http_session_manager import HTTPSessionManager
from web3.exceptions import TimeExhausted, TransactionNotFound
from web3.types import TxReceipt

from relay.abi import load_abi
from relay.configs import ChainConfig
from relay.errors import ChainUnavailable
from relay.payment_headers import ParsedPayment

log = logging.getLogger(__name__)

#: Every RPC request's timeout (the doctor uses a shorter one).
RPC_TIMEOUT_SECONDS = 10.0
#: Kept-alive connections per RPC client (more are opened when threads need them, not kept).
POOL_CONNECTIONS = 32
JSON_HEADERS = {"Content-Type": "application/json"}
#: web3's default middleware that a lean client leaves out (see ``web3_for``).
NODE_SIGNING_MIDDLEWARE = (
    "ens_name_to_address",
    "validation",
    "gas_price_strategy",
    "gas_estimate",
)
RETRY_AFTER_SECONDS = 5
#: How often the process's receipt watcher asks for the chain's height while anyone waits.
BLOCK_POLL_SECONDS = 0.05
#: ... and how often it asks for the receipts still missing when no new block came.
RECHECK_SECONDS = 1.0
LOG_WINDOW_BLOCKS = 10_000  # hours on Base, and within common RPC log-range limits
BLOCK_CACHE_SECONDS = 5.0
AUTHORIZATION_USED = Web3.keccak(text="AuthorizationUsed(address,bytes32)").to_0x_hex()
AUTHORIZATION_CANCELED = Web3.keccak(text="AuthorizationCanceled(address,bytes32)").to_0x_hex()
TRANSFER = Web3.keccak(text="Transfer(address,address,uint256)").to_0x_hex()


def web3_for(
    rpc_url: str,
    *,
    timeout: float = RPC_TIMEOUT_SECONDS,
    retries: bool = True,
    known_chain: bool = False,
    lean: bool = True,
) -> Web3:
    """A Web3 client of ``rpc_url``, every request bounded by ``timeout``; ``retries`` keeps
    web3's own quick retries of read calls after a connection error; ``known_chain`` lets
    web3 keep the chain id once asked (a signer's client: never one that checks the RPC).

    ``lean`` leaves out the middleware that a client signing its own transactions never
    needs and that costs more than the request itself (up to 1 ms per call): ENS names
    looked up in every address argument, the chain id checked in each call's parameters,
    gas prices and limits filled in for transactions the node would sign. The development
    chain, which has the node sign, keeps them.
    """
    options: dict[str, Any] = {} if retries else {"exception_retry_configuration": None}
    if known_chain:
        options |= {"cache_allowed_requests": True, "cacheable_requests": {"eth_chainId"}}
    provider = Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": timeout}, **options)
    # web3 posts every request through its session manager: ours is a pool of kept-alive
    # connections that the process's threads share.
    provider._request_session_manager = PooledPoster(rpc_url, timeout)
    w3 = Web3(provider)
    if lean:
        for name in NODE_SIGNING_MIDDLEWARE:
            w3.middleware_onion.remove(name)
    return w3


class PooledPoster(HTTPSessionManager):
    """What web3's HTTP provider posts its JSON-RPC requests through: one urllib3 pool of
    kept-alive connections per client, shared by every thread, instead of a requests session
    per thread (a third of the client's cost per request).

    It keeps what requests gave the provider: credentials in the URL sent as basic
    authentication, the proxy of ``HTTPS_PROXY``/``HTTP_PROXY`` unless ``NO_PROXY`` names
    the host, certificates checked against ``REQUESTS_CA_BUNDLE`` or certifi's, a few
    redirects followed (a moved 307/308 endpoint keeps the POST and its body); and failures
    are raised as the requests exceptions web3 retries on, so its retries and our error
    handling see the same."""

    def __init__(self, endpoint: str, timeout: float) -> None:
        super().__init__()
        self._timeout = timeout
        url = urllib3.util.parse_url(endpoint)
        self._headers = dict(JSON_HEADERS)
        if url.auth:
            self._headers |= urllib3.make_headers(basic_auth=unquote(url.auth))
        self._url = url._replace(auth=None).url
        options: dict[str, Any] = {
            "num_pools": 4,
            "maxsize": POOL_CONNECTIONS,
            "retries": urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=5),
            "ca_certs": os.environ.get("REQUESTS_CA_BUNDLE") or certifi.where(),
        }
        proxy = get_environ_proxies(self._url).get(url.scheme or "http")
        if proxy:
            via = urllib3.util.parse_url(proxy)
            login = urllib3.make_headers(proxy_basic_auth=unquote(via.auth)) if via.auth else None
            self._pool: urllib3.PoolManager = urllib3.ProxyManager(
                via._replace(auth=None).url, proxy_headers=login, **options
            )
        else:
            self._pool = urllib3.PoolManager(**options)

    def make_post_request(
        self, endpoint_uri: URI, data: bytes | dict[str, Any], **kwargs: Any
    ) -> bytes:
        timeout = kwargs.get("timeout") or self._timeout
        try:
            response = self._pool.request(
                "POST", self._url, body=data, headers=self._headers, timeout=timeout
            )
        except urllib3.exceptions.MaxRetryError as exc:  # a failure while following a redirect
            raise _requests_error(exc.reason or exc) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _requests_error(exc) from exc
        if response.status >= 300:
            raise requests.HTTPError(f"{response.status} from the RPC")
        return bytes(response.data)


def _requests_error(exc: BaseException) -> requests.RequestException:
    """The requests exception web3 (and our handlers) expect for a urllib3 failure."""
    timed_out = isinstance(exc, urllib3.exceptions.TimeoutError | TimeoutError)
    # A refused connection is a TimeoutError to urllib3; to requests (and web3) it is not.
    if timed_out and not isinstance(exc, urllib3.exceptions.NewConnectionError):
        return requests.Timeout(str(exc))
    return requests.ConnectionError(str(exc))


def chain_unavailable() -> ChainUnavailable:
    """503: the chain (or the facilitator) cannot be asked now; retry shortly."""
    return ChainUnavailable(retry_after=RETRY_AFTER_SECONDS)


@dataclass(frozen=True)
class AuthorizationFate:
    """What the chain says of an authorization: unused, used (by ``transaction``), canceled
    by the payer, or used with no log found (settled-unknown: never treated as failed)."""

    state: Literal["unused", "used", "canceled", "unknown"]
    transaction: str | None = None


class ChainReader:
    """Reads one chain: receipts, its height and the token's authorization logs."""

    def __init__(self, chain: ChainConfig) -> None:
        self._chain = chain
        self._w3 = web3_for(chain.rpc_url)
        self._block: tuple[float, int] | None = None

    def up(self) -> bool:
        """Whether the RPC answers, for the configured chain."""
        try:
            return self._w3.eth.chain_id == self._chain.chain_id
        except Exception:
            return False

    def receipt(self, transaction: str) -> TxReceipt | None:
        """The receipt of a mined ``transaction``; None while it is not mined."""
        try:
            return self._w3.eth.get_transaction_receipt(HexStr(transaction))
        except TransactionNotFound:
            return None
        except Exception as exc:
            log.warning("receipt lookup failed: %s", type(exc).__name__)
            raise chain_unavailable() from exc

    def reverted(self, transaction: str) -> bool:
        """Whether ``transaction`` was mined and reverted (so it moved nothing)."""
        receipt = self.receipt(transaction)
        return receipt is not None and receipt["status"] != 1

    def has_code(self, address: str) -> bool:
        """Whether ``address`` holds code; ChainUnavailable when the chain cannot be asked."""
        try:
            return len(self._w3.eth.get_code(Web3.to_checksum_address(address))) > 0
        except Exception as exc:
            log.warning("code lookup failed: %s", type(exc).__name__)
            raise chain_unavailable() from exc

    def block_number(self) -> int | None:
        """The chain's height (cached a few seconds, so possibly a little lower); None when
        the chain cannot be asked."""
        now = time.monotonic()
        cached = self._block
        if cached is not None and now - cached[0] < BLOCK_CACHE_SECONDS:
            return cached[1]
        try:
            number = int(self._w3.eth.block_number)
        except Exception as exc:
            log.warning("block number lookup failed: %s", type(exc).__name__)
            return None
        self._block = (now, number)
        return number

    def fate(self, parsed: ParsedPayment, from_block: int | None) -> AuthorizationFate:
        """What the chain did with this payment's authorization, searching its logs from
        ``from_block`` (without it, the last LOG_WINDOW_BLOCKS).

        An authorization used but with no log found is "unknown", never a failure: money may
        have moved. Raises ChainUnavailable when the chain cannot be asked.
        """
        token = self._w3.eth.contract(address=self._token_address(), abi=load_abi("USDC"))
        payer = Web3.to_checksum_address(parsed.payer)
        nonce = bytes.fromhex(parsed.nonce[2:])
        try:
            if not token.functions.authorizationState(payer, nonce).call():
                return AuthorizationFate("unused")
            latest = int(self._w3.eth.block_number)
            start = max(0, latest - LOG_WINDOW_BLOCKS if from_block is None else from_block)
            found = self._authorization_logs(parsed, start, latest)
        except Exception as exc:
            log.warning("authorization lookup failed: %s", type(exc).__name__)
            raise chain_unavailable() from exc
        if found is None:
            log.warning("authorization of %s used without a log found", parsed.payer)
            return AuthorizationFate("unknown")
        kind, transaction = found
        return AuthorizationFate(kind, transaction)

    def _authorization_logs(
        self, parsed: ParsedPayment, start: int, latest: int
    ) -> tuple[Literal["used", "canceled"], str] | None:
        """The AuthorizationUsed or AuthorizationCanceled log of (payer, nonce), searched in
        windows of LOG_WINDOW_BLOCKS (common RPC limits) from ``start``."""
        payer_topic = "0x" + parsed.payer.lower().removeprefix("0x").rjust(64, "0")
        topics: Any = [[AUTHORIZATION_USED, AUTHORIZATION_CANCELED], payer_topic, parsed.nonce]
        asset = self._token_address()
        for low in range(start, latest + 1, LOG_WINDOW_BLOCKS):
            high = min(low + LOG_WINDOW_BLOCKS - 1, latest)
            logs = self._w3.eth.get_logs(
                {"address": asset, "fromBlock": low, "toBlock": high, "topics": topics}
            )
            for entry in logs:
                used = _hex(entry["topics"][0]) == AUTHORIZATION_USED
                return ("used" if used else "canceled"), _hex(entry["transactionHash"])
        return None

    def _token_address(self) -> ChecksumAddress:
        return Web3.to_checksum_address(self._chain.usdc_address)


# ---------------------------------------------------------------------- receipt watcher


@dataclass
class _Waiter:
    transaction: str
    done: threading.Event = field(default_factory=threading.Event)
    receipt: TxReceipt | None = None


class ReceiptWatcher:
    """One thread per process and RPC watches for every receipt its settlements and refunds
    wait for: while anyone waits it asks for the chain's height every BLOCK_POLL_SECONDS,
    and on each new block asks once for each receipt still missing. Twenty settlements
    waiting on one block cost one height query per poll, not twenty receipt queries."""

    def __init__(self, rpc_url: str, poll_seconds: float = BLOCK_POLL_SECONDS) -> None:
        self._w3 = web3_for(rpc_url, retries=False)  # it asks again at the next poll
        self._poll = poll_seconds
        self._lock = threading.Lock()
        self._waiting: dict[int, _Waiter] = {}
        self._running = False

    def wait(self, transaction: str, timeout: float) -> TxReceipt:
        """The receipt of ``transaction``, asked at once (an automining chain has it already)
        and then watched; web3's TimeExhausted after ``timeout`` seconds."""
        try:
            receipt = self._receipt(transaction)
        except Exception as exc:  # a blip just after broadcast: the watcher asks again
            log.info("receipt lookup failed, watching: %s", type(exc).__name__)
            receipt = None
        if receipt is not None:
            return receipt
        waiter = _Waiter(transaction)
        with self._lock:
            self._waiting[id(waiter)] = waiter
            if not self._running:
                try:
                    threading.Thread(target=self._watch, name="receipts", daemon=True).start()
                except BaseException:
                    del self._waiting[id(waiter)]
                    raise
                self._running = True
        try:
            if not waiter.done.wait(timeout) or waiter.receipt is None:
                raise TimeExhausted(f"no receipt of {transaction} after {timeout} s")
            return waiter.receipt
        finally:
            with self._lock:
                self._waiting.pop(id(waiter), None)

    def _watch(self) -> None:
        seen: int | None = None
        checked = float("-inf")
        failing = False
        while True:
            with self._lock:
                waiting = list(self._waiting.values())
                if not waiting:
                    self._running = False
                    return
            try:
                height = int(self._w3.eth.block_number)
                # A new block, or a while since the last look (a node may index late).
                if height != seen or time.monotonic() - checked >= RECHECK_SECONDS:
                    self._look(waiting)
                    seen, checked = height, time.monotonic()
                failing = False
            except Exception as exc:  # the waiters time out; the next poll tries again
                if not failing:  # once per outage, not every poll
                    log.warning("receipt watch failed: %s", type(exc).__name__)
                failing = True
            time.sleep(self._poll)

    def _look(self, waiting: list[_Waiter]) -> None:
        """Ask for the receipt of each waiter that has none yet; a receipt found is kept,
        whatever a lagging node says later."""
        for waiter in waiting:
            if waiter.done.is_set():
                continue
            receipt = self._receipt(waiter.transaction)
            if receipt is not None:
                waiter.receipt = receipt
                waiter.done.set()

    def _receipt(self, transaction: str) -> TxReceipt | None:
        try:
            return self._w3.eth.get_transaction_receipt(HexStr(transaction))
        except TransactionNotFound:
            return None


_watchers: dict[tuple[int, str], ReceiptWatcher] = {}
_watchers_lock = threading.Lock()


def receipt_watcher(rpc_url: str) -> ReceiptWatcher:
    """This process's watcher of ``rpc_url`` (a forked worker makes its own)."""
    key = (os.getpid(), rpc_url)
    with _watchers_lock:
        watcher = _watchers.get(key)
        if watcher is None:
            watcher = _watchers[key] = ReceiptWatcher(rpc_url)
        return watcher


# ---------------------------------------------------------------------- receipt logs


def _hex(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return "0x" + bytes(value).hex()
    if hasattr(value, "to_0x_hex"):
        return str(value.to_0x_hex())
    text = str(value).lower()
    return text if text.startswith("0x") else "0x" + text


def _topic_address(topic: Any) -> str:
    return "0x" + _hex(topic)[-40:]


def _is_event(entry: Any, token: str, topic: str, count: int) -> bool:
    topics = entry["topics"]
    return (
        str(entry["address"]).lower() == token.lower()
        and len(topics) == count
        and _hex(topics[0]) == topic
    )


def authorization_log(logs: list[Any], token: str, parsed: ParsedPayment) -> int | None:
    """The position in ``logs`` of the AuthorizationUsed log of this payment's (payer, nonce)."""
    for position, entry in enumerate(logs):
        if (
            _is_event(entry, token, AUTHORIZATION_USED, 3)
            and _topic_address(entry["topics"][1]) == parsed.payer.lower()
            and _hex(entry["topics"][2]) == parsed.nonce.lower()
        ):
            return position
    return None


def paying_transfer(logs: list[Any], token: str, parsed: ParsedPayment, pay_to: str) -> int | None:
    """The log index of the Transfer that this payment's own authorization produced, if it
    paid ``pay_to`` exactly the amount from the payer; None otherwise.

    The token emits AuthorizationUsed(payer, nonce) and then that call's Transfer as the next
    log: any other Transfer in the transaction (a batch of several authorizations) pays for
    something else.
    """
    position = authorization_log(logs, token, parsed)
    if position is None or position + 1 >= len(logs):
        return None
    transfer = logs[position + 1]
    if not _is_event(transfer, token, TRANSFER, 3):
        return None
    topics = transfer["topics"]
    data = _hex(transfer["data"]).removeprefix("0x")
    paid = (
        _topic_address(topics[1]) == parsed.payer.lower()
        and _topic_address(topics[2]) == pay_to.lower()
        and len(data) == 64
        and int(data, 16) == parsed.value
    )
    return int(transfer["logIndex"]) if paid else None


def gas_balance(rpc_url: str, address: str, timeout: float) -> int:
    """The wei ``address`` holds to pay gas, asked once: a short time-out and no retries,
    so a dead RPC costs one time-out."""
    w3 = web3_for(rpc_url, timeout=timeout, retries=False)
    return int(w3.eth.get_balance(Web3.to_checksum_address(address)))
