"""local/lambda_zip.py on a zip made here: what the runtime brings goes, the rest
stays byte for byte."""

from __future__ import annotations

import zipfile
from pathlib import Path

from local.lambda_zip import runtime_provided, slim

ENTRIES = {
    "app.py": b"import chalicelib\n",
    "chalicelib/__init__.py": b"",
    "pynamodb/__init__.py": b"x = 1\n" * 100,
    "pynamodb-6.1.0.dist-info/METADATA": b"Requires-Dist: botocore>=1.12.54\n",
    "botocore/__init__.py": b"big\n" * 1000,
    "botocore/data/dynamodb/2012-08-10/service-2.json": b"{}" * 5000,
    "botocore-1.44.8.dist-info/RECORD": b"r",
    "six.py": b"six\n",
    "six-1.17.0.dist-info/METADATA": b"m",
    "python_dateutil-2.9.0.post0.dist-info/METADATA": b"m",
    "dateutil/tz.py": b"tz",
    "jmespath-1.1.0.data/scripts/jp.py": b"jp",
    "urllib3/__init__.py": b"u",
    "sixteen/__init__.py": b"not six",
    "botocore_stub.py": b"not botocore",
}
KEPT = {"app.py", "chalicelib/__init__.py", "pynamodb/__init__.py",
        "pynamodb-6.1.0.dist-info/METADATA", "sixteen/__init__.py", "botocore_stub.py"}


def test_slim_drops_what_the_runtime_brings_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "deployment.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in ENTRIES.items():
            info = zipfile.ZipInfo(name, date_time=(2026, 1, 2, 3, 4, 6))
            info.external_attr = 0o755 << 16 if name == "app.py" else 0o644 << 16
            z.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    done = slim(path)
    with zipfile.ZipFile(path) as z:
        assert {i.filename for i in z.infolist()} == KEPT
        for info in z.infolist():
            assert z.read(info) == ENTRIES[info.filename]
            assert info.date_time == (2026, 1, 2, 3, 4, 6)
            assert info.compress_type == zipfile.ZIP_DEFLATED
        assert z.getinfo("app.py").external_attr >> 16 == 0o755
    assert done.dropped == ("botocore", "botocore-1.44.8.dist-info", "dateutil",
                            "jmespath-1.1.0.data", "python_dateutil-2.9.0.post0.dist-info",
                            "six-1.17.0.dist-info", "six.py", "urllib3")
    assert done.after_bytes == path.stat().st_size < done.before_bytes
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


def test_only_the_runtimes_own_distributions_count() -> None:
    assert runtime_provided("boto3") and runtime_provided("s3transfer-0.10.1.dist-info")
    assert not runtime_provided("pynamodb") and not runtime_provided("cryptography")
    assert not runtime_provided("botocore_stub.py") and not runtime_provided("sixteen")
    assert not runtime_provided("pycryptodomex-3.24.2.dist-info")
