"""Container fixtures: podman (Debian's, with .ci/containers.conf), the worker's image
built from the top-level Dockerfile on the local base image, offline.

Nothing is skipped: without podman or the base image the tests fail and say how to
get them (`.ci/podman.sh`; `.ci/run` calls it). The image is built from a wheelhouse
made here with pip (`pip wheel -r requirements.txt`, kept in .pytest_cache), so the
build needs no network;
it keeps the tag `localhost/shop-pay-worker:test` (its layers are the next build's
cache) and the image it replaces is removed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.integration.conftest import rabbitmq_running, rmq_vhost  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parents[2]
CONTAINERS_CONF = REPO / ".ci" / "containers.conf"
BASE_IMAGE = "localhost/debian-python:bookworm"
IMAGE_TAG = "localhost/shop-pay-worker:test"
HOW = "run .ci/podman.sh (it installs podman, runc and mmdebstrap and builds " \
      f"{BASE_IMAGE}; .ci/run calls it)"


def podman_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    return env


def podman(*args: str, timeout: float = 120, check: bool = True,
           ) -> subprocess.CompletedProcess[str]:
    """`podman ARGS` with this repository's containers.conf; fails the test on error."""
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout,
                          env=podman_env(), check=False)
    if check and done.returncode != 0:
        pytest.fail(f"podman {' '.join(args)} failed ({done.returncode}):\n"
                    f"{done.stderr.strip()[-3000:] or done.stdout.strip()[-3000:]}",
                    pytrace=False)
    return done


@dataclasses.dataclass(frozen=True)
class WorkerImage:
    id: str
    tag: str
    size_bytes: int
    timings: dict[str, float]  # seconds: "wheelhouse", "build"


@pytest.fixture(scope="session")
def podman_ready() -> None:
    if shutil.which("podman") is None:
        pytest.fail(f"podman is not on PATH: {HOW}", pytrace=False)
    if podman("image", "exists", BASE_IMAGE, check=False).returncode != 0:
        pytest.fail(f"the base image {BASE_IMAGE} is missing: {HOW}", pytrace=False)


def wheelhouse(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """requirements.txt as wheels (`pip wheel`), for a build without network. Kept in
    pytest's cache (.pytest_cache) per content of requirements.txt: made once."""
    digest = hashlib.sha256((REPO / "requirements.txt").read_bytes()).hexdigest()[:16]
    cache = getattr(config, "cache", None)  # None under -p no:cacheprovider
    home = cache.mkdir("worker-wheelhouse") if cache is not None else None
    if home is not None and (home / digest).is_dir():
        return home / digest
    if home is not None:
        made = Path(tempfile.mkdtemp(prefix="tmp", dir=home))
    else:
        made = tmp_path_factory.mktemp("wheels")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
         "-r", str(REPO / "requirements.txt"), "-w", str(made)],
        capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        pytest.fail(f"pip wheel -r requirements.txt failed:\n{done.stderr[-3000:]}",
                    pytrace=False)
    if home is None:
        return made
    for old in home.iterdir():  # other versions of requirements.txt; ones left half-made
        half_made = old.name.startswith("tmp")
        if old.name != digest and old != made and (
                not half_made or time.time() - old.stat().st_mtime > 3600):
            shutil.rmtree(old, ignore_errors=True)
    try:
        made.rename(home / digest)
    except OSError:  # another session made it first
        shutil.rmtree(made, ignore_errors=True)
    return home / digest


@pytest.fixture(scope="session")
def worker_image(podman_ready: None, request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> WorkerImage:
    """The top-level Dockerfile's default target, built on the local base image."""
    timings: dict[str, float] = {}
    started = time.monotonic()
    wheels = wheelhouse(request.config, tmp_path_factory)
    timings["wheelhouse"] = time.monotonic() - started

    old = podman("image", "inspect", "--format", "{{.Id}}", IMAGE_TAG, check=False)
    iidfile = tmp_path_factory.mktemp("image") / "iid"
    started = time.monotonic()
    podman("build", "--pull=never", "--layers", "--file", str(REPO / "Dockerfile"),
           "--build-arg", f"BASE={BASE_IMAGE}", "--build-context", f"wheels={wheels}",
           "--iidfile", str(iidfile), "--tag", IMAGE_TAG, str(REPO), timeout=900)
    timings["build"] = time.monotonic() - started
    image_id = iidfile.read_text().strip().removeprefix("sha256:")
    previous = old.stdout.strip()
    if old.returncode == 0 and previous and previous != image_id:
        podman("rmi", previous, check=False)  # still used by a container: left alone
    size = int(podman("image", "inspect", "--format", "{{.Size}}", image_id).stdout.strip())
    return WorkerImage(image_id, IMAGE_TAG, size, timings)
