"""Moderation (SPEC §7): the Moderator protocol and its Verdict.

A message is judged by the free local rules first (``relay.phishing_rules``), then by Gemini
(``relay.gemini``), each distinct text once (``relay.verdict_cache``); ``relay.services`` puts
them together. Every failure to get a clear answer is raised as ModerationUnavailable: a
message is never approved by default.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

from relay.errors import ModerationUnavailable
from relay.quote_tokens import message_sha256

Category = Literal[
    "ok", "spam", "phishing", "fraud", "shaft", "political", "harassment", "illegal", "other"
]
CATEGORIES: tuple[str, ...] = get_args(Category)

# Bump whenever the Gemini instruction, its response schema or the local rules change: cached
# verdicts are keyed by it, so old verdicts stop being served.
POLICY_VERSION = "a2p-2025.2"
DEFAULT_RETRY_AFTER_SECONDS = 5


@dataclass(frozen=True)
class Verdict:
    """A moderation decision and the tokens it cost (kept even when served from the cache)."""

    approved: bool
    category: str
    confidence: float
    reason: str
    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    thinking_tokens: int = 0
    cached: bool = False
    verdict_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; from_dict() reverses it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Verdict:
        """Rebuild a verdict from to_dict() output; ValueError if a field is missing or mistyped."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in data and f.default is not dataclasses.MISSING:
                continue
            value: Any = data.get(f.name)
            kinds = _FIELD_KINDS[str(f.type)]
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise ValueError(f"verdict field {f.name!r} is missing or not {f.type}")
            values[f.name] = float(data[f.name]) if f.type == "float" else value
        return cls(**values)


_FIELD_KINDS: dict[str, tuple[type, ...]] = {
    "bool": (bool,),
    "str": (str,),
    "int": (int,),
    "float": (int, float),
}


def cache_key(text: str, model: str, policy_version: str = POLICY_VERSION) -> str:
    """The key a verdict is cached under: the message's SHA-256, the model and the policy."""
    return f"{message_sha256(text)}:{model}:{policy_version}"


def verdict_id_for(text: str, model: str, policy_version: str = POLICY_VERSION) -> str:
    """A stable id for the verdict on this message by this model under this policy."""
    digest = hashlib.sha256(cache_key(text, model, policy_version).encode()).hexdigest()
    return f"vrd_{digest[:32]}"


def admitted() -> None:
    """Nothing to check before a model call."""


class Moderator(Protocol):
    """Anything that can judge a message."""

    def moderate(self, text: str, admit: Callable[[], None] = admitted) -> Verdict:
        """The verdict on TEXT; raise ModerationUnavailable when there is no clear answer.
        ``admit`` runs before anything that costs (a model call), and may raise to refuse it."""
        ...


def unavailable(cause: str, retry_after: int | None = None) -> ModerationUnavailable:
    """503 moderation_unavailable for ``cause``, retry after the wait given (or a default)."""
    wait = DEFAULT_RETRY_AFTER_SECONDS if retry_after is None else max(1, retry_after)
    return ModerationUnavailable(details={"cause": cause}, retry_after=wait)
