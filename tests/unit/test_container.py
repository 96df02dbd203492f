"""The worker's image (the top-level Dockerfile) and the compose stack, checked offline:
the files parse, name the right images, commands and ports, the worker's image holds
only the product, runs as a non-root user, and its command is in exec form so SIGTERM
reaches Python. tests/container builds and runs the image itself (podman)."""

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
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = REPO / "local" / "docker-compose.yml"
WORKER_CMD = ["python", "-m", "chalicelib.worker"]


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


def stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name (or its index) -> its instructions, FROM first, in file order."""
    out: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for word, arg in instructions():
        if word == "FROM":
            words = arg.split()
            name = words[-1] if len(words) >= 3 and words[-2].upper() == "AS" else str(len(out))
            current = out[name] = []
        if current is not None:
            current.append((word, arg))
    return out


def worker_chain() -> list[list[tuple[str, str]]]:
    """The default target (the last stage) and the stages it builds on, base first."""
    every = stages()
    chain = [list(every.values())[-1]]
    while (parent := chain[0][0][1].split()[0]) in every:
        chain.insert(0, every[parent])
    return chain


def _regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go's filepath.Match, plus `**`) as a regex."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out)


def ignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context: the last line that
    matches the path or one of its parent directories wins (`!` lets it in)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    verdict = False
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pattern = _regex(line.removeprefix("!").strip().strip("/"))
        if any(pattern.fullmatch(p) for p in prefixes):
            verdict = not line.startswith("!")
    return verdict


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_dockerfile_base_is_an_argument_non_root_exec_form() -> None:
    ins = instructions()
    assert ins[0] == ("ARG", "BASE=python:3.11-slim")
    chain = worker_chain()
    assert chain[0][0][1].split()[0] == "${BASE}"  # FROM ${BASE} [AS ...]
    worker = [i for stage in chain for i in stage]
    users = [arg for word, arg in worker if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    cmd = [arg for word, arg in worker if word == "CMD"][-1]
    assert json.loads(cmd) == WORKER_CMD  # exec form: JSON array
    assert not [arg for word, arg in ins if word == "ENTRYPOINT"]
    assert [arg for word, arg in worker if word == "STOPSIGNAL"][-1] == "SIGTERM"
    env = " ".join(arg for word, arg in worker if word == "ENV")
    stage = re.search(r"\bSTAGE=(\S+)", env)
    assert stage and stage.group(1) != "local"  # the container takes only its environment
    assert re.search(r"\bPATH=/opt/venv/bin:", env)  # `python` is the venv's on every base
    # The USER comes after the installs, so the code runs unprivileged.
    words = [w for w, _ in worker]
    assert max(i for i, w in enumerate(words) if w == "RUN") < words.index("USER")


def test_dockerfile_copies_what_exists_and_the_worker_only_the_product() -> None:
    copied: list[str] = []
    for word, arg in instructions():
        if word == "COPY" and "--from=" not in arg:
            *sources, _dest = shlex.split(arg)
            copied += sources
    for source in copied:
        assert (REPO / source).exists(), source
        assert not ignored(source.rstrip("/")), f"{source} is in .dockerignore"
    worker_copied = {shlex.split(arg)[0] for stage in worker_chain()
                     for word, arg in stage if word == "COPY"}
    assert worker_copied == {"requirements.txt", "chalicelib/"}
    assert "requirements-dev.txt" not in " ".join(a for s in worker_chain() for _, a in s)


@pytest.mark.parametrize("path", [
    "local/.keys/app_private.pem", "local/alipay_sandbox/server.py", "local/bench.py",
    "tests/conftest.py", "app.py", ".venv/bin/python", ".git/HEAD", "wheels/x.whl",
    "chalicelib/__pycache__/config.cpython-311.pyc",
])
def test_dockerignore_keeps_out(path: str) -> None:
    assert ignored(path)  # no local key, no dev tooling, no tests in a build context


@pytest.mark.parametrize("path", ["requirements.txt", "chalicelib/config.py",
                                  "chalicelib/worker/__main__.py"])
def test_dockerignore_lets_in(path: str) -> None:
    assert not ignored(path)


def test_compose_services_images_commands_ports(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"rabbitmq", "broker-users", "dynamodb", "seed", "sandbox", "api",
                             "bridge"}
    rabbit = services["rabbitmq"]
    assert rabbit["image"].startswith("rabbitmq:3-management")
    assert {"127.0.0.1:5672:5672", "127.0.0.1:15672:15672"} <= set(rabbit["ports"])

    def cmd(name: str) -> list[str]:
        return services[name]["command"]

    assert cmd("bridge") == WORKER_CMD
    assert cmd("api")[:4] == ["python", "-m", "local", "api"]
    assert cmd("api")[cmd("api").index("--host") + 1] == "0.0.0.0"
    assert cmd("dynamodb")[:4] == ["python", "-m", "local", "dynamodb"]
    assert cmd("sandbox")[:3] == ["python", "-m", "local.alipay_sandbox"]
    assert cmd("seed") == ["python", "-m", "local", "seed"]
    published = [str(p) for s in services.values() for p in s.get("ports", [])]
    assert {"127.0.0.1:8000:8000", "127.0.0.1:8001:8001", "127.0.0.1:8002:8002"} <= set(published)
    for port in published:  # nothing listens beyond this machine
        assert port.startswith("127.0.0.1:") and port.count(":") == 2, port
    targets = set(stages())
    for name in ("dynamodb", "seed", "sandbox", "api", "bridge"):
        build = services[name]["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        # the dev tools need requirements-dev.txt and the code (mounted); the worker is the
        # product image, the Dockerfile's default target
        assert build.get("target") == (None if name == "bridge" else "dev")
        assert build.get("target") is None or build["target"] in targets
        env = services[name]["environment"]
        assert "guest" not in str(env.get("RMQ_URL", ""))  # each its own user (test_compose)
        assert env["AWS_ENDPOINT_URL_DYNAMODB"] == "http://dynamodb:8002"
        if name != "bridge":
            assert any(str(v).split(":")[:2] == ["..", "/app"] for v in services[name]["volumes"])
    for name in ("api", "bridge"):
        assert services[name]["network_mode"] == "service:sandbox"
        assert services[name]["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    # the product takes only its environment (no .chalice/config.json): all it needs
    worker_env = services["bridge"]["environment"]
    for key in ("ALIPAY_APP_ID", "ALIPAY_SELLER_ID", "ALIPAY_GATEWAY",
                "ALIPAY_APP_PRIVATE_KEY_FILE", "ALIPAY_PUBLIC_KEY_FILE", "AWS_DEFAULT_REGION"):
        assert worker_env.get(key), key


@pytest.mark.parametrize("service", ["dynamodb", "seed", "sandbox", "api"])
def test_compose_commands_are_ones_the_cli_knows(compose: dict[str, Any], service: str) -> None:
    command = compose["services"][service]["command"]
    module_end = 3 if command[2] == "local.alipay_sandbox" else 4
    done = subprocess.run([sys.executable, *command[1:module_end], "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    for flag in (a for a in command[module_end:] if a.startswith("--")):
        assert flag in done.stdout, (service, flag)


def test_the_worker_module_exists() -> None:
    # `python -m chalicelib.worker` takes no arguments (it would start consuming): the
    # module is checked, not run.
    assert (REPO / "chalicelib" / "worker" / "__main__.py").is_file()
