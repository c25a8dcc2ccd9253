"""The small frozen configuration each adapter takes, built from the one ``Settings``
(``relay.settings``): exactly what the adapter needs, secrets kept out of repr()."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from x402.mechanisms.evm.default_assets import DEFAULT_ASSETS
from x402.mechanisms.evm.v1.constants import V1_NETWORK_CHAIN_IDS


@dataclass(frozen=True)
class ChainConfig:
    """The chain, its RPC and its USDC; how long to wait for a receipt."""

    network: str
    # May carry an API key or a password.
    rpc_url: str = field(repr=False)
    usdc_address: str
    receipt_timeout_seconds: float

    @property
    def chain_id(self) -> int:
        """The EVM chain id of the CAIP-2 network."""
        return int(self.network.split(":", 1)[1])

    @property
    def v1_network(self) -> str:
        """The x402 v1 network name (e.g. base-sepolia) of the network."""
        names = {chain: name for name, chain in V1_NETWORK_CHAIN_IDS.items()}
        return names.get(self.chain_id, self.network)

    @property
    def usdc_eip712(self) -> tuple[str, str]:
        """The token's EIP-712 domain name and version."""
        for asset in DEFAULT_ASSETS.get(self.network, []):
            if asset["asset"].lower() == self.usdc_address.lower():
                return asset["name"], asset["version"]
        return "USD Coin", "2"


@dataclass(frozen=True)
class PaymentConfig:
    """The chain, who is paid, and who settles: a remote facilitator or our own key."""

    chain: ChainConfig
    pay_to_address: str
    facilitator: Literal["local", "remote"]
    facilitator_url: str
    settler_private_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class RefundConfig:
    """The chain, and the key of the wallet that sends refunds."""

    chain: ChainConfig
    private_key: str = field(repr=False)


@dataclass(frozen=True)
class GeminiConfig:
    """The key, model and endpoint of the Gemini moderator, with its time and attempts."""

    api_key: str = field(repr=False)
    model: str
    # None is Google's own endpoint; a URL may carry credentials.
    base_url: str | None = field(repr=False)
    timeout_seconds: float
    max_attempts: int


@dataclass(frozen=True)
class SinchConfig:
    """The Sinch account, the number messages come from, and where reports are sent."""

    service_plan_id: str
    api_token: str = field(repr=False)
    sender: str
    base_url: str = field(repr=False)
    # Carries the callback secret.
    callback_url: str | None = field(repr=False)
