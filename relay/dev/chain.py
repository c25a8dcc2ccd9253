"""A local development chain: anvil posing as Base Sepolia, with a USDC-like test token.

``DevChain.start()`` runs ``anvil`` (from the npm package ``@foundry-rs/anvil``; ``npm ci``
installs it) on a free 127.0.0.1 port with chain id 84532, places the runtime code of
``contracts/TestUSDC.sol`` at the canonical Base Sepolia USDC address and Multicall3 at its
canonical address (anvil lacks it; the x402 SDK uses it for diagnostics), so the relay runs
with its real network settings and only ``RPC_URL`` differs.

The chain always stops what it started: use it as a context manager, or call ``stop()``; an
atexit hook and the error paths of ``start()`` stop it too. anvil runs in its own session
(process group), which ``stop()`` terminates and, if need be, kills as a whole.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self

from eth_account import Account
from eth_account.hdaccount import key_from_seed, seed_from_mnemonic
from eth_typing import ChecksumAddress
from web3 import Web3
from web3.contract import Contract
from web3.types import RPCEndpoint, TxReceipt

from relay.abi import load_abi, load_artifact
from relay.chain import web3_for
from relay.retry import Backoff, retry

REPO_ROOT = Path(__file__).resolve().parent.parent.parent

CHAIN_ID = 84532
NETWORK = "eip155:84532"
USDC_ADDRESS: ChecksumAddress = Web3.to_checksum_address(
    "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
)
MULTICALL3_ADDRESS: ChecksumAddress = Web3.to_checksum_address(
    "0xcA11bde05977b3631167028862bE2a173976CA11"
)
USDC_EIP712_NAME = "USDC"
USDC_EIP712_VERSION = "2"
USDC_DECIMALS = 6

#: anvil's default mnemonic; its accounts are public knowledge, for local chains only.
ANVIL_MNEMONIC = "test test test test test test test test test test test junk"
#: An address with no known key that mint() sends from (impersonated), so minting never
#: consumes a nonce of the dev accounts the tests use as settlers or payers.
MINTER_ADDRESS: ChecksumAddress = Web3.to_checksum_address(
    "0x00000000000000000000000000000000000d3e10"
)

_LISTENING = re.compile(rb"Listening on (\d+\.\d+\.\d+\.\d+):(\d+)")
_STOP_GRACE_SECONDS = 5.0
#: A bound on the polls of a starting anvil; the start-up timeout is the real limit.
_READY_ATTEMPTS = 10_000


class DevChainError(RuntimeError):
    """anvil could not be found, started, or driven."""


class DevAccount(NamedTuple):
    """A funded anvil account: (address, private key as 0x-hex)."""

    address: ChecksumAddress
    private_key: str


def dev_accounts(count: int = 10, mnemonic: str = ANVIL_MNEMONIC) -> list[DevAccount]:
    """The accounts anvil creates from ``mnemonic`` (path m/44'/60'/0'/0/i)."""
    seed = seed_from_mnemonic(mnemonic, "")
    accounts = []
    for index in range(count):
        key = key_from_seed(seed, f"m/44'/60'/0'/0/{index}")
        address = Web3.to_checksum_address(Account.from_key(key).address)
        accounts.append(DevAccount(address, "0x" + key.hex()))
    return accounts


def _platform_package() -> str | None:
    """The @foundry-rs platform package that ships the anvil binary for this machine."""
    system = {"linux": "linux", "darwin": "darwin", "win32": "win32"}.get(sys.platform)
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "arm64": "arm64", "aarch64": "arm64"}.get(machine)
    if system is None or arch is None:
        return None
    return f"anvil-{system}-{arch}"


def find_anvil(anvil_path: str | os.PathLike[str] | None = None) -> str:
    """Locate the anvil binary.

    In order: ``anvil_path`` if given; the binary of the npm platform package
    (``node_modules/@foundry-rs/anvil-<os>-<arch>/bin/anvil``); the npm wrapper
    ``node_modules/.bin/anvil``; ``anvil`` on PATH.
    """
    exe = ".exe" if sys.platform == "win32" else ""
    if anvil_path is not None:
        path = Path(anvil_path)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise DevChainError(f"anvil_path {str(path)!r} is not an executable file")
        return str(path)

    node_modules = REPO_ROOT / "node_modules"
    candidates = []
    package = _platform_package()
    if package is not None:
        candidates.append(node_modules / "@foundry-rs" / package / "bin" / f"anvil{exe}")
    candidates.append(node_modules / ".bin" / ("anvil.cmd" if exe else "anvil"))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)

    found = shutil.which("anvil")
    if found is not None:
        return found
    raise DevChainError(
        f"anvil not found: run `npm ci` in {REPO_ROOT} (it installs @foundry-rs/anvil), "
        "or install Foundry and put anvil on PATH"
    )


class DevChain:
    """A running anvil with TestUSDC and Multicall3 in place. Create with ``DevChain.start()``.

    Attributes:
        rpc_url: ``http://127.0.0.1:<port>``.
        w3: a Web3 HTTP client for ``rpc_url``.
        accounts: the funded dev accounts, ``[(address, private_key), ...]``; each holds
            10000 ETH and no USDC.
        token: the TestUSDC contract at ``USDC_ADDRESS`` (full ABI, incl. ``mint``).
        multicall: the Multicall3 contract at ``MULTICALL3_ADDRESS``.
        pid: anvil's process id (and process group id on POSIX); None once stopped.
        block_time: the interval-mining period, or None for automine (one block per tx).
        log_path: anvil's stdout/stderr (deleted by ``stop()``).
    """

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        log_path: Path,
        accounts: list[DevAccount],
        block_time: float | None,
    ) -> None:
        self._process: subprocess.Popen[bytes] | None = process
        self.log_path = log_path
        self.accounts = accounts
        self.block_time = block_time
        self.rpc_url = ""
        self.w3 = Web3()
        self._token: Contract | None = None
        self._multicall: Contract | None = None
        atexit.register(self.stop)

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def start(
        cls,
        block_time: float | None = None,
        accounts: int = 10,
        *,
        anvil_path: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30.0,
    ) -> DevChain:
        """Start anvil and install the contracts. ``block_time`` (seconds, may be fractional)
        switches from automine to interval mining."""
        if accounts < 1:
            raise ValueError("accounts must be >= 1")
        if block_time is not None and block_time <= 0:
            raise ValueError("block_time must be > 0 (or None for automine)")
        binary = find_anvil(anvil_path)
        derived = dev_accounts(accounts)
        args = [
            binary,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--chain-id",
            str(CHAIN_ID),
            "--accounts",
            str(accounts),
            "--mnemonic",
            ANVIL_MNEMONIC,
        ]
        if block_time is not None:
            args += ["--block-time", f"{block_time:g}"]

        fd, log_name = tempfile.mkstemp(prefix="relay-anvil-", suffix=".log")
        log_path = Path(log_name)
        try:
            with os.fdopen(fd, "wb") as log:
                process = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=(os.name == "posix"),
                )
        except BaseException:
            log_path.unlink(missing_ok=True)
            raise

        chain = cls(process, log_path, derived, block_time)  # registers the atexit stop
        try:
            chain._wait_until_ready(startup_timeout)
            chain._install_contracts()
        except BaseException:
            chain.stop()
            raise
        return chain

    def _log_tail(self, limit: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-limit:].decode(errors="replace")
        except OSError:
            return ""

    def _wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        process = self._process
        assert process is not None
        while not self.rpc_url:
            if process.poll() is not None:
                raise DevChainError(
                    f"anvil exited with status {process.returncode}:\n{self._log_tail()}"
                )
            match = _LISTENING.search(self.log_path.read_bytes())
            if match:
                host, port = match.group(1).decode(), match.group(2).decode()
                self.rpc_url = f"http://{host}:{port}"
            elif time.monotonic() > deadline:
                raise DevChainError(f"anvil did not start within {timeout}s:\n{self._log_tail()}")
            else:
                time.sleep(0.02)

        self.w3 = web3_for(self.rpc_url, timeout=30, lean=False)  # the node signs for it
        chain_id = self._first_answer(process, deadline)
        if chain_id != CHAIN_ID:
            raise DevChainError(f"anvil reports chain id {chain_id}, expected {CHAIN_ID}")
        node_accounts = [Web3.to_checksum_address(a) for a in self.w3.eth.accounts]
        if node_accounts != [account.address for account in self.accounts]:
            raise DevChainError("anvil's accounts differ from those derived from the mnemonic")

    def _first_answer(self, process: subprocess.Popen[bytes], deadline: float) -> int:
        """The chain id, asked until anvil answers, exits or the deadline passes."""

        def alive(error: Exception) -> bool:  # web3 raises requests' errors: all OSErrors
            return isinstance(error, OSError) and process.poll() is None

        patience = Backoff(_READY_ATTEMPTS, 0.02, 0.1, budget=deadline - time.monotonic())
        try:
            return retry(lambda _: self.w3.eth.chain_id, patience, retryable=alive)
        except OSError:
            raise DevChainError(
                f"anvil at {self.rpc_url} did not answer:\n{self._log_tail()}"
            ) from None

    def _install_contracts(self) -> None:
        for address, name in ((USDC_ADDRESS, "TestUSDC"), (MULTICALL3_ADDRESS, "Multicall3")):
            code = load_artifact(name)["deployedBytecode"]
            self.rpc("anvil_setCode", address, code)
            if self.w3.eth.get_code(address).hex() != code.removeprefix("0x").lower():
                raise DevChainError(f"anvil_setCode did not place {name} at {address}")
        self._token = self.w3.eth.contract(address=USDC_ADDRESS, abi=load_abi("TestUSDC"))
        self._multicall = self.w3.eth.contract(
            address=MULTICALL3_ADDRESS, abi=load_abi("Multicall3")
        )
        self.set_eth_balance(MINTER_ADDRESS, 10**24)

    @property
    def token(self) -> Contract:
        """The TestUSDC contract at USDC_ADDRESS (full ABI, including ``mint``)."""
        if self._token is None:
            raise DevChainError("the dev chain has not finished starting")
        return self._token

    @property
    def multicall(self) -> Contract:
        """The Multicall3 contract at MULTICALL3_ADDRESS."""
        if self._multicall is None:
            raise DevChainError("the dev chain has not finished starting")
        return self._multicall

    @property
    def running(self) -> bool:
        """Whether the anvil process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """anvil's process id (also its process group id on POSIX), None once stopped."""
        return None if self._process is None else self._process.pid

    def stop(self) -> None:
        """Stop anvil (its whole process group) and clean up. Idempotent."""
        atexit.unregister(self.stop)
        process, self._process = self._process, None
        if process is not None:
            try:
                self._signal(process, signal.SIGTERM)
                try:
                    process.wait(timeout=_STOP_GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    self._signal(process, signal.SIGKILL if os.name == "posix" else signal.SIGTERM)
                    process.wait(timeout=_STOP_GRACE_SECONDS)
            finally:
                # The session may still have live helpers (e.g. the npm node wrapper).
                if os.name == "posix":
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(process.pid, signal.SIGKILL)
        self.log_path.unlink(missing_ok=True)

    @staticmethod
    def _signal(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        if os.name == "posix":
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, sig)
        elif sig == signal.SIGTERM:
            process.terminate()
        else:
            process.kill()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"DevChain({self.rpc_url or 'not started'}, {state})"

    # ------------------------------------------------------------------ RPC helpers

    def rpc(self, method: str, *params: Any) -> Any:
        """A raw JSON-RPC call; raises DevChainError on an error reply."""
        response = self.w3.provider.make_request(RPCEndpoint(method), list(params))
        if "error" in response:
            raise DevChainError(f"{method} failed: {response['error']}")
        return response.get("result")

    def mine(self, blocks: int = 1) -> None:
        """Mine ``blocks`` blocks now (including any pending transactions)."""
        self.rpc("anvil_mine", hex(blocks))

    def set_automine(self, enabled: bool) -> None:
        """Turn automine (a block per transaction) on or off. Off, transactions wait in the
        mempool until ``mine()`` (or interval mining, if ``block_time`` was set)."""
        self.rpc("evm_setAutomine", enabled)

    @property
    def automine(self) -> bool:
        """Whether every transaction is mined at once."""
        return bool(self.rpc("anvil_getAutomine"))

    def increase_time(self, seconds: int) -> None:
        """Move the chain clock forward; takes effect from the next block."""
        self.rpc("evm_increaseTime", seconds)

    def drop_transaction(self, tx_hash: str) -> None:
        """Remove a pending transaction from the mempool (simulates a lost broadcast)."""
        self.rpc("anvil_dropTransaction", tx_hash)

    def drop_all_transactions(self) -> None:
        """Empty the mempool."""
        self.rpc("anvil_dropAllTransactions")

    def set_eth_balance(self, address: str, wei: int) -> None:
        """Set an address's ETH balance (e.g. to starve a settler of gas)."""
        self.rpc("anvil_setBalance", Web3.to_checksum_address(address), hex(wei))

    # ------------------------------------------------------------------ token helpers

    def usdc_balance(self, address: str) -> int:
        """TestUSDC balance in atomic units (6 decimals)."""
        return int(self.token.functions.balanceOf(Web3.to_checksum_address(address)).call())

    def mint(self, address: str, atomic_amount: int, *, timeout: float = 30.0) -> TxReceipt:
        """Mint TestUSDC to ``address`` and wait until it is mined.

        Sent from ``MINTER_ADDRESS`` (impersonated), so no dev account's nonce moves. With
        automine off and no interval mining, this mines a block itself, which also includes
        any other pending transactions.
        """
        call = self.token.functions.mint(Web3.to_checksum_address(address), atomic_amount)
        self.rpc("anvil_impersonateAccount", MINTER_ADDRESS)
        try:
            tx_hash = call.transact({"from": MINTER_ADDRESS})
        finally:
            # impersonated accounts show up in eth_accounts; keep that list to the dev accounts
            self.rpc("anvil_stopImpersonatingAccount", MINTER_ADDRESS)
        if self.block_time is None and not self.automine:
            self.mine()
        receipt = self.w3.eth.wait_for_transaction_receipt(
            tx_hash, timeout=timeout, poll_latency=0.05
        )
        if receipt["status"] != 1:
            raise DevChainError(f"mint reverted: {tx_hash.to_0x_hex()}")
        return receipt
