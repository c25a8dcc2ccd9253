"""The `relay` command, run as real processes: dev --demo, quote, send, status, ledger,
reconcile, db upgrade and doctor, against a real local chain and a real `relay serve`.

Every command runs as ``python -m relay.cli ...`` in an empty temporary directory (so no
stray .env is read) with an environment built explicitly here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import inspect, update

from relay import migrations
from relay.dev.chain import DevChain
from relay.dev.stack import DEMO_MESSAGE, DEMO_TO, DevStack
from relay.ledger import Ledger
from relay.schema import messages
from tests.conftest import PAY_TO, Wallet, new_wallet
from tests.processes import REPO, RelayProcess, free_port, migrated, procfile

US = "+13012576365"
DEV_PROVIDERS = {"MODERATION_PROVIDER": "rules", "SMS_PROVIDER": "outbox"}
MESSAGE = "Hello from the relay CLI"
PRICE_ATOMIC = 50_000  # one GSM-7 segment at 0.05 USD, rules moderation costs nothing
PAYER_USDC = 10_000_000
TX_HASH = re.compile(r"0x[0-9a-f]{64}")
CLI_TIMEOUT = 60.0
DEMO_TIMEOUT = 90.0


def base_env(home: Path, **more: str) -> dict[str, str]:
    """The minimum a process needs, plus exactly the variables given."""
    return {"PATH": os.environ["PATH"], "HOME": str(home), **more}


def run_cli(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = CLI_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """`relay ARGS` as a process in CWD with exactly ENV; killed as a group on timeout."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay.cli", *args],
        cwd=cwd,
        env=base_env(cwd, **env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"relay {' '.join(args)} did not finish in {timeout} s:\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def json_after_progress(stdout: str) -> dict[str, Any]:
    """The JSON document printed after the progress lines of `relay send`."""
    lines = stdout.splitlines()
    start = lines.index("{")
    data: dict[str, Any] = json.loads("\n".join(lines[start:]))
    return data


def explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


# --- processes carrying a marker in their environment ---------------------------------------


def marked_processes(marker: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment holds MARKER.

    The marker is inherited by every descendant of the command under test, including those
    started in a session of their own (anvil), so this finds whatever it left behind.
    """
    needle = f"RELAY_CLI_TEST_MARKER={marker}".encode()
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if state != "Z":
            found[int(entry.name)] = cmdline.strip()
    return found


def kill_marked(marker: str) -> None:
    """SIGKILL the processes this test started (those carrying its marker)."""
    for pid in marked_processes(marker):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


# --- relay dev --demo ----------------------------------------------------------------------


@dataclass
class DemoRun:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    pgid: int
    group_alive_after: bool
    anvil_seen: list[str]
    left_after: dict[int, str]
    tmpdir: Path


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    """`relay dev --demo` run once: its output, and what it left running or on disk."""
    cwd = tmp_path_factory.mktemp("dev-demo")
    tmpdir = cwd / "tmp"
    tmpdir.mkdir()
    marker = secrets.token_hex(8)
    env = base_env(cwd, TMPDIR=str(tmpdir), RELAY_CLI_TEST_MARKER=marker)
    command = [sys.executable, "-m", "relay.cli", "dev", "--demo", "--port", str(free_port())]
    started = time.monotonic()
    with (cwd / "stdout").open("wb") as stdout, (cwd / "stderr").open("wb") as stderr:
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
    anvil_seen: list[str] = []
    try:
        while proc.poll() is None and time.monotonic() - started < DEMO_TIMEOUT:
            anvil_seen += [c for c in marked_processes(marker).values() if "anvil" in c]
            time.sleep(0.05)
        if proc.poll() is None:
            _kill_group(proc.pid)
            proc.wait(10)
            pytest.fail(f"relay dev --demo did not finish in {DEMO_TIMEOUT} s")
        seconds = time.monotonic() - started
        time.sleep(0.2)  # let anything orphaned show up as what it is
        yield DemoRun(
            returncode=proc.returncode,
            stdout=(cwd / "stdout").read_text(errors="replace"),
            stderr=(cwd / "stderr").read_text(errors="replace"),
            seconds=seconds,
            pgid=proc.pid,
            group_alive_after=_group_alive(proc.pid),
            anvil_seen=sorted(set(anvil_seen)),
            left_after=marked_processes(marker),
            tmpdir=tmpdir,
        )
    finally:
        if proc.poll() is None:
            _kill_group(proc.pid)
            proc.wait(10)
        _kill_group(proc.pid)
        kill_marked(marker)


def test_dev_demo_sends_one_paid_sms_and_exits(demo: DemoRun) -> None:
    out = demo.stdout
    assert demo.returncode == 0, f"{out}\n{demo.stderr[-3000:]}"
    assert demo.seconds < DEMO_TIMEOUT
    quote = re.search(r"^quote: .*price ([\d.]+) USD \((\d+) atomic USDC\)$", out, re.M)
    assert quote, out
    assert quote.group(1) == "0.05" and int(quote.group(2)) == PRICE_ATOMIC
    settled = re.search(
        r"^settled on-chain: transaction (\S+) \((\d+) atomic USDC paid\)$", out, re.M
    )
    assert settled, out
    assert TX_HASH.fullmatch(settled.group(1)) and len(settled.group(1)) == 66
    assert int(settled.group(2)) == PRICE_ATOMIC
    message = re.search(r"^message id: (\S+) \(status queued\)$", out, re.M)
    assert message and message.group(1), out
    outbox = out[out.index(f"outbox → {DEMO_TO}:") :]
    assert DEMO_MESSAGE in outbox
    assert outbox.rstrip().endswith("Reply STOP to opt out")
    assert out.count("outbox → ") == 1


def test_dev_demo_leaves_no_process_behind(demo: DemoRun) -> None:
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert demo.anvil_seen, "the marker should have found anvil while the demo ran"
    assert not demo.group_alive_after, "the relay dev process group is still alive"
    assert demo.left_after == {}, f"still running after relay dev exited: {demo.left_after}"
    assert list(demo.tmpdir.glob("relay-anvil-*")) == []


def test_dev_demo_removes_its_temporary_database(demo: DemoRun) -> None:
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert list(demo.tmpdir.iterdir()) == []


# --- a running `relay serve` on the module's chain ------------------------------------------


@dataclass
class Stack:
    env: dict[str, str]
    relay: RelayProcess
    ledger: Ledger
    cwd: Path

    def client_env(self, **more: str) -> dict[str, str]:
        return {"RELAY_URL": self.relay.url, **more}

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return run_cli(list(args), env, self.cwd)


@pytest.fixture(scope="module")
def stack(chain: DevChain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("serve")
    cwd = folder / "cwd"
    cwd.mkdir()
    with migrated(chain, folder) as (env, ledger), RelayProcess(env, folder / "relay.log") as relay:
        yield Stack(env, relay, ledger, cwd)


@dataclass
class Sent:
    result: subprocess.CompletedProcess[str]
    payer: Wallet
    before: int
    after: int


@pytest.fixture(scope="module")
def sent(stack: Stack, chain: DevChain) -> Sent:
    """One `relay send` paid by a fresh funded payer."""
    payer = new_wallet(chain, PAYER_USDC)
    before = chain.usdc_balance(payer.address)
    result = stack.run(
        "send",
        "--to",
        "(301) 257-6365",
        "--max-price",
        "0.10",
        MESSAGE,
        **stack.client_env(PAYER_PRIVATE_KEY=payer.key),
    )
    return Sent(result, payer, before, chain.usdc_balance(payer.address))


def test_quote_prints_the_quote_json(stack: Stack) -> None:
    result = stack.run("quote", "--to", "(301) 257-6365", MESSAGE, **stack.client_env())
    assert result.returncode == 0, explain(result)
    data = json.loads(result.stdout, parse_float=Decimal)
    assert data["approved"] is True
    assert data["price_atomic"] == str(PRICE_ATOMIC)
    assert data["price_usd"] == Decimal("0.05")  # a number, as the API answers it
    assert data["to_normalized"] == US
    assert data["segments"] == 1 and data["quote_token"]


def test_quote_invalid_number_is_exit_1_invalid_input(stack: Stack) -> None:
    result = stack.run("quote", "--to", "12", MESSAGE, **stack.client_env())
    assert result.returncode == 1, explain(result)
    assert result.stderr.startswith("invalid_input: ") or "\ninvalid_input: " in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_send_pays_once_and_prints_the_answer(sent: Sent, stack: Stack) -> None:
    result = sent.result
    assert result.returncode == 0, explain(result)
    lines = result.stdout.splitlines()
    assert lines[0] == f"paying from {sent.payer.address}, at most 0.10 USD"
    assert "... quoted 0.05 USD for 1 segment(s)" in lines
    assert "... 402 Payment Required received" in lines
    assert any(line.startswith("... payment signed by ") for line in lines)
    data = json_after_progress(result.stdout)
    assert data["sent"] is True and data["status"] == "queued"
    assert isinstance(data["price_usd"], float)  # a number, as the API answers it
    assert data["message_id"]
    assert TX_HASH.fullmatch(data["transaction"])
    assert data["to"] == US
    assert sent.before - sent.after == PRICE_ATOMIC
    outbox = [m for m in stack.ledger.outbox_messages() if MESSAGE in m["body"]]
    assert len(outbox) == 1


def test_a_send_repeated_with_its_payment_id_never_pays_twice(
    sent: Sent, stack: Stack, chain: DevChain
) -> None:
    """`relay send` prints its payment id before it pays; a send that ended in an error
    (the relay unreachable once the payment was signed, say) repeated with --payment-id
    pays nothing more: the relay takes one payment under one identifier."""
    printed = [line for line in sent.result.stdout.splitlines() if line.startswith("payment id")]
    payment_id = printed[0].split()[2].rstrip(":")
    assert f"repeat with --payment-id {payment_id}" in printed[0]
    result = stack.run(
        "send",
        *("--to", US, "--max-price", "0.10", "--payment-id", payment_id, MESSAGE),
        **stack.client_env(PAYER_PRIVATE_KEY=sent.payer.key),
    )
    assert result.returncode == 1, explain(result)
    assert "idempotency_key_reused" in result.stderr
    assert chain.usdc_balance(sent.payer.address) == sent.after


def test_send_above_max_price_is_refused_before_signing(stack: Stack, chain: DevChain) -> None:
    payer = new_wallet(chain, PAYER_USDC)
    payments_before = len(stack.ledger.list_payments(1000))
    result = stack.run(
        "send",
        "--to",
        US,
        "--max-price",
        "0.01",
        "Too expensive for me",
        **stack.client_env(PAYER_PRIVATE_KEY=payer.key),
    )
    assert result.returncode == 1, explain(result)
    assert "price_limit_exceeded" in result.stderr
    assert "Traceback" not in result.stderr
    assert "{" not in result.stdout
    assert chain.usdc_balance(payer.address) == PAYER_USDC
    assert len(stack.ledger.list_payments(1000)) == payments_before


def test_status_prints_the_status_document(sent: Sent, stack: Stack) -> None:
    answer = json_after_progress(sent.result.stdout)
    database_only = {"DATABASE_URL": stack.env["DATABASE_URL"]}  # all a read-only command needs
    result = stack.run("status", answer["message_id"], **database_only)
    assert result.returncode == 0, explain(result)
    data = json.loads(result.stdout)
    assert data["created_at"].endswith(" UTC") and data["events"][0]["at"].endswith(" UTC")
    assert data["message_id"] == answer["message_id"]
    assert data["status"] == "delivered"  # the outbox holds it as delivered
    assert [event["status"] for event in data["events"]] == ["queued", "delivered"]
    assert data["segments"] == 1 and data["provider"] == "outbox"
    assert data["payment"]["transaction"] == answer["transaction"]
    assert data["payment"]["amount_atomic"] == str(PRICE_ATOMIC)
    assert data["payment"]["payer"].lower() == sent.payer.address.lower()
    assert data["refund"] is None
    assert US not in result.stdout  # the destination is masked


def test_status_of_an_unknown_message_is_exit_1(stack: Stack) -> None:
    result = stack.run("status", "outbox-does-not-exist", **stack.env)
    assert result.returncode == 1, explain(result)
    assert "no message outbox-does-not-exist" in result.stdout


def test_ledger_lists_the_payment_and_its_message(sent: Sent, stack: Stack) -> None:
    answer = json_after_progress(sent.result.stdout)
    message = stack.ledger.message(answer["message_id"])
    assert message is not None
    result = stack.run("ledger", DATABASE_URL=stack.env["DATABASE_URL"])
    assert result.returncode == 0, explain(result)
    out = result.stdout
    payments = out[out.index("Payments (") : out.index("Messages (")]
    messages = out[out.index("Messages (") : out.index("Refunds")]
    row = next(line for line in payments.splitlines() if message.payment_id in line)
    assert answer["transaction"] in row and "dispatched" in row
    assert answer["message_id"] in row
    assert any(
        answer["message_id"] in line and "delivered" in line for line in messages.splitlines()
    )
    assert "Refunds: none" in out


def test_reconcile_all_finishes(sent: Sent, stack: Stack) -> None:
    assert sent.result.returncode == 0
    outbox_before = len(stack.ledger.outbox_messages())
    result = stack.run("reconcile", "--all", **stack.env)
    assert result.returncode == 0, explain(result)
    assert "reconciling unfinished payments..." in result.stdout
    assert re.search(r"^done: \d+ payment\(s\) looked at$", result.stdout, re.M), result.stdout
    assert len(stack.ledger.outbox_messages()) == outbox_before
    assert "warning: --all" in result.stderr  # the server beside it holds the reconciler


def test_reconcile_all_with_nothing_running_warns_of_nothing(stack: Stack, tmp_path: Path) -> None:
    env = {**stack.env, "DATABASE_URL": f"sqlite:///{tmp_path / 'idle.db'}"}
    assert run_cli(["db", "upgrade"], env, tmp_path).returncode == 0
    result = run_cli(["reconcile", "--all"], env, tmp_path)
    assert result.returncode == 0, explain(result)
    assert "warning" not in result.stderr


# --- db upgrade ----------------------------------------------------------------------------


def test_db_upgrade_creates_the_schema(stack: Stack, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    env = {**stack.env, "DATABASE_URL": url}
    for _ in range(2):
        result = run_cli(["db", "upgrade"], env, tmp_path)
        assert result.returncode == 0, explain(result)
        assert f"schema at revision {migrations.head()}" in result.stdout
    assert (tmp_path / "fresh.db").is_file()
    assert Ledger.open_existing(url).list_payments() == []


def test_db_revision_writes_nothing_while_the_tables_match(stack: Stack, tmp_path: Path) -> None:
    env = {**stack.env, "DATABASE_URL": f"sqlite:///{tmp_path / 'fresh.db'}"}
    versions = sorted((REPO / "relay" / "migrations" / "versions").iterdir())
    behind = run_cli(["db", "revision", "-m", "nothing"], env, tmp_path)
    assert behind.returncode == 1, explain(behind)
    assert "run `relay db upgrade`" in behind.stderr and "Traceback" not in behind.stderr
    assert run_cli(["db", "upgrade"], env, tmp_path).returncode == 0
    result = run_cli(["db", "revision", "-m", "nothing"], env, tmp_path)
    assert result.returncode == 1, explain(result)
    assert "no revision written" in result.stdout
    assert sorted((REPO / "relay" / "migrations" / "versions").iterdir()) == versions


def test_procfile_web_workers_only_open_what_the_release_step_made(
    stack: Stack, tmp_path: Path
) -> None:
    """The Procfile's lines as written: gunicorn's workers on a database without the
    schema stop with the one message and create nothing; after `release` they serve."""
    (tmp_path / "relay.db").touch()
    port = free_port()
    env = base_env(
        tmp_path,
        **{
            **stack.env,
            "DATABASE_URL": f"sqlite:///{tmp_path / 'relay.db'}",
            "PORT": str(port),
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        },
    )

    def sh(line: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            line, shell=True, cwd=REPO, env=env, text=True, capture_output=True, timeout=60
        )

    refused = sh(procfile("web"))
    assert refused.returncode != 0, explain(refused)
    assert "the database has no schema revision" in refused.stderr, explain(refused)
    book = Ledger.from_url(env["DATABASE_URL"])
    assert inspect(book.engine).get_table_names() == []
    release = sh(procfile("release"))
    assert release.returncode == 0, explain(release)
    assert book.schema_revision() == migrations.head()
    book.engine.dispose()
    web = subprocess.Popen(procfile("web"), shell=True, cwd=REPO, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not _answers(f"http://127.0.0.1:{port}/health"):
            assert time.monotonic() < deadline and web.poll() is None, "web did not serve"
            time.sleep(0.2)
    finally:
        _kill_group(web.pid)
        web.wait(10)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_db_upgrade_lists_every_configuration_problem(tmp_path: Path) -> None:
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'fresh.db'}", "PAY_TO_ADDRESS": "0x1234"}
    result = run_cli(["db", "upgrade"], env, tmp_path)
    assert result.returncode == 2, explain(result)
    err = result.stderr
    assert "Traceback" not in err
    for name in (
        "QUOTE_SECRET",
        "PAY_TO_ADDRESS",
        "GEMINI_API_KEY",
        "SINCH_SERVICE_PLAN_ID",
        "SINCH_API_TOKEN",
        "SINCH_FROM",
    ):
        assert re.search(rf"^  - {name}\b", err, re.M), f"{name} missing from:\n{err}"
    assert not (tmp_path / "fresh.db").exists()


# --- doctor --------------------------------------------------------------------------------


def test_doctor_passes_on_the_running_stack(stack: Stack) -> None:
    loud = stack.run("doctor", **stack.env)  # the stack runs the development providers
    assert loud.returncode == 1 and re.search(r"^providers\s+FAIL\b", loud.stdout, re.M)
    result = stack.run("doctor", "--dev", **stack.env)
    assert result.returncode == 0, explain(result)
    out = result.stdout
    for name in ("configuration", "database", "rpc", "token", "payTo", "facilitator"):
        assert re.search(rf"^{name}\s+PASS\b", out, re.M), f"{name} not PASS:\n{out}"
    for name in ("refund wallet", "gemini", "sinch"):
        assert re.search(rf"^{name}\s+SKIP\b", out, re.M), f"{name} not SKIP:\n{out}"
    assert "FAIL" not in out
    assert re.search(r"^all \d+ checks passed", out, re.M)
    assert stack.env["SETTLER_PRIVATE_KEY"].removeprefix("0x") not in out


def test_doctor_fails_when_the_rpc_is_closed(stack: Stack) -> None:
    env = {**stack.env, "RPC_URL": f"http://127.0.0.1:{free_port()}"}
    result = stack.run("doctor", "--dev", **env)
    assert result.returncode == 1, explain(result)
    out = result.stdout
    assert re.search(rf"^rpc\s+FAIL\s+RPC_URL={env['RPC_URL']}: connection refused", out, re.M), out
    assert re.search(r"^database\s+PASS\b", out, re.M), out
    assert re.search(r"checks failed: .*\brpc\b", out), out


# --- known bugs (see the report): they fail until fixed, then these markers must go ----------


def test_quote_with_an_unreachable_relay_is_a_clean_error(tmp_path: Path) -> None:
    port = free_port()
    env = {"RELAY_URL": f"http://127.0.0.1:{port}"}
    result = run_cli(["quote", "--to", US, MESSAGE], env, tmp_path)
    assert result.returncode == 1, explain(result)
    assert "Traceback" not in result.stderr, explain(result)
    assert f"127.0.0.1:{port}" in result.stderr


@pytest.mark.parametrize("price", ["abc", "NaN"])
def test_send_with_a_malformed_max_price_is_a_usage_error(tmp_path: Path, price: str) -> None:
    env = {"RELAY_URL": f"http://127.0.0.1:{free_port()}", "PAYER_PRIVATE_KEY": "0x" + "11" * 32}
    result = run_cli(["send", "--to", US, f"--max-price={price}", MESSAGE], env, tmp_path)
    assert "Traceback" not in result.stderr, explain(result)
    assert result.returncode == 2, explain(result)
    assert "--max-price" in result.stderr


def test_ledger_on_a_missing_database_is_a_clean_error(stack: Stack, tmp_path: Path) -> None:
    env = {**stack.env, "DATABASE_URL": f"sqlite:///{tmp_path / 'missing.db'}"}
    result = run_cli(["ledger"], env, tmp_path)
    assert "Traceback" not in result.stderr, explain(result)
    assert result.returncode == 1, explain(result)
    assert not (tmp_path / "missing.db").exists()


def test_the_exports_relay_dev_prints_are_all_another_terminal_needs(tmp_path: Path) -> None:
    with DevStack.start(port=0, say=lambda _: None) as stack:
        exports = dict(
            line.strip().removeprefix("export ").split("=", 1)
            for line in stack.usage().splitlines()
            if line.strip().startswith("export ")
        )
        assert set(exports) == {"RELAY_URL", "PAYER_PRIVATE_KEY", "DATABASE_URL"}
        sent = run_cli(
            ["send", "--to", DEMO_TO, "--max-price", "0.10", "From terminal two"],
            exports,
            tmp_path,
            timeout=DEMO_TIMEOUT,
        )
        assert sent.returncode == 0, explain(sent)
        message_id = json_after_progress(sent.stdout)["message_id"]
        listed = run_cli(["ledger"], exports, tmp_path)
        assert listed.returncode == 0 and message_id in listed.stdout, explain(listed)
        status = run_cli(["status", message_id], exports, tmp_path)
        assert status.returncode == 0 and json.loads(status.stdout)["status"] == "delivered"
        waited = run_cli(["status", message_id, "--api", "--wait"], exports, tmp_path)
        assert waited.returncode == 0, explain(waited)
        assert json.loads(waited.stdout)["status"] == "delivered"
        with stack.services.ledger.begin() as conn:  # as if no report had come yet
            conn.execute(update(messages).values(status="queued"))
        started = time.monotonic()
        pending = run_cli(["status", message_id, "--wait", "--timeout", "2"], exports, tmp_path)
        assert pending.returncode == 3, explain(pending)  # not final when the time ran out
        assert json.loads(pending.stdout)["status"] == "queued"
        assert time.monotonic() - started < CLI_TIMEOUT


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("postgresql://postgres:pw-not-printed@127.0.0.1:5432/no_such_db", "does not exist"),
        ("postgresql://postgres@127.0.0.1:1/relay", "Connection refused"),
    ],
)
def test_a_database_that_is_not_there_is_one_line(tmp_path: Path, url: str, said: str) -> None:
    env = {"DATABASE_URL": url, "QUOTE_SECRET": "q" * 20, "PAY_TO_ADDRESS": PAY_TO}
    for args in (["db", "upgrade"], ["ledger"], ["status", "m-1"]):
        result = run_cli(args, {**env, **DEV_PROVIDERS}, tmp_path)
        assert result.returncode == 1, explain(result)
        (line,) = result.stderr.splitlines()
        assert line.startswith("database: ") and said in line, line
        assert "pw-not-printed" not in result.stderr
