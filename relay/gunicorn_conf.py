"""gunicorn's settings for `relay serve` and the Procfile's web line
(`gunicorn -c python:relay.gunicorn_conf ...`), applied in the master before any worker starts:

- the configuration is checked once, so a mistake is one clear line and exit 2, not a
  traceback from every worker. It runs in a forked child, so what it imports (web3,
  eth_account, the x402 SDK) stays out of the master: every worker is forked from the
  master, and whatever the master holds is resident in each of them;
- the workers get one metrics directory: prometheus_client chooses its multiprocess mode
  when first imported, and workers are forked from the master, so PROMETHEUS_MULTIPROC_DIR
  is set here, before any worker loads the app (this module imports nothing of the app or
  of prometheus_client). A directory set by the operator is used as it is (it must be
  empty at start); otherwise a fresh one is made, and removed when gunicorn exits;
- the access log masks the Sinch callback secret.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

logger_class = "relay.access_log.MaskedAccessLogger"
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
_made: list[str] = []


def on_starting(_server: Any) -> None:
    """Refuse to start on a configuration that cannot work; give the workers a metrics
    directory unless one is set."""
    code = _in_child(_check_settings)
    if code:
        raise SystemExit(code)
    if not os.environ.get(MULTIPROC_DIR):
        _made.append(tempfile.mkdtemp(prefix="relay-metrics-"))
        os.environ[MULTIPROC_DIR] = _made[-1]


def _check_settings() -> int:
    """0 if the settings load; 2, with every problem on stderr, if they do not."""
    from relay.settings import SettingsError, load_settings

    try:
        load_settings()
    except SettingsError as exc:
        print(f"relay: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


def _in_child(check: Callable[[], int]) -> int:
    """The exit code of ``check`` run in a forked child (1, with the traceback on stderr,
    if it raises), so that nothing it imports is loaded in this process."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = check()
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


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
