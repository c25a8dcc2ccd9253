"""The reconciler loop (`relay worker`): finishes payments whose holder went away, and
delivers the events agents asked for at their callback URLs.

Any number of worker loops may run across the fleet; a lease in the database elects one to
work at a time, and a crashed holder's lease runs out after a few intervals. Each payment
it repairs is leased on its own as well, so a loop and a live request never act at once.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading

from relay.flows.notifying import deliver_events
from relay.flows.reconciling import reconcile
from relay.ledger import RECONCILED_NOTICE
from relay.services import Services

log = logging.getLogger(__name__)

LEASE_NAME = "reconciler"
#: How many intervals the elected loop's lease outlives its last pass.
LEASE_INTERVALS = 4


def fill_nonce_gaps(services: Services) -> None:
    """Use up a nonce of the settler (or the refund wallet) that never reached the chain
    while later transactions wait behind it, so that they are mined without waiting for
    new traffic to fill it; a chain that cannot be asked is left for the next pass."""
    fillers = [services.payments.fill_nonce_gap]
    if services.refunder is not None:
        fillers.append(services.refunder.fill_nonce_gap)
    for fill in fillers:
        try:
            fill()
        except Exception as exc:  # the next pass tries again
            log.warning("nonce gap not filled: %s", type(exc).__name__)


class Worker:
    """One reconciler loop."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.interval = services.settings.worker_interval_seconds
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._stop = threading.Event()

    def run_once(self) -> dict[str, str] | None:
        """One pass if this loop holds the lease: payment id → state reached; None if
        another loop holds it."""
        if not self._elected():
            return None
        results = reconcile(self.services, still_elected=self._elected)
        self.services.ledger.note(RECONCILED_NOTICE, self.services.clock())  # /metrics: lag
        if results:
            log.info("reconciled %s", results)
        events = deliver_events(self.services, still_elected=self._elected)
        if events:
            log.info("events %s", events)
        fill_nonce_gaps(self.services)
        return results

    def _elected(self) -> bool:
        """Take or renew the fleet lease (before each payment, so a long pass keeps it)."""
        services = self.services
        seconds = self.interval * LEASE_INTERVALS
        return services.ledger.acquire_lease(LEASE_NAME, self.holder, services.clock(), seconds)

    def run(self) -> None:
        """Pass after pass until stop(); a failing pass is logged and retried next time."""
        log.info("reconciler running every %ss", self.interval)
        try:
            while not self._stop.is_set():
                try:
                    self.run_once()
                except Exception:
                    log.exception("reconciler pass failed")
                self._stop.wait(self.interval)
        finally:
            self.services.ledger.release_lease(LEASE_NAME, self.holder)

    def start(self) -> threading.Thread:
        """Run in a daemon thread (the dev stack)."""
        thread = threading.Thread(target=self.run, name="relay-worker", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """End the loop after the current pass."""
        self._stop.set()
