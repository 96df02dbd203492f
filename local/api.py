"""`chalice local --stage local --no-autoreload`, with one difference: a value set in
the environment wins over the stage's value in .chalice/config.json (plain
`chalice local` copies the stage's values over the environment)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from chalice.cli import create_local_server
from chalice.cli.factory import CLIFactory
from chalice.local import ChaliceRequestHandler

PROJECT_DIR = Path(__file__).resolve().parent.parent
_ORDER_IN_PATH = re.compile(r"ORDER_[0-9]{13}_[0-9a-f]{16}")
access_log = logging.getLogger("local.api.access")


def _log_request(self: ChaliceRequestHandler, fmt: str, *args: Any) -> None:
    """chalice local's access line through logging (JSON lines), with the orderId in it."""
    found = _ORDER_IN_PATH.search(getattr(self, "path", "") or "")
    access_log.info(fmt, *args, extra={"orderId": found.group(0)} if found else None)


class _EnvironmentWins(CLIFactory):
    def load_chalice_app(
        self,
        environment_variables: MutableMapping[str, Any] | None = None,
        validate_feature_flags: bool | None = True,
    ) -> Any:
        if environment_variables is not None:
            environment_variables = {
                k: v for k, v in environment_variables.items() if k not in os.environ
            }
        return super().load_chalice_app(environment_variables, validate_feature_flags)


def serve(host: str, port: int, stage: str = "local") -> None:
    os.chdir(PROJECT_DIR)
    factory = _EnvironmentWins(str(PROJECT_DIR), environ=os.environ)
    ChaliceRequestHandler.log_message = _log_request  # type: ignore[method-assign]
    create_local_server(factory, host, port, stage).serve_forever()
