"""The bundle of collaborators every flow uses, built in exactly one place."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from relay.ledger import Ledger, LedgerVerdictCache
from relay.moderation import Moderator, build_moderator
from relay.payments import Payments, Refunder
from relay.quote_tokens import QuoteSigner
from relay.ratelimit import Limiter, lockout_rule
from relay.settings import Settings
from relay.sinch import SmsSender, build_sender


@dataclass
class Services:
    """Moderator, ledger, signer, limiters and clock for one app."""

    settings: Settings
    ledger: Ledger
    moderator: Moderator
    signer: QuoteSigner
    quote_limiter: Limiter
    password_limiter: Limiter
    payments: Payments
    sms: SmsSender
    refunder: Refunder | None = None
    clock: Callable[[], float] = field(default=time.time)


def build_services(settings: Settings, clock: Callable[[], float] = time.time) -> Services:
    """Wire every collaborator from the settings, on a database already at this release's
    schema (SchemaMissing otherwise: only `relay db upgrade` creates or migrates it)."""
    ledger = Ledger.open_existing(settings.database_url)
    lockout = lockout_rule(
        settings.pay_password_max_failures, settings.pay_password_lockout_seconds
    )
    return Services(
        settings=settings,
        ledger=ledger,
        moderator=build_moderator(settings, LedgerVerdictCache(ledger, clock)),
        signer=QuoteSigner(settings.quote_secret, settings.quote_ttl_seconds),
        quote_limiter=Limiter(settings.rate_limit_storage_url, settings.quote_rate_limit),
        password_limiter=Limiter(settings.rate_limit_storage_url, lockout),
        payments=Payments(settings, nonces=ledger),
        sms=build_sender(settings, ledger),
        refunder=Refunder.from_settings(settings, ledger),
        clock=clock,
    )
