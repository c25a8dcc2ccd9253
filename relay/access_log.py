"""gunicorn's access log without the Sinch callback secret, which the callback path carries.

Loaded by the gunicorn master (``logger_class`` in ``relay.gunicorn_conf``), so it imports
gunicorn alone: the master forks every worker, and whatever it holds is resident in each.
"""

from __future__ import annotations

import re
from typing import Any

from gunicorn.glogging import Logger

_CALLBACK = re.compile(r"(/webhooks/sinch/)[^/?\s]+")


def mask_path(text: str) -> str:
    """Replace the callback secret in a path or request line with ***."""
    return _CALLBACK.sub(r"\1***", text)


class MaskedAccessLogger(Logger):  # type: ignore[misc]
    """gunicorn's logger, with the webhook secret masked in every access-log atom."""

    def atoms(self, resp: Any, req: Any, environ: Any, request_time: Any) -> dict[str, Any]:
        """The access-log fields, masked."""
        atoms: dict[str, Any] = super().atoms(resp, req, environ, request_time)
        for key in ("r", "U"):
            if isinstance(atoms.get(key), str):
                atoms[key] = mask_path(atoms[key])
        return atoms
