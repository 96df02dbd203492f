"""The bridge's container and the compose stack, checked offline (no Docker engine
here): the files parse, name the right images, commands and ports, the image runs
as a non-root user, and its command is in exec form so SIGTERM reaches Python."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "local" / "Dockerfile"
COMPOSE = REPO / "local" / "docker-compose.yml"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_dockerfile_slim_base_non_root_exec_form() -> None:
    ins = instructions()
    assert ins[0] == ("FROM", "python:3.11-slim")
    users = [arg for word, arg in ins if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    cmd = [arg for word, arg in ins if word == "CMD"][-1]
    assert json.loads(cmd) == ["python", "-m", "local", "bridge"]  # exec form: JSON array
    assert not [arg for word, arg in ins if word == "ENTRYPOINT"]
    env = " ".join(arg for word, arg in ins if word == "ENV")
    stage = re.search(r"\bSTAGE=(\S+)", env)
    assert stage and stage.group(1) != "local"  # the container takes only its environment
    # The USER comes after the installs, so the code runs unprivileged.
    assert max(i for i, (w, _) in enumerate(ins) if w == "RUN") < [w for w, _ in ins].index("USER")


def test_dockerfile_copies_what_exists_and_what_the_bridge_needs() -> None:
    copied = []
    for word, arg in instructions():
        if word == "COPY":
            *sources, _dest = shlex.split(arg)
            copied += sources
    for source in copied:
        assert (REPO / source).exists(), source
    assert {"requirements.txt", "chalicelib/", "local/"} <= set(copied)
    ignore = (REPO / "local" / "Dockerfile.dockerignore").read_text().split()
    assert {"local/.keys", ".venv", ".git"} <= set(ignore)  # no local key in an image


def test_compose_services_images_commands_ports(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"rabbitmq", "dynamodb", "seed", "sandbox", "api", "bridge"}
    rabbit = services["rabbitmq"]
    assert rabbit["image"].startswith("rabbitmq:3-management")
    assert {"5672:5672", "15672:15672"} <= set(rabbit["ports"])

    def cmd(name: str) -> list[str]:
        return services[name]["command"]

    assert cmd("bridge") == ["python", "-m", "local", "bridge"]
    assert cmd("api")[:4] == ["python", "-m", "local", "api"]
    assert cmd("api")[cmd("api").index("--host") + 1] == "0.0.0.0"
    assert cmd("dynamodb")[:4] == ["python", "-m", "local", "dynamodb"]
    assert cmd("sandbox")[:3] == ["python", "-m", "local.alipay_sandbox"]
    assert cmd("seed") == ["python", "-m", "local", "seed"]
    published = {p for s in services.values() for p in s.get("ports", [])}
    assert {"8000:8000", "8001:8001", "8002:8002"} <= published
    for name in ("dynamodb", "seed", "sandbox", "api", "bridge"):
        build = services[name]["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        env = services[name]["environment"]
        assert env["RMQ_URL"].startswith("amqp://guest:guest@rabbitmq:5672/")
        assert env["AWS_ENDPOINT_URL_DYNAMODB"] == "http://dynamodb:8002"
    for name in ("api", "bridge"):
        assert services[name]["network_mode"] == "service:sandbox"
        assert services[name]["depends_on"]["rabbitmq"]["condition"] == "service_healthy"


@pytest.mark.parametrize("service", ["dynamodb", "seed", "sandbox", "api", "bridge"])
def test_compose_commands_are_ones_the_cli_knows(compose: dict[str, Any], service: str) -> None:
    command = compose["services"][service]["command"]
    module_end = 3 if command[2] == "local.alipay_sandbox" else 4
    done = subprocess.run([sys.executable, *command[1:module_end], "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    for flag in (a for a in command[module_end:] if a.startswith("--")):
        assert flag in done.stdout, (service, flag)
