"""gunicorn hooks that give the workers one metrics directory, for `relay serve` and the
Procfile's web line (`gunicorn -c python:relay.gunicorn_conf ...`).

prometheus_client chooses its multiprocess mode when first imported, and workers are forked
from the master: so PROMETHEUS_MULTIPROC_DIR is set here, in the master, before any worker
loads the app, and this module imports nothing of the app or of prometheus_client. A
directory set by the operator is used as it is (it must be empty at start); otherwise a
fresh one is made, and removed when gunicorn exits.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
_made: list[str] = []


def on_starting(_server: Any) -> None:
    """Before the workers are forked: a fresh metrics directory, unless one is set."""
    if not os.environ.get(MULTIPROC_DIR):
        _made.append(tempfile.mkdtemp(prefix="relay-metrics-"))
        os.environ[MULTIPROC_DIR] = _made[-1]


def child_exit(_server: Any, worker: Any) -> None:
    """A worker ended: drop its live gauges (prometheus_client's recipe; its counters stay
    in the sums)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def on_exit(_server: Any) -> None:
    """gunicorn stops: remove the directory made by on_starting."""
    while _made:
        shutil.rmtree(_made.pop(), ignore_errors=True)


#: The hooks, for servers built in code (`relay serve`).
HOOKS = {"on_starting": on_starting, "child_exit": child_exit, "on_exit": on_exit}
