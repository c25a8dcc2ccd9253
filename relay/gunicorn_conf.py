"""gunicorn's settings for the Procfile's web line (`gunicorn -c python:relay.gunicorn_conf`):
the masked access log, and the configuration checked once in the master before any worker
starts, so that a mistake is one clear line and exit 2, not a traceback from every worker."""

from __future__ import annotations

import sys
from typing import Any

from relay.settings import SettingsError, load_settings

logger_class = "relay.logs.MaskedAccessLogger"


def on_starting(_server: Any) -> None:
    """Refuse to start on a configuration that cannot work."""
    try:
        load_settings()
    except SettingsError as exc:
        print(f"relay: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
