"""The built deployment.zip: within its budget, without the runtime's SDK, and
every module the functions import loads from it beside a stand-in for the
runtime's SDK (the boto3/botocore this machine has), under the functions'
Python (package.LAMBDA_RUNTIME, whose wheels the zip holds) seeing nothing else
(no site-packages)."""

from __future__ import annotations

import json
import subprocess
import sysconfig
import zipfile
from pathlib import Path

import pytest

from local import lambda_zip, package

# Loaded lazily, by role: each must come from the zip (or the runtime's SDK).
LAZY = ("pika", "pynamodb.connection", "pynamodb.transactions", "alipay", "Cryptodome",
        "cryptography.hazmat.primitives.asymmetric.rsa", "jwt", "boto3", "botocore")

PROBE = r"""
import importlib, json, pkgutil, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import app, chalicelib
names = ["app"] + [m.name for m in pkgutil.walk_packages(chalicelib.__path__, "chalicelib.")]
names += json.loads(sys.argv[3])
where = {}
for name in names:
    module = importlib.import_module(name)
    where[name] = getattr(module, "__file__", "") or ""
print(json.dumps({"python": "%d.%d" % sys.version_info[:2], "where": where}))
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("package") / "prod"
    package.build("prod", out)
    return out / "deployment.zip"


def test_the_zip_is_within_its_budget_and_holds_no_runtime_sdk(built: Path) -> None:
    size = built.stat().st_size
    assert size <= lambda_zip.BUDGET_BYTES, (
        f"deployment.zip is {size:,} bytes, over its budget of {lambda_zip.BUDGET_BYTES:,}: "
        f"see local/lambda_zip.py before raising it")
    with zipfile.ZipFile(built) as z:
        tops = {i.filename.split("/", 1)[0] for i in z.infolist()}
    assert not {t for t in tops if lambda_zip.runtime_provided(t)}
    assert {"app.py", "chalicelib", "pynamodb", "pika", "alipay", "cryptography"} <= tops


def test_every_module_the_functions_import_loads_from_the_zip(built: Path,
                                                             tmp_path: Path) -> None:
    code = tmp_path / "task"  # as Lambda unpacks it to /var/task
    with zipfile.ZipFile(built) as z:
        z.extractall(code)
    runtime = tmp_path / "runtime"  # as the runtime's SDK sits in /var/runtime
    runtime.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for name in lambda_zip.RUNTIME_MODULES:
        if (site / name).exists():
            (runtime / name).symlink_to(site / name)
    python = package.runtime_python()
    if python is None:
        pytest.skip(f"no {package.LAMBDA_RUNTIME} on this machine to load the zip's wheels")
    done = subprocess.run([python, "-S", "-c", PROBE, str(code), str(runtime),
                           json.dumps(LAZY)], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "STAGE": "prod"}, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout)
    assert "python" + seen["python"] == package.LAMBDA_RUNTIME
    where = seen["where"]
    for name, path in where.items():
        home = runtime if name.split(".")[0] in ("boto3", "botocore") else code
        assert path.startswith(str(home)), (name, path)
