"""The free local moderation rules: obvious phishing is rejected before any paid call."""

from __future__ import annotations

import re
from collections.abc import Callable

from relay.moderation import Moderator, Verdict, admitted, verdict_id_for

_SHORTENERS = (
    "bit.ly", "bitly.com", "tinyurl.com", "t.co", "goo.gl", "ow.ly", "is.gd", "v.gd", "buff.ly",
    "cutt.ly", "rebrand.ly", "tiny.cc", "shorturl.at", "rb.gy", "t.ly", "bl.ink", "lnkd.in",
    "s.id", "soo.gd", "clck.ru", "tr.im", "x.co", "bit.do", "adf.ly", "shorte.st", "qr.net",
)  # fmt: skip
_SHORTENER = re.compile(
    r"(?<![\w.-])(?:https?://)?(?:www\.)?(?:"
    + "|".join(re.escape(d) for d in _SHORTENERS)
    + r")(?![\w-]|\.[a-z0-9])",
    re.IGNORECASE,
)
_IP_LINK = re.compile(
    r"https?://(?:(?:\d{1,3}\.){3}\d{1,3}|\[[0-9a-f:.]+\]|0x[0-9a-f]+|\d+)(?=[/:?#\s]|$)"
    r"|(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?::\d{1,5})?/",
    re.IGNORECASE,
)
_HOST = re.compile(
    r"(?:https?://)?(?:[^\s/@]+@)?((?:[a-z0-9-]+\.)+(?:[a-z]{2,}|xn--[a-z0-9-]+))", re.I
)
_USERINFO_LINK = re.compile(r"https?://[^\s/@]+@", re.IGNORECASE)
_LOGIN_WORD = re.compile(
    r"(?:^|[.-])(?:log-?in|sign-?in|verify|verification|secure|unlock|suspended|recover|"
    r"recovery|authenticate|validate|validation|wallet-?connect)(?:[.-]|$)",
    re.IGNORECASE,
)
_LURE = re.compile(
    r"\b(?:verify|confirm|validate|unlock|reactivate|restore)\s+(?:your\s+)?"
    r"(?:account|identity|card|wallet|details|information|info)\b"
    r"|\b(?:account|card|access|wallet|apple\s*id|profile)\s+(?:has\s+been\s+|is\s+|was\s+|will\s+be\s+)?"
    r"(?:suspended|locked|disabled|restricted|blocked|deactivated|frozen|on\s+hold|compromised)\b"
    r"|\bunusual\s+(?:sign[- ]?in|log[- ]?in|activity)\b",
    re.IGNORECASE,
)
_SECRET = (
    r"(?:password|passcode|passwd|pin(?:\s+(?:code|number))?|ssn|social\s+security(?:\s+(?:number|no|#))?"
    r"|cvv|cvc|card\s+(?:number|details)|bank\s+(?:login|details|password)|seed\s+phrase"
    r"|recovery\s+phrase|private\s+key|security\s+answers?|mother'?s\s+maiden\s+name)"
)
_CODE = (
    r"(?:(?:\d|four|six)[- ]digit\s+|verification\s+|one[- ]time\s+|security\s+|login\s+"
    r"|sign[- ]in\s+|2fa\s+|otp\s+|auth(?:entication)?\s+|access\s+|confirmation\s+){0,2}"
    r"(?:code|otp)"
)
_CREDENTIAL_REQUEST = re.compile(
    r"\b(?:send|text|reply|give|tell|share|forward|provide|confirm|read)"
    r"(?:\s+(?:me|us|back|over|with|it|them))*\s+"
    rf"(?:(?:your|ur)\s+(?:[\w'-]+\s+){{0,2}}?{_SECRET}|(?:your|ur|the|that)\s+{_CODE})\b"
    rf"|\bwhat(?:'s|\s+is)\s+your\s+(?:[\w'-]+\s+){{0,2}}?{_SECRET}\b",
    re.IGNORECASE,
)
_NEGATION = re.compile(r"\b(?:never|not|don'?t|dont|won'?t|no\s+one|nobody)\b", re.IGNORECASE)


def _hosts(text: str) -> list[str]:
    return [m.group(1).lower() for m in _HOST.finditer(text)]


def _lookalike_link(text: str) -> bool:
    if _USERINFO_LINK.search(text):
        return True
    return any(
        host.startswith("xn--") or ".xn--" in host or ("-" in host and _LOGIN_WORD.search(host))
        for host in _hosts(text)
    )


def _credential_request(text: str) -> bool:
    # "Never share your code" is how honest one-time-code messages end: skip negated asks.
    return any(
        not _NEGATION.search(text[max(0, m.start() - 30) : m.start()])
        for m in _CREDENTIAL_REQUEST.finditer(text)
    )


_RULES: tuple[tuple[Callable[[str], object], str], ...] = (
    (_SHORTENER.search, "Public URL shorteners hide where a link goes and carriers block them."),
    (_IP_LINK.search, "Links to a bare IP address are a phishing hallmark."),
    (_lookalike_link, "The link imitates a login or verification site."),
    (
        lambda text: _hosts(text) and _LURE.search(text),
        "An account-alert lure with a link is a phishing pattern.",
    ),
    (
        _credential_request,
        "Asking for a password, PIN, SSN or one-time code is credential phishing.",
    ),
)


class RulesModerator:
    """A free local pass that catches obvious phishing; in production it never approves alone."""

    model = "rules"

    def check(self, text: str) -> Verdict | None:
        """A rejection when a rule matches, None when the rules have no objection."""
        for matches, reason in _RULES:
            if matches(text):
                return self._verdict(text, approved=False, category="phishing", reason=reason)
        return None

    def moderate(self, text: str, admit: Callable[[], None] = admitted) -> Verdict:
        """Development mode (MODERATION_PROVIDER=rules): approve whatever check() lets
        through (free: ``admit`` is not needed)."""
        reason = "No local rule matched (rules-only development mode)."
        return self.check(text) or self._verdict(text, approved=True, category="ok", reason=reason)

    def _verdict(self, text: str, *, approved: bool, category: str, reason: str) -> Verdict:
        confidence = 0.5 if approved else 0.9
        verdict_id = verdict_id_for(text, self.model)
        return Verdict(approved, category, confidence, reason, self.model, verdict_id=verdict_id)


class LayeredModerator:
    """The free rules first; only text they do not reject reaches the paid moderator."""

    def __init__(self, first: RulesModerator, then: Moderator) -> None:
        self._first = first
        self._then = then

    def moderate(self, text: str, admit: Callable[[], None] = admitted) -> Verdict:
        """The rules' rejection, else the next moderator's verdict."""
        return self._first.check(text) or self._then.moderate(text, admit)
