"""The anchors the relay is measured against, served by gunicorn exactly like the relay:

- ``sdk_app()``: the x402 SDK's own Flask ``PaymentMiddleware`` on one fixed-price route,
  settling in process with the same facilitator and chain as the relay;
- ``bare_app()``: a bare Flask app answering a small JSON document (the floor of any
  Flask service on this machine).

Both read the relay's environment (``load_settings``), so they pay to the same address on
the same chain.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify, request

PAID_PATH = "/paid"


def sdk_app() -> Flask:
    """POST /paid behind the SDK's PaymentMiddleware at a fixed price of $0.05."""
    # Imported here, so that the bare anchor's processes load Flask alone.
    from x402 import x402ResourceServerSync
    from x402.http import PaymentOption, RouteConfig
    from x402.http.middleware.flask import payment_middleware
    from x402.mechanisms.evm.exact import ExactEvmServerScheme

    from relay.facilitator import build_facilitator
    from relay.ledger import Ledger
    from relay.settings import load_settings

    settings = load_settings()
    app = Flask(__name__)
    ledger = Ledger.open_existing(settings.database_url)  # for the settler's shared nonces
    server = x402ResourceServerSync(build_facilitator(settings.payments(), ledger))
    server.register(settings.x402_network, ExactEvmServerScheme())  # type: ignore[no-untyped-call]
    option = PaymentOption(
        scheme="exact", pay_to=settings.pay_to_address, price="$0.05", network=settings.x402_network
    )
    payment_middleware(app, {f"POST {PAID_PATH}": RouteConfig(accepts=option)}, server)

    @app.post(PAID_PATH)
    def paid() -> Any:
        return jsonify({"sent": True, "echo": request.get_json(silent=True)})

    return app


def bare_app() -> Flask:
    """POST and GET /echo: a small JSON answer, nothing else."""
    app = Flask(__name__)

    @app.route("/echo", methods=["GET", "POST"])
    def echo() -> Any:
        return jsonify({"ok": True, "echo": request.get_json(silent=True)})

    return app
