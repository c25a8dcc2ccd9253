"""The container recipe without a container runtime: the Dockerfile's build context makes a
wheel that installs and serves with the image's own command, as a non-root user; the
compose file is valid Compose and runs only commands the relay has."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import requests
from compose_spec import PyCompose
from docker.utils.build import exclude_paths
from dockerfile_parse import DockerfileParser

from relay.cli import build_parser
from relay.settings import read_settings
from tests.conftest import PAY_TO
from tests.processes import REPO, free_port
from tests.test_package import install_wheel, run


def build_context(into: Path) -> Path:
    """The files `docker build .` sends, as .dockerignore filters them."""
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for name in sorted(exclude_paths(str(REPO), patterns)):
        source, target = REPO / name, into / name
        if source.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return into


def final_stage() -> list[dict[str, str]]:
    """The instructions of the Dockerfile's last stage."""
    instructions = DockerfileParser(str(REPO / "Dockerfile")).structure
    last = max(i for i, step in enumerate(instructions) if step["instruction"] == "FROM")
    return instructions[last:]


def test_the_image_context_builds_a_wheel_that_serves_with_the_image_command(
    tmp_path: Path,
) -> None:
    context = build_context(tmp_path / "context")
    assert not (context / "tests").exists() and not (context / ".env").exists()
    parser = DockerfileParser(str(REPO / "Dockerfile"))
    for step in parser.structure:
        if step["instruction"] == "COPY" and "--from" not in step["value"]:
            *sources, _ = shlex.split(step["value"])
            assert all((context / source).exists() for source in sources), step["value"]
    stage = final_stage()
    (user,) = [step["value"] for step in stage if step["instruction"] == "USER"]
    assert user not in ("root", "0")
    _, python = install_wheel(context, tmp_path)

    env = {
        "PATH": f"{python.parent}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        **parser.envs,  # the image's ENV (PORT, WEB_CONCURRENCY, ...)
        "PORT": str(free_port()),
        "WEB_CONCURRENCY": "1",
        "QUOTE_SECRET": "image-test-secret-0123456789",
        "PAY_TO_ADDRESS": PAY_TO,
        "MODERATION_PROVIDER": "rules",
        "SMS_PROVIDER": "outbox",
        "RPC_URL": "http://127.0.0.1:1",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'relay.db'}",
    }
    upgraded = run(["relay", "db", "upgrade"], cwd=tmp_path, **env)
    assert upgraded.returncode == 0, upgraded.stderr
    (command,) = [step["value"] for step in stage if step["instruction"] == "CMD"]
    argv = [str(part) for part in json.loads(command)]
    web = subprocess.Popen(argv, cwd=tmp_path, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{env['PORT']}"
        deadline = time.monotonic() + 60
        while True:
            assert web.poll() is None, "the image's command exited"
            try:
                answer = requests.get(url + "/api/pricing", timeout=5)
                break
            except (requests.ConnectionError, requests.Timeout):
                assert time.monotonic() < deadline, "the image's command did not serve"
                time.sleep(0.2)
        assert answer.status_code == 200
        quote = requests.post(
            url + "/api/quote", json={"message": "From the image", "to": "+13012576365"}, timeout=10
        )
        assert quote.status_code == 200, quote.text
    finally:
        os.killpg(web.pid, signal.SIGTERM)
        web.wait(10)


def test_the_compose_file_is_valid_and_runs_the_relays_own_commands() -> None:
    compose = PyCompose.from_yaml((REPO / "compose.yaml").read_text()).to_dict()
    services = compose["services"]
    assert set(services) == {"db", "redis", "migrate", "web", "worker"}
    relays = {name: services[name] for name in ("migrate", "web", "worker")}
    commands = {action.dest: action for action in build_parser()._actions}["command"].choices
    for name, service in relays.items():
        assert service["build"] == "." and service["env_file"] == ".env", name
        command = service.get("command") or ["relay", "serve"]  # web: the image's CMD
        assert command[0] == "relay" and command[1] in commands, (name, command)
        settings, problems = read_settings(service["environment"], env_file=None)
        assert not [p for p in problems if p.startswith(("DATABASE_URL", "RATE_LIMIT"))]
        assert settings.database_url.startswith("postgresql://")
    assert relays["migrate"]["depends_on"]["db"]["condition"] == "service_healthy"
    for name in ("web", "worker"):  # never before the release step has finished
        upgrade = relays[name]["depends_on"]["migrate"]["condition"]
        assert upgrade == "service_completed_successfully"
