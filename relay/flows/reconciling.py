"""Every unfinished payment finished from the chain's truth: settle, dispatch or refund
(SPEC §11). The worker runs `reconcile` in a loop; `relay reconcile` runs it once."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable

from x402 import PaymentRequirements

from relay.errors import RelayError
from relay.flows.leases import lease_seconds
from relay.flows.sending import advance
from relay.records import PaymentRecord
from relay.services import Services
from relay.sinch import SmsDispatchError
from relay.states import UNFINISHED
from relay.states import PaymentState as P

log = logging.getLogger(__name__)

#: How often the reconciler searches the logs again for a settle_unknown payment.
SETTLE_UNKNOWN_RETRY_SECONDS = 600


def reconcile(
    services: Services,
    *,
    force: bool = False,
    progress: Callable[[str, str], None] | None = None,
    still_elected: Callable[[], bool] | None = None,
) -> dict[str, str]:
    """Finish every unfinished payment nobody holds. ``force`` ignores leases (only with
    nothing else running); ``still_elected`` is asked before each payment (the worker
    renews its own lease)."""
    results: dict[str, str] = {}
    now = services.clock()
    for payment in services.ledger.unfinished_payments(UNFINISHED):
        if not force and not due(services, payment, now):
            continue
        if still_elected is not None and not still_elected():
            break
        try:
            results[payment.id] = repair(services, payment, force=force)
        except Exception:  # one broken payment must not stop the others being finished
            log.exception("reconciling payment %s failed", payment.id)
            results[payment.id] = "error"
        if progress is not None:
            progress(payment.id, results[payment.id])
    return results


def due(services: Services, payment: PaymentRecord, now: float) -> bool:
    """Whether the reconciler should act on the payment now."""
    if payment.state == P.DISPATCH_FAILED and services.refunder is None:
        return False  # nothing to do without a refund key
    if payment.lease_until is not None and payment.lease_until > now:
        return False  # someone holds it
    if payment.state == P.SETTLE_UNKNOWN:  # a full log search each time: now and then
        return now - float(payment.updated_at) >= SETTLE_UNKNOWN_RETRY_SECONDS
    return True


def repair(services: Services, payment: PaymentRecord, *, force: bool = False) -> str:
    """Take over one payment and drive it as far as it goes now; the state it reached."""
    ledger = services.ledger
    holder = ledger.take(payment.id, services.clock(), lease_seconds(services), force=force)
    if holder is None:
        return "busy"
    current = (ledger.payment(payment.id) or payment).held_by(holder)
    try:
        parsed = services.payments.stored(stored_header(current), current.version)
        requirements = PaymentRequirements.model_validate(current.requirements)
        advance(services, current, parsed, requirements)
    except RelayError as exc:
        log.info("payment %s not finished yet: %s", payment.id, exc.code)
    except SmsDispatchError as exc:
        log.info("payment %s not finished yet: %s", payment.id, exc.message)
    finally:
        ledger.release(payment.id, holder)
    after = ledger.payment(payment.id)
    return "None" if after is None else str(after.state)


def stored_header(payment: PaymentRecord) -> str:
    """The payment header as received (payments from before it was kept: the payload
    re-encoded)."""
    if payment.header:
        return payment.header
    return base64.b64encode(json.dumps(payment.payload, default=str).encode()).decode()
