"""`relay dev`: the whole stack on one machine — a local chain with the test USDC, the local
facilitator, rules moderation, the outbox SMS provider, the reconciler and a funded demo
payer."""

from __future__ import annotations

import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from eth_account import Account
from werkzeug.serving import BaseWSGIServer, make_server

from relay.app import create_app
from relay.client import RelayClient
from relay.dev.chain import DevChain
from relay.ledger import Ledger
from relay.services import Services, build_services
from relay.settings import Settings
from relay.worker import Worker

DEMO_USDC = 100_000_000  # 100 test USDC for the demo payer
DEMO_TO = "+13012576365"
DEMO_MESSAGE = "Your order has shipped — track it at example.com/t/123"

Say = Callable[[str], None]


class DevStack:
    """A running development stack; stop() (or the context manager) stops all of it."""

    def __init__(
        self,
        chain: DevChain,
        services: Services,
        server: BaseWSGIServer,
        scratch: Path | None = None,
    ) -> None:
        self.chain = chain
        self.scratch = scratch
        self.services = services
        self.server = server
        self.payer = Account.create()
        chain.mint(self.payer.address, DEMO_USDC)
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        self.worker = Worker(services)
        self.worker.start()

    @classmethod
    def start(cls, *, port: int = 8000, database: str | None = None, say: Say) -> DevStack:
        """Start anvil, the relay on PORT and a funded payer."""
        say("starting a local chain (anvil, chain id 84532) with the test USDC...")
        chain = DevChain.start()
        scratch = None if database else Path(tempfile.mkdtemp(prefix="relay-dev-"))
        try:
            url = database or f"sqlite:///{scratch}/relay.db"
            Ledger.upgrade_database(url)  # one process serves: it migrates, then opens
            services = build_services(dev_settings(chain, url))
            server = make_server("127.0.0.1", port, create_app(services=services), threaded=True)
        except BaseException:
            chain.stop()
            _remove(scratch)
            raise
        return cls(chain, services, server, scratch)

    @property
    def url(self) -> str:
        """The relay's base URL."""
        return f"http://127.0.0.1:{self.server.server_port}"

    def usage(self) -> str:
        """How to use the running stack."""
        settings = self.services.settings
        return "\n".join(
            [
                f"relay dev is running at {self.url}",
                f"  chain RPC        {self.chain.rpc_url} (chain id 84532)",
                f"  USDC (test)      {settings.usdc_address}",
                f"  payTo            {settings.pay_to_address}",
                f"  demo payer       {self.payer.address} (100 test USDC)",
                f"  database         {self.services.settings.database_url}"
                + (" (deleted when this stops)" if self.scratch else ""),
                "",
                "Send a paid SMS from another terminal (the key is a throwaway dev key):",
                f"  export RELAY_URL={self.url}",
                f"  export PAYER_PRIVATE_KEY={self.payer.key.hex()}",
                f"  export DATABASE_URL={settings.database_url}",
                f'  relay send --to "{DEMO_TO}" --max-price 0.10 "Hello from x402"',
                "  relay ledger                  # payments, messages and refunds so far",
                "Messages land in the outbox table of the dev database; Ctrl-C stops everything.",
            ]
        )

    def demo(self, say: Say) -> dict[str, object]:
        """Quote → 402 → sign → settle → SMS in the outbox, printing each step."""
        client = RelayClient(self.url, self.payer.key.hex(), on_step=lambda s: say(f"  {s}"))
        say(f"relay running at {self.url}; demo payer {self.payer.address}")
        with client:
            quote = client.quote(DEMO_MESSAGE, DEMO_TO)
            say(
                f"quote: {quote['segments']} segment(s), {quote['encoding']}, "
                f"price {quote['price_usd']} USD ({quote['price_atomic']} atomic USDC)"
            )
            before = self.chain.usdc_balance(self.payer.address)
            result = client.send(DEMO_MESSAGE, DEMO_TO, max_price_usd="0.10")
        paid = before - self.chain.usdc_balance(self.payer.address)
        say(f"settled on-chain: transaction {result['transaction']} ({paid} atomic USDC paid)")
        say(f"message id: {result['message_id']} (status {result['status']})")
        for sms in self.services.ledger.outbox_messages():
            say(f"outbox → {sms['destination']}:\n    " + sms["body"].replace("\n", "\n    "))
        return result

    def stop(self) -> None:
        """Stop the HTTP server, the reconciler and the chain."""
        self.worker.stop()
        self.server.shutdown()
        self.server.server_close()
        self.services.payments.close()
        self.services.ledger.engine.dispose()
        self.chain.stop()
        _remove(self.scratch)

    def __enter__(self) -> DevStack:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def dev_settings(chain: DevChain, database_url: str) -> Settings:
    """Development settings: real network settings, only the RPC is local."""
    return Settings(
        quote_secret=secrets.token_hex(32),
        pay_to_address=chain.accounts[1].address,
        facilitator="local",
        rpc_url=chain.rpc_url,
        settler_private_key=chain.accounts[0].private_key,
        moderation_provider="rules",
        sms_provider="outbox",
        database_url=database_url,
        quote_rate_limit="600/minute",
        worker_interval_seconds=2.0,
    )


def _remove(folder: Path | None) -> None:
    """Delete the throwaway database folder of a stack without --database."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
