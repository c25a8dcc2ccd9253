"""Who may act on a payment now.

Whoever acts on a payment (the first request, a replay, the reconciler) holds its lease
(Ledger.take); a crash leaves the lease to run out, and anyone may then take over.
"""

from __future__ import annotations

import logging
from typing import Any

from relay.errors import RequestInProgress
from relay.records import PaymentRecord
from relay.services import Services
from relay.states import PaymentState

log = logging.getLogger(__name__)

IN_PROGRESS_RETRY_SECONDS = 2


def lease_seconds(services: Services) -> float:
    """How long one holder may act on a payment before others may take it over: longer
    than any one step (Settings checks RECONCILE_AFTER_SECONDS against the settlement wait
    and Sinch's retries), and renewed before each."""
    return services.settings.reconcile_after_seconds


def busy(**details: Any) -> RequestInProgress:
    """409: someone else acts on the payment; repeat the request shortly."""
    return RequestInProgress(retry_after=IN_PROGRESS_RETRY_SECONDS, details=details or None)


def hold(services: Services, payment: PaymentRecord) -> None:
    """Renew our lease before a step with an outside effect; RequestInProgress (and no
    effect) if another worker has taken the payment over (even a forced repair moments
    after the lease was taken)."""
    now = services.clock()
    if not services.ledger.renew(payment.id, payment.holder, now, lease_seconds(services)):
        log.warning("payment %s was taken over; this worker stops", payment.id)
        raise busy()


def moved_while_held(
    services: Services,
    payment: PaymentRecord,
    from_states: tuple[PaymentState, ...],
    to_state: PaymentState,
    **fields: Any,
) -> bool:
    """The payment's move made only while its lease is ours, the lease renewed in the same
    write (the move is the check); False, and no move, once another has taken it over."""
    now = services.clock()
    until = now + lease_seconds(services)
    return services.ledger.transition(
        payment.id, from_states, to_state, now, holder=payment.holder, lease_until=until, **fields
    )
