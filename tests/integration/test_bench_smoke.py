"""`python -m local bench --quick` end to end on two stages: it starts its own moto
and vhost, prints the table and writes every figure to the JSON file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.rabbitmq

REPO = Path(__file__).resolve().parents[2]


def test_quick_bench_writes_the_figures(rabbitmq_running: None, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "STAGE"))}
    done = subprocess.run(
        [sys.executable, "-m", "local", "bench", "--quick", "drain", "cold", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| stage" in done.stdout and "1 drain" in done.stdout and "6 cold" in done.stdout
    result = json.loads(out.read_text())
    drain = result["stages"]["drain"]["data"]
    assert drain["paid"] == drain["n"] > 0
    assert drain["bridge_rate"] > 0 and drain["update_rate"] > 0 and drain["consume_rate"] > 0
    cold = result["stages"]["cold"]["data"]
    assert cold["sockets"] == 0 and cold["project_s"] and cold["baseline_s"]
    for stage in result["stages"].values():
        for row in stage["rows"]:
            assert row["project"] is not None, row
