"""The bundle of collaborators every flow uses, built in exactly one place: each adapter gets
the small configuration it needs from the settings here."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from relay.callbacks import CallbackPolicy, CallbackSender
from relay.ledger import Ledger, LedgerVerdictCache
from relay.memo import Memo
from relay.moderation import Moderator
from relay.payments import Payments
from relay.phishing_rules import LayeredModerator, RulesModerator
from relay.quote_tokens import QuoteSigner
from relay.ratelimit import Limiter, lockout_rule
from relay.refunds import Refunder
from relay.settings import Settings
from relay.sinch import OutboxSender, SinchSender, SmsSender
from relay.verdict_cache import (
    CachingModerator,
    MemoryVerdictCache,
    RedisVerdictCache,
    VerdictCache,
)

if TYPE_CHECKING:
    from relay.flows.answers import Outcome


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
    callbacks: CallbackSender = field(default_factory=lambda: CallbackSender(CallbackPolicy()))
    clock: Callable[[], float] = field(default=time.time)
    #: 402 answers by (amount, resource URL, bare probe or not): they never change.
    challenges: Memo[tuple[int, str, bool], Outcome] = field(default_factory=lambda: Memo(1024))


def build_services(settings: Settings, clock: Callable[[], float] = time.time) -> Services:
    """Wire every collaborator from the settings, on a database already at this release's
    schema (SchemaMissing otherwise: only `relay db upgrade` creates or migrates it)."""
    ledger = Ledger.open_existing(settings.database_url)
    lockout = lockout_rule(
        settings.pay_password_max_failures, settings.pay_password_lockout_seconds
    )
    refunds = settings.refunds()
    quote_limiter = Limiter(settings.rate_limit_storage_url, settings.quote_rate_limit)
    shared = quote_limiter.redis()
    verdicts = LedgerVerdictCache(ledger, clock) if shared is None else RedisVerdictCache(shared)
    return Services(
        settings=settings,
        ledger=ledger,
        moderator=build_moderator(settings, verdicts),
        signer=QuoteSigner(
            settings.quote_secret, settings.quote_ttl_seconds, settings.quote_secret_previous
        ),
        quote_limiter=quote_limiter,
        password_limiter=Limiter(settings.rate_limit_storage_url, lockout),
        payments=Payments(settings.payments(), ledger),
        sms=build_sender(settings, ledger),
        refunder=None if refunds is None else Refunder(refunds, ledger),
        callbacks=CallbackSender(CallbackPolicy(settings.allow_private_callbacks)),
        clock=clock,
    )


def build_moderator(settings: Settings, cache: VerdictCache | None = None) -> Moderator:
    """Rules alone in development mode; otherwise rules, then Gemini, behind the cache."""
    if settings.moderation_provider == "rules":
        return RulesModerator()
    from relay.gemini import GeminiModerator  # google-genai: loaded only for this provider

    gemini = settings.gemini()
    layered = LayeredModerator(RulesModerator(), GeminiModerator(gemini))
    longest = gemini.timeout_seconds * max(1, gemini.max_attempts) + 10.0
    return CachingModerator(
        layered,
        MemoryVerdictCache() if cache is None else cache,
        gemini.model,
        wait_seconds=longest,
    )


def build_sender(settings: Settings, ledger: Ledger) -> SmsSender:
    """The SMS provider chosen by SMS_PROVIDER."""
    if settings.sms_provider == "outbox":
        return OutboxSender(ledger)
    return SinchSender(settings.sinch())
