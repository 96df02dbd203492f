"""`python -m chalicelib.cli`: the operator's commands, beside a deployed stack.

    sweep                      check UNPAID orders past their check time, once
    parked list QUEUE          show the parked messages of a queue (nothing consumed)
    parked replay QUEUE        move them back to their queue, attempts reset

Settings come from the environment (chalicelib/config.py), as for the worker.
Each command prints JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    parser = argparse.ArgumentParser(prog="python -m chalicelib.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("sweep", help="check UNPAID orders past their check time, once")
    parked = sub.add_parser("parked", help="list or replay parked messages")
    parked.add_argument("action", choices=["list", "replay"])
    parked.add_argument("queue", help="queue.order.check, queue.order.pay or queue.order.seckill "
                                      "(the .parked suffix is optional)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    from chalicelib import config, logs

    settings = config.get()
    logs.configure(settings.log_level, force=True)
    if args.command == "sweep":
        from chalicelib import deps, handlers

        out.write(json.dumps(handlers.sweep(deps.get())) + "\n")
        return 0
    from chalicelib import broker

    name = args.queue.removesuffix(".parked")
    if args.action == "list":
        for msg in broker.list_parked(settings.rmq_url, name):
            out.write(json.dumps(msg, default=str, ensure_ascii=False) + "\n")
    else:
        out.write(json.dumps({"replayed": broker.replay_parked(settings.rmq_url, name)}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
