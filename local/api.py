"""`chalice local --stage local --no-autoreload`, with two differences:

- a value set in the environment wins over the stage's value in
  .chalice/config.json (plain `chalice local` copies the stage's values over the
  environment);
- the gateway's own errors (a request with no Authorization header never reaches
  the authorizer) answer what the deployed API Gateway answers: the bodies of the
  GatewayResponse resources in .chalice/resources.json, the contract's
  {"Code","Message"} shape, instead of chalice local's {"message":"Unauthorized"}.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from chalice.cli import create_local_server
from chalice.cli.factory import CLIFactory
from chalice.local import (
    ChaliceRequestHandler,
    LocalDevServer,
    LocalGatewayException,
    ThreadedHTTPServer,
)

PROJECT_DIR = Path(__file__).resolve().parent.parent
_ORDER_IN_PATH = re.compile(r"ORDER_[0-9]{13}_[0-9a-f]{16}")
access_log = logging.getLogger("local.api.access")


def gateway_responses() -> dict[int, bytes]:
    """Status -> body of the GatewayResponse resources the deploy template adds."""
    template = json.loads((PROJECT_DIR / ".chalice" / "resources.json").read_text("utf-8"))
    return {
        int(r["Properties"]["StatusCode"]):
            r["Properties"]["ResponseTemplates"]["application/json"].encode()
        for r in template["Resources"].values()
        if r.get("Type") == "AWS::ApiGateway::GatewayResponse"
    }


class LocalHandler(ChaliceRequestHandler):
    """chalice local's request handler, logging through `logging` (JSON lines, with the
    orderId of the path) and answering the gateway's own errors as deployed."""

    gateway_bodies = gateway_responses()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base's name
        found = _ORDER_IN_PATH.search(getattr(self, "path", "") or "")
        access_log.info(format, *args, extra={"orderId": found.group(0)} if found else None)

    def _send_error_response(self, error: LocalGatewayException) -> None:
        if error.CODE in self.gateway_bodies:
            error.body = self.gateway_bodies[error.CODE]
        super()._send_error_response(error)


class BurstServer(ThreadedHTTPServer):
    """chalice's threaded local server with a listen backlog for bursts: with the
    default of 5, the kernel resets the connections past the sixth that arrive at
    once, before the app sees them (Alipay's duplicate notifies and a flash sale both
    arrive at once)."""

    request_queue_size = 256


def local_server(app_obj: Any, config: Any, host: str, port: int) -> LocalDevServer:
    """The API as `make run` serves it: the burst-proof server, the local handler."""
    return LocalDevServer(app_obj, config, host, port, handler_cls=LocalHandler,
                          server_cls=BurstServer)


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

    def create_local_server(self, app_obj: Any, config: Any, host: str, port: int,
                            ) -> LocalDevServer:
        return local_server(app_obj, config, host, port)


def serve(host: str, port: int, stage: str = "local") -> None:
    os.chdir(PROJECT_DIR)
    factory = _EnvironmentWins(str(PROJECT_DIR), environ=os.environ)
    create_local_server(factory, host, port, stage).serve_forever()
