"""A real x402 facilitator over HTTP on 127.0.0.1, settling on a local chain.

It speaks the facilitator API that ``HTTPFacilitatorClientSync`` calls — ``GET /supported``,
``POST /verify`` and ``POST /settle`` with ``{"x402Version", "paymentPayload",
"paymentRequirements"}`` — and answers from an in-process ``x402FacilitatorSync`` (the SDK's
exact-EVM scheme, v2 and v1, over ``FacilitatorWeb3Signer``), so ``FACILITATOR=remote`` is
tested against real verification and settlement. Like the reference facilitators, a payment
that fails is ``200`` with ``isValid``/``success`` false; a request it cannot read is ``400``.
``fail_status`` makes every POST answer that status instead (outage and rejection tests).

    with FakeFacilitator(chain.rpc_url, settler_key) as facilitator:
        settings = dataclasses.replace(
            settings, facilitator="remote", facilitator_url=facilitator.url
        )

    python -m tests.fake_facilitator --port 4021 --rpc-url http://127.0.0.1:8545 --key 0x...
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pydantic import BaseModel
from x402 import (
    PaymentPayload,
    PaymentPayloadV1,
    PaymentRequirements,
    PaymentRequirementsV1,
    x402FacilitatorSync,
)
from x402.mechanisms.evm import FacilitatorWeb3Signer

from relay.facilitator import local_facilitator
from relay.payment_headers import as_json
from tests.http_thread import ServedInBackground

MAX_BODY_BYTES = 1024 * 1024


class FakeFacilitator(ServedInBackground):
    """A facilitator HTTP server on a thread; use as a context manager."""

    def __init__(
        self,
        rpc_url: str,
        private_key: str,
        *,
        network: str = "eip155:84532",
        port: int = 0,
        receipt_timeout: float = 15.0,
    ) -> None:
        signer = FacilitatorWeb3Signer(
            private_key, rpc_url, confirmation_timeout_seconds=receipt_timeout
        )
        # A stock facilitator: no simulation inside settle, as the SDK defaults.
        self.facilitator = local_facilitator(network, signer, simulate_in_settle=False)
        self.calls: list[str] = []
        self.fail_status: int | None = None
        self.fail_body: dict[str, Any] = {"error": "facilitator_unavailable"}
        self.fail_paths: tuple[str, ...] = ("/verify", "/settle")
        # Settle for real, then lose the answer (a gateway timeout after broadcast).
        self.lose_settle_answers = False
        # Called once before the next settle, and once after the next real settle (before
        # its answer leaves).
        self.before_settle: Callable[[], object] | None = None
        self.after_settle: Callable[[], object] | None = None
        # url: FACILITATOR_URL
        super().__init__(ThreadingHTTPServer(("127.0.0.1", port), _handler_for(self)))

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """The (status, JSON body) answer to one request."""
        self.calls.append(f"{method} {path}")
        if method == "GET" and path == "/supported":
            return 200, as_json(self.facilitator.get_supported())
        if method != "POST" or path not in ("/verify", "/settle"):
            return 404, {"error": "not_found"}
        if self.fail_status is not None and path in self.fail_paths:
            return self.fail_status, self.fail_body
        try:
            payload, requirements = _parse_request(body)
        except (ValueError, TypeError) as exc:
            return 400, {"error": "invalid_request", "message": str(exc)[:500]}
        if path == "/settle" and self.before_settle is not None:
            hook, self.before_settle = self.before_settle, None
            hook()
        result = as_json(_dispatch(self.facilitator, path, payload, requirements))
        if path == "/settle" and self.after_settle is not None:
            hook, self.after_settle = self.after_settle, None
            hook()
        if path == "/settle" and self.lose_settle_answers:
            return 504, {"error": "gateway_timeout"}
        return 200, result


def _parse_request(
    body: bytes,
) -> tuple[PaymentPayload | PaymentPayloadV1, PaymentRequirements | PaymentRequirementsV1]:
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError("the body must be a JSON object")
    if data.get("x402Version") == 1:
        return (
            PaymentPayloadV1.model_validate(data.get("paymentPayload")),
            PaymentRequirementsV1.model_validate(data.get("paymentRequirements")),
        )
    return (
        PaymentPayload.model_validate(data.get("paymentPayload")),
        PaymentRequirements.model_validate(data.get("paymentRequirements")),
    )


def _dispatch(
    facilitator: x402FacilitatorSync,
    path: str,
    payload: PaymentPayload | PaymentPayloadV1,
    requirements: PaymentRequirements | PaymentRequirementsV1,
) -> BaseModel:
    if path == "/verify":
        return facilitator.verify(payload, requirements)
    return facilitator.settle(payload, requirements)


def _handler_for(fake: FakeFacilitator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self._answer("GET", b"")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                self._send(413, {"error": "payload_too_large"})
                return
            self._answer("POST", self.rfile.read(length))

        def _answer(self, method: str, body: bytes) -> None:
            try:
                status, answer = fake.handle(method, self.path, body)
            except Exception as exc:  # a crash is a 500, as in production
                status, answer = 500, {"error": "internal_error", "message": str(exc)[:500]}
            self._send(status, answer)

        def _send(self, status: int, answer: dict[str, Any]) -> None:
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: tests read ``fake.calls`` instead."""

    return Handler


def main(argv: list[str] | None = None) -> None:
    """Run a facilitator until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=4021)
    parser.add_argument("--rpc-url", required=True)
    parser.add_argument("--key", required=True, help="settler private key (pays gas)")
    parser.add_argument("--network", default="eip155:84532")
    parser.add_argument("--receipt-timeout", type=float, default=15.0)
    args = parser.parse_args(argv)
    fake = FakeFacilitator(
        args.rpc_url,
        args.key,
        network=args.network,
        port=args.port,
        receipt_timeout=args.receipt_timeout,
    )
    print(f"x402 facilitator on {fake.url} (settling on {args.rpc_url})", flush=True)
    try:
        fake.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
