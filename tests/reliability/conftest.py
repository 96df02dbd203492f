"""Fixtures of the reliability suite, and the table it prints at the end of the run.

Every scenario records one row on `harness.SCOREBOARD` (runs, orders, lost, double
transitions, invariant violations, 5xx answers) and asserts the zeros itself;
`pytest_terminal_summary` prints the table and writes `reliability-results.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chalicelib.store import Store
from local.alipay_sandbox.keys import ensure_keys
from tests.integration.conftest import (  # noqa: F401 - fixtures
    private_rabbit,
    private_vhost,
    rabbitmq_running,
    rmq_vhost,
)
from tests.reliability.harness import SCOREBOARD

RESULTS_FILE = "reliability-results.json"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The soak sizes run only when asked for (`make soak`: `-m soak`); a bare
    `pytest` runs the fast part, as `make test` (`-m "not soak"`) does."""
    if "soak" in (config.getoption("markexpr") or ""):
        return
    soak = [item for item in items if item.get_closest_marker("soak")]
    if soak:
        config.hook.pytest_deselected(items=soak)
        items[:] = [item for item in items if not item.get_closest_marker("soak")]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    if not SCOREBOARD.rows:
        return
    terminalreporter.section("reliability")
    terminalreporter.write_line(SCOREBOARD.table())
    for row in SCOREBOARD.rows:
        for note in row.notes[:5]:
            terminalreporter.write_line(f"  {row.scenario}: {note}")
    path = Path(config.rootpath) / RESULTS_FILE
    path.write_text(json.dumps(SCOREBOARD.to_json(), indent=2) + "\n")
    terminalreporter.write_line(f"written to {path}")


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return ensure_keys(tmp_path_factory.mktemp("reliability-keys"))


@pytest.fixture
def fresh_tables(tables: Store) -> Store:
    """The test tables, emptied and seeded (tests/conftest.py's `tables`)."""
    return tables
