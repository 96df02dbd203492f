"""The Lambda deployment zip, lean: what the functions import and the runtime lacks.

`chalice package` puts every wheel requirements.txt pulls in into deployment.zip,
and pynamodb pulls in botocore (16 of the zip's 25 MB), with its own
dependencies. The Lambda Python runtime brings boto3, botocore and theirs
(jmespath, python-dateutil, s3transfer, six, urllib3) and keeps them patched;
pynamodb asks for botocore >= 1.12.54, which every runtime's satisfies, and the
code calls only long-standing APIs (DynamoDB, S3, Secrets Manager). So `slim`
takes them out of the zip: one copy of the SDK, the runtime's (README "Deploy to
AWS", "The Lambda package"). What stays: the code, chalice's runtime part,
pynamodb, pika, PyJWT, cryptography (the RSA2 checks and signatures) and
python-alipay-sdk with pycryptodomex, which the SDK imports when it loads.

BUDGET_BYTES is the size the zip may reach; tests/integration/test_lambda_zip.py
fails past it, so a new dependency is a decision, not an accident.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

# Top-level names in the zip that the runtime provides: packages, single-file
# modules, and the distributions' metadata (matched by distribution name).
RUNTIME_MODULES = frozenset({"boto3", "botocore", "s3transfer", "jmespath", "dateutil",
                             "urllib3", "six.py"})
RUNTIME_DISTRIBUTIONS = frozenset({"boto3", "botocore", "s3transfer", "jmespath",
                                   "python_dateutil", "urllib3", "six"})
_METADATA = re.compile(r"^(?P<name>[A-Za-z0-9_.]+?)-[^-/]+\.(dist-info|data)$")

BUDGET_BYTES = 9 * 1024 * 1024


@dataclass(frozen=True)
class Slimmed:
    before_bytes: int
    after_bytes: int
    dropped: tuple[str, ...]  # top-level names taken out, sorted


def runtime_provided(top: str) -> bool:
    """Whether a top-level entry of the zip is one the Lambda runtime brings."""
    if top in RUNTIME_MODULES:
        return True
    meta = _METADATA.match(top)
    return bool(meta) and meta.group("name").lower() in RUNTIME_DISTRIBUTIONS


def slim(zip_path: Path) -> Slimmed:
    """Rewrites `zip_path` without what the runtime provides (entries in order,
    each with its compression, dates and permissions)."""
    before = zip_path.stat().st_size
    dropped: set[str] = set()
    with tempfile.NamedTemporaryFile(dir=zip_path.parent, suffix=".zip", delete=False) as tmp:
        out_path = Path(tmp.name)
    try:
        with zipfile.ZipFile(zip_path) as src, zipfile.ZipFile(out_path, "w") as out:
            for info in src.infolist():
                top = info.filename.split("/", 1)[0]
                if runtime_provided(top):
                    dropped.add(top)
                    continue
                with src.open(info) as data, out.open(info, "w") as target:
                    shutil.copyfileobj(data, target)
        shutil.copymode(zip_path, out_path)
        out_path.replace(zip_path)
    finally:
        out_path.unlink(missing_ok=True)
    return Slimmed(before, zip_path.stat().st_size, tuple(sorted(dropped)))
