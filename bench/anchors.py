"""The anchors the relay is measured against, served by gunicorn exactly like the relay:

- ``sdk_app()``: the x402 SDK's own Flask ``PaymentMiddleware`` on one fixed-price route,
  settling in process with the SDK's own facilitator and web3 signer, on the relay's chain;
- ``bare_app()``: a bare Flask app answering a small JSON document (the floor of any
  Flask service on this machine).

Both read the relay's environment (``load_settings``), so they pay to the same address on
the same chain.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flask import Flask, jsonify, request

PAID_PATH = "/paid"


def sdk_app(facilitator: str = "sdk") -> Flask:
    """POST /paid behind the SDK's PaymentMiddleware at a fixed price of $0.05, verified and
    settled in process by the SDK's own facilitator and web3 signer, as the SDK's examples
    set it up. That signer orders its nonces within one process only, so each worker settles
    from its own account (``SETTLER_KEYS_ENV``).

    ``facilitator="relay"``: settled by the relay's facilitator and settler signer instead
    (its nonces shared through the relay's database): what the relay's paid path costs
    beyond the chain work, its ledger.
    """
    # Imported here, so that the bare anchor's processes load Flask alone.
    from x402 import x402FacilitatorSync, x402ResourceServerSync
    from x402.http import PaymentOption, RouteConfig
    from x402.http.middleware.flask import payment_middleware
    from x402.mechanisms.evm import FacilitatorWeb3Signer
    from x402.mechanisms.evm.exact import ExactEvmServerScheme, register_exact_evm_facilitator

    from relay.facilitator import build_facilitator
    from relay.ledger import Ledger
    from relay.settings import load_settings

    settings = load_settings()
    app = Flask(__name__)
    if facilitator == "relay":
        ledger = Ledger.open_existing(settings.database_url)  # the settler's shared nonces
        settling: Any = build_facilitator(settings.payments(), ledger)
    else:
        signer = FacilitatorWeb3Signer(claim_settler_key(), settings.rpc_url)
        settling = register_exact_evm_facilitator(
            x402FacilitatorSync(), signer, settings.x402_network
        )
    server = x402ResourceServerSync(settling)
    server.register(settings.x402_network, ExactEvmServerScheme())  # type: ignore[no-untyped-call]
    option = PaymentOption(
        scheme="exact", pay_to=settings.pay_to_address, price="$0.05", network=settings.x402_network
    )
    payment_middleware(app, {f"POST {PAID_PATH}": RouteConfig(accepts=option)}, server)

    @app.post(PAID_PATH)
    def paid() -> Any:
        return jsonify({"sent": True, "echo": request.get_json(silent=True)})

    return app


#: Private keys for the SDK anchor's workers, comma-separated, one per worker at most.
SETTLER_KEYS_ENV = "ANCHOR_SETTLER_KEYS"
#: A directory where each worker claims its key by creating a file no other worker has.
CLAIMS_ENV = "ANCHOR_CLAIMS_DIR"


def claim_settler_key() -> str:
    """The first key of SETTLER_KEYS_ENV no other worker of this server has claimed."""
    claims = Path(os.environ[CLAIMS_ENV])
    claims.mkdir(parents=True, exist_ok=True)
    for number, key in enumerate(os.environ[SETTLER_KEYS_ENV].split(",")):
        try:
            os.close(os.open(claims / str(number), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        return key
    raise RuntimeError(f"more workers than keys in {SETTLER_KEYS_ENV}")


def bare_app() -> Flask:
    """POST and GET /echo: a small JSON answer, nothing else."""
    app = Flask(__name__)

    @app.route("/echo", methods=["GET", "POST"])
    def echo() -> Any:
        return jsonify({"ok": True, "echo": request.get_json(silent=True)})

    return app
