"""The wheel is all an operator needs: installed in a fresh virtualenv outside the
checkout, it ships the token ABI and the migrations, so `relay db upgrade` creates the
schema, `relay doctor` checks the token and a refund is signed and mined on the local
chain. The serving processes (gunicorn's master and its workers) import only what serving
needs."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

from relay import migrations
from relay.dev.chain import DevChain, dev_accounts
from relay.ledger import Ledger
from tests.conftest import PAY_TO, new_wallet
from tests.processes import REPO

AMOUNT = 25_000


def run(command: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )


def test_the_wheel_installed_elsewhere_checks_the_token_and_refunds(
    chain: DevChain, tmp_path: Path
) -> None:
    source = tmp_path / "source"  # a copy, so no build/ is left in (or reused from) the checkout
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "node_modules", "build", "*.egg-info", "__pycache__", "tests"
        ),
    )
    wheel, python = install_wheel(source, tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        assert {
            "relay/abi/USDC.abi.json",
            "relay/abi/TestUSDC.json",
            "relay/migrations/env.py",
            "relay/migrations/script.py.mako",
            "relay/migrations/versions/0001_baseline.py",
        } <= set(archive.namelist())
    venv = python.parent.parent

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = run([str(python), "-c", "import relay.abi; print(relay.abi.__file__)"], cwd=outside)
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr

    database = f"sqlite:///{outside / 'relay.db'}"
    refunder = new_wallet(chain, AMOUNT)
    chain.set_eth_balance(refunder.address, 10**18)
    env = {
        "QUOTE_SECRET": "wheel-test-secret-0123456789",
        "PAY_TO_ADDRESS": PAY_TO,
        "FACILITATOR": "local",
        "RPC_URL": chain.rpc_url,
        "SETTLER_PRIVATE_KEY": chain.accounts[0].private_key,
        "REFUND_PRIVATE_KEY": refunder.key,
        "MODERATION_PROVIDER": "rules",
        "SMS_PROVIDER": "outbox",
        "DATABASE_URL": database,
    }
    upgraded = run([str(venv / "bin" / "relay"), "db", "upgrade"], cwd=outside, **env)
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    assert f"schema at revision {migrations.head()}" in upgraded.stdout
    doctor = run([str(venv / "bin" / "relay"), "doctor", "--dev"], cwd=outside, **env)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert any(line.startswith("token") and "PASS" in line for line in doctor.stdout.splitlines())

    payer = new_wallet(chain)
    script = textwrap.dedent(
        f"""
        import json
        from relay.ledger import Ledger
        from relay.refunds import Refunder
        from relay.settings import load_settings
        settings = load_settings()
        refunder = Refunder(settings.refunds(), Ledger.open_existing(settings.database_url))
        signed = refunder.sign({payer.address!r}, {AMOUNT})
        print(json.dumps({{"state": refunder.send(signed), "tx": signed.tx_hash}}))
        """
    )
    refund = run([str(python), "-c", script], cwd=outside, **env)
    assert refund.returncode == 0, refund.stdout + refund.stderr
    assert json.loads(refund.stdout.strip().splitlines()[-1])["state"] == "confirmed"
    assert chain.usdc_balance(payer.address) == AMOUNT


def install_wheel(source: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Build the wheel from ``source`` and install it into a fresh virtualenv; the wheel and
    the virtualenv's python. Its dependencies are borrowed from this environment's
    site-packages (as a plain path, so the checkout's editable install is not picked up)."""
    dist = tmp_path / "dist"
    built = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dist), str(source)],
        cwd=tmp_path,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = dist.glob("relay-*.whl")
    venv = tmp_path / "venv"
    made = run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    purelib = run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp_path
    )
    (Path(purelib.stdout.strip()) / "borrowed.pth").write_text(site.getsitepackages()[0] + "\n")
    installed = run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], cwd=tmp_path
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    return wheel, python


#: What a serving process never needs: development and operator tools, the MCP servers, the
#: client, the worker loop, and what only another configuration uses (Gemini, with
#: MODERATION_PROVIDER=rules).
NOT_SERVING = (
    "relay.cli",
    "relay.client",
    "relay.dev",
    "relay.doctor",
    "relay.mcp_paid",
    "relay.mcp_tools",
    "relay.worker",
    "relay.flows.reconciling",
    "relay.gemini",
    "mcp",
    "google.genai",
)
#: What the gunicorn master never needs: it forks every worker, so whatever it holds is
#: resident in each of them as well.
NOT_IN_MASTER = ("relay.settings", "flask", "web3", "eth_account", "x402", "sqlalchemy")

SERVED = """
import importlib, json, sys
from relay import gunicorn_conf
importlib.import_module(gunicorn_conf.logger_class.rpartition(".")[0])
gunicorn_conf.on_starting(None)
master = sorted(sys.modules)
from relay.app import create_app
create_app()
gunicorn_conf.on_exit(None)
print(json.dumps({"master": master, "worker": sorted(sys.modules)}))
"""


def loaded(modules: list[str], names: tuple[str, ...]) -> list[str]:
    """The modules of ``modules`` that are one of ``names`` or inside one of them."""
    return [m for m in modules if any(m == n or m.startswith(f"{n}.") for n in names)]


def test_the_serving_processes_import_only_what_serving_needs(tmp_path: Path) -> None:
    """The gunicorn master as the Procfile's web line runs it (the config module, its access
    logger, its start-up check), then a worker's create_app(), in a fresh interpreter."""
    database = f"sqlite:///{tmp_path / 'relay.db'}"
    Ledger.upgrade_database(database)
    env = {
        "QUOTE_SECRET": "serving-test-secret-0123456789",
        "PAY_TO_ADDRESS": PAY_TO,
        "FACILITATOR": "local",
        "RPC_URL": "http://127.0.0.1:9",  # never called while the app is built
        "SETTLER_PRIVATE_KEY": dev_accounts(1)[0].private_key,
        "MODERATION_PROVIDER": "rules",
        "SMS_PROVIDER": "outbox",
        "DATABASE_URL": database,
        "PROMETHEUS_MULTIPROC_DIR": "",
    }
    served = run([sys.executable, "-c", SERVED], cwd=tmp_path, **env)
    assert served.returncode == 0, served.stdout + served.stderr
    modules = json.loads(served.stdout.strip().splitlines()[-1])
    assert "relay.access_log" in modules["master"] and "relay.app" in modules["worker"]
    assert loaded(modules["master"], NOT_IN_MASTER) == []
    assert loaded(modules["worker"], NOT_SERVING) == []
