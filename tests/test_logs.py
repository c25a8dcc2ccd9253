"""Logging: the Procfile's web line logs the relay's own lines, as JSON when asked, each
with the id of its request; ids are echoed in X-Request-Id."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from flask.testing import FlaskClient

from relay.logs import JsonFormatter
from tests.conftest import PAY_TO
from tests.processes import free_port, procfile, wait_until_up

REPO = Path(__file__).resolve().parent.parent
US = "+13012576365"


def test_the_procfile_web_line_logs_json_lines_with_request_ids(tmp_path: Path) -> None:
    port = free_port()
    env = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),  # this checkout, whatever is installed
        "HOME": str(tmp_path),
        "PORT": str(port),
        "WEB_CONCURRENCY": "1",
        "QUOTE_SECRET": "log-test-quote-secret-0123456789",
        "PAY_TO_ADDRESS": PAY_TO,
        "MODERATION_PROVIDER": "rules",
        "SMS_PROVIDER": "outbox",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'relay.db'}",
        "LOG_FORMAT": "json",
        "RPC_URL": "http://127.0.0.1:1",
    }
    subprocess.run(
        [sys.executable, "-m", "relay.cli", "db", "upgrade"], env=env, cwd=tmp_path, check=True
    )
    stderr = tmp_path / "web.log"
    with stderr.open("wb") as log:
        web = subprocess.Popen(
            procfile("web"),
            shell=True,
            cwd=tmp_path,
            env=env,
            stderr=log,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, web, "/api/pricing")
        body = {"message": "Log my quote", "to": US}
        answer = requests.post(
            url + "/api/quote", json=body, headers={"X-Request-Id": "req-7f3a"}, timeout=10
        )
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Request-Id"] == "req-7f3a"
        time.sleep(0.5)
    finally:
        os.killpg(web.pid, signal.SIGTERM)
        web.wait(10)
    lines = [json.loads(line) for line in stderr.read_text().splitlines() if line.startswith("{")]
    quoted = [line for line in lines if line["logger"] == "relay.flows.quoting"]
    assert quoted, stderr.read_text()
    assert quoted[0]["request_id"] == "req-7f3a"
    assert quoted[0]["level"] == "INFO" and quoted[0]["message"].startswith("quoted +1********65")
    assert "Log my quote" not in stderr.read_text()  # never a message body


@pytest.mark.parametrize("sent", ["", "x" * 65, "bad id with spaces", "ü"])
def test_an_unusable_request_id_is_replaced(client: FlaskClient, sent: str) -> None:
    answer = client.get("/api/pricing", headers={"X-Request-Id": sent} if sent else {})
    made = answer.headers["X-Request-Id"]
    assert made != sent and len(made) == 32 and int(made, 16) >= 0


def test_errors_carry_the_request_id_too(client: FlaskClient) -> None:
    answer = client.post("/api/quote", data="{", headers={"X-Request-Id": "abc.123"})
    assert answer.status_code == 400
    assert answer.headers["X-Request-Id"] == "abc.123"


def test_a_json_line_holds_its_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("relay.x", logging.ERROR, __file__, 1, "failed %s", ("x",), None)
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["message"] == "failed x" and parsed["level"] == "ERROR"
    assert "ValueError: boom" in parsed["exception"] and parsed["request_id"] == "-"


def test_the_web_line_refuses_a_bad_configuration_in_one_message(tmp_path: Path) -> None:
    env = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "PORT": str(free_port()),
        "WEB_CONCURRENCY": "2",
        "PAY_TO_ADDRESS": PAY_TO,
        "MODERATION_PROVIDER": "rules",
        "SMS_PROVIDER": "outbox",
    }
    web = subprocess.run(
        procfile("web"), shell=True, cwd=tmp_path, env=env, capture_output=True, timeout=60
    )
    assert web.returncode == 2
    err = web.stderr.decode()
    assert "QUOTE_SECRET must be set" in err and "Traceback" not in err, err
    assert err.count("QUOTE_SECRET") == 1  # once, from the master: no worker started
