"""`python -m local COMMAND`: the development commands (the stack, the API under
`chalice local`, a token, the benches), and the product's worker and operator
commands (chalicelib.worker, chalicelib.cli) run with the local stage's settings."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m local")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="the whole local stack (make run)")
    api = sub.add_parser("api", help="chalice local --stage local --no-autoreload")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=int(os.environ.get("API_PORT", "8000")))
    token = sub.add_parser("token", help="print a token for the local stage")
    token.add_argument("username")
    token.add_argument("--ttl", type=int, default=12 * 3600)
    token.add_argument("--operator", action="store_true",
                       help="with the operator role (the /admin API and page)")
    ddb = sub.add_parser("dynamodb", help="moto's DynamoDB server, requests one at a time")
    ddb.add_argument("--host", default="127.0.0.1")
    ddb.add_argument("--port", type=int, default=int(os.environ.get("DYNAMODB_PORT", "8002")))
    ddb.add_argument("--fault-rate", default=os.environ.get("DYNAMODB_FAULT_RATE"),
                     help="fraction of calls that get a fault (default: $DYNAMODB_FAULT_RATE, "
                          "else 0)")
    ddb.add_argument("--faults", default=os.environ.get("DYNAMODB_FAULTS"),
                     help="throttle,internal,conflict,slow (default: $DYNAMODB_FAULTS, else all)")
    ddb.add_argument("--slow-ms", default=os.environ.get("DYNAMODB_SLOW_MS"),
                     help="delay of a slow call (default: $DYNAMODB_SLOW_MS, else 800)")
    sub.add_parser("bridge", help="consume the check and pay queues into the handlers")
    sub.add_parser("sweep", help="check UNPAID orders past their check time, once")
    seed_cmd = sub.add_parser("seed", help="create the tables and seed the catalogue "
                                           "(local stages only)")
    seed_cmd.add_argument("--force-stage", metavar="STAGE", default=None,
                          help="seed this stage though it is not local (it must be STAGE's "
                               "value): its catalogue's and demo sale's stock are reset")
    parked = sub.add_parser("parked", help="list or replay parked messages")
    parked.add_argument("action", choices=["list", "replay"])
    parked.add_argument("queue", help="queue.order.check, queue.order.pay or queue.order.seckill "
                                      "(the .parked suffix is optional)")
    events = sub.add_parser("events", help="order events as they pass (events tail)")
    events.add_argument("action", choices=["tail"])
    events.add_argument("--key", action="append", default=None,
                        help="a binding key (order.paid, order.#; repeatable)")
    events.add_argument("--json", action="store_true", help="each event's JSON, a line each")
    rec = sub.add_parser("reconcile", help="reconcile a day against the sandbox's bill")
    rec.add_argument("--date", help="yyyy-MM-dd (Asia/Shanghai); none: the scheduled round")
    bench = sub.add_parser("bench", help="benchmarks beside their ceilings (bench seckill: "
                                         "the flash sale's)")
    bench.add_argument("args", nargs=argparse.REMAINDER)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its options are its own (REMAINDER stops at a leading "--x")
        if argv[1:2] == ["seckill"]:
            from local import bench_seckill

            return bench_seckill.main(argv[2:])
        from local import bench as bench_module

        return bench_module.main(argv[1:])
    args = parser.parse_args(argv)

    if args.command == "run":  # the stack speaks to a person; its children log JSON lines
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s %(message)s")
    else:
        from chalicelib.logs import configure

        configure(logging.INFO, force=True)
    if args.command == "run":
        from local import stack

        return stack.run()
    if args.command == "dynamodb":
        from local.dynamodb import FaultSettings, serve

        serve(args.host, args.port, FaultSettings.parse(
            args.fault_rate, args.faults, args.slow_ms, os.environ.get("DYNAMODB_FAULT_SEED")))
        return 0

    if os.environ.get("STAGE", "local") == "local":
        # Beside `make run`: the local stage's settings, the environment winning.
        # Any other stage (the bridge's container in production) takes only its environment.
        from local.stack import apply_local_environment

        apply_local_environment()
    if args.command == "api":
        from local.api import serve

        serve(args.host, args.port)
        return 0
    if args.command == "token":
        from chalicelib import auth, config

        print(auth.issue(config.get().jwt_secret, args.username, args.ttl,
                         role=auth.OPERATOR if args.operator else None))
        return 0
    if args.command == "bridge":
        from chalicelib.worker.__main__ import main as worker_main

        return worker_main()
    if args.command == "sweep":
        from chalicelib import cli

        return cli.main(["sweep"])
    if args.command == "seed":
        from local.stack import SeedRefused, seed

        try:
            print(json.dumps({"goodsAdded": seed(force=True, force_stage=args.force_stage)}))
        except SeedRefused as exc:
            print(exc, file=sys.stderr)
            return 2
        return 0
    if args.command == "parked":
        from chalicelib import cli

        return cli.main(["parked", args.action, args.queue])
    if args.command == "events":
        from chalicelib import cli

        keys = [a for k in args.key or [] for a in ("--key", k)]
        return cli.main(["events", args.action, *keys, *(["--json"] if args.json else [])])
    if args.command == "reconcile":
        from chalicelib import cli

        return cli.main(["reconcile", *(["--date", args.date] if args.date else [])])
    return 2


if __name__ == "__main__":
    sys.exit(main())
