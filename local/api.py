"""`chalice local --stage local --no-autoreload`, with one difference: a value set in
the environment wins over the stage's value in .chalice/config.json (plain
`chalice local` copies the stage's values over the environment)."""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from chalice.cli import create_local_server
from chalice.cli.factory import CLIFactory

PROJECT_DIR = Path(__file__).resolve().parent.parent


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
    create_local_server(factory, host, port, stage).serve_forever()
