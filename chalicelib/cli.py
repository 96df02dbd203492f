"""`python -m chalicelib.cli`: the operator's commands, beside a deployed stack.

    sweep                      check UNPAID orders past their check time, once
    parked list QUEUE          show the parked messages of a queue (nothing consumed)
    parked replay QUEUE        move them back to their queue, attempts reset
    broker-users               print the rabbitmqctl commands that make the API's user
                               (RMQ_URL) and the worker's (RMQ_WORKER_URL) with their
                               permissions; --definitions: the same as RabbitMQ
                               definitions (JSON, for Amazon MQ's import); --apply: run
                               them with rabbitmqctl (a node of one's own: Amazon MQ has
                               no rabbitmqctl; import the definitions in its web console
                               or through its management API instead)
    declare                    declare the queues and exchanges as the worker's user
                               (the worker does it when it starts)
    events tail [--key K] [--json]
                               print order events as they pass on exchange.order.events
                               (a line each, or the events' JSON), until Ctrl-C
    reconcile --date DAY       reconcile DAY (yyyy-MM-dd, Asia/Shanghai) against Alipay's
                               bill now, and print its report; without --date, the
                               reconciler's round (asked-for days, then due days)

Settings come from the environment (chalicelib/config.py), as for the worker.
Each command prints JSON lines on stdout, but broker-users, which prints shell
lines that hold the users' passwords, and events tail, which prints a line a
person reads (or JSON lines with --json).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from chalicelib.config import Settings


# Amazon MQ for RabbitMQ has no rabbitmqctl: what to do there instead.
AMAZON_MQ_HINT = ("On Amazon MQ (no rabbitmqctl there): run broker-users --definitions and "
                  "import the JSON in the broker's RabbitMQ web console (Overview, Import "
                  "definitions) or POST it to its management API's /api/definitions.")


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    parser = argparse.ArgumentParser(prog="python -m chalicelib.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("sweep", help="check UNPAID orders past their check time, once")
    parked = sub.add_parser("parked", help="list or replay parked messages")
    parked.add_argument("action", choices=["list", "replay"])
    parked.add_argument("queue", help="queue.order.check, queue.order.pay or queue.order.seckill "
                                      "(the .parked suffix is optional)")
    users = sub.add_parser("broker-users", help="the API's and the worker's RabbitMQ users")
    how = users.add_mutually_exclusive_group()
    how.add_argument("--apply", action="store_true",
                     help="run the commands with rabbitmqctl (not on Amazon MQ, which has "
                          "none: use --definitions and import them there)")
    how.add_argument("--definitions", action="store_true",
                     help="print RabbitMQ definitions (JSON) instead of commands")
    sub.add_parser("declare", help="declare the topology as the worker's user")
    events = sub.add_parser("events", help="order events as they pass")
    events.add_argument("action", choices=["tail"])
    events.add_argument("--key", action="append", default=None,
                        help="a binding key (order.paid, order.#; repeatable); default order.#")
    events.add_argument("--json", action="store_true", help="each event's JSON, a line each")
    rec = sub.add_parser("reconcile", help="reconcile a day against Alipay's bill")
    rec.add_argument("--date", help="yyyy-MM-dd (Asia/Shanghai); none: the scheduled round")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    from chalicelib import config, logs

    settings = config.get()
    logs.configure(settings.log_level, force=True)
    if args.command == "sweep":
        from chalicelib import deps, handlers

        out.write(json.dumps(handlers.sweep(deps.get())) + "\n")
        return 0
    if args.command == "reconcile":
        return _reconcile(args.date, out)
    from chalicelib import broker

    if args.command == "broker-users":
        return _broker_users(settings, args.apply, args.definitions, out)
    if args.command == "events":
        return _tail(settings.worker_rmq_url, args.key, args.json, out)
    if args.command == "declare":
        try:
            broker.declare_at(settings.worker_rmq_url, settings.check_delay_seconds,
                              settings.rmq_queue_type,
                              retry_delays_ms=settings.bridge_retry_delays_ms)
        except broker.BrokerUnavailable as exc:
            sys.stderr.write(f"{exc}\n")
            return 1
        out.write(json.dumps({"declared": broker.safe_url(settings.worker_rmq_url)}) + "\n")
        return 0
    # Reading parked queues and moving messages back is the worker's user's right.
    name = args.queue.removesuffix(".parked")
    url = settings.worker_rmq_url
    if args.action == "list":
        for msg in broker.list_parked(url, name):
            out.write(json.dumps(msg, default=str, ensure_ascii=False) + "\n")
    else:
        out.write(json.dumps({"replayed": broker.replay_parked(url, name)}) + "\n")
    return 0


def event_line(event: dict[str, object]) -> str:
    """An event as a person scans a terminal: time, type, order, then what changed."""
    data = event.get("data") if isinstance(event.get("data"), dict) else {}
    assert isinstance(data, dict)
    said = [f"{k}={data[k]}" for k in ("username", "totalMoney", "refundedMoney",
                                        "transactionId", "refundId", "amount")
            if data.get(k) not in (None, "")]
    return " ".join([str(event.get("occurredAt")), f"{event.get('type')!s:<23}",
                     str(event.get("orderId")), *said, str(event.get("eventId"))])


def _tail(url: str, keys: list[str] | None, raw: bool, out: TextIO) -> int:
    import signal
    import threading

    from chalicelib import broker
    from chalicelib.broker.tail import tail_events

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def show(event: dict[str, object]) -> None:
        out.write((json.dumps(event, ensure_ascii=False) if raw else event_line(event)) + "\n")
        out.flush()

    try:
        tail_events(url, show, stop=stop, keys=keys or ["order.#"])
    except broker.BrokerUnavailable as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    return 0


def _reconcile(day_text: str | None, out: TextIO) -> int:
    """The report as JSON (exit 0 when BALANCED, 1 otherwise: a script can tell)."""
    from chalicelib import deps, reconcile
    from chalicelib.domain import ShopError
    from chalicelib.domain.reconciliation import ReportStatus, parse_day

    d = deps.get()
    try:
        if day_text is None:
            out.write(json.dumps(reconcile.run_scheduled(d), ensure_ascii=False) + "\n")
            return 0
        report = reconcile.run_day(d, parse_day(day_text), requested_by="cli")
    except ShopError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    out.write(json.dumps(report.to_wire(), ensure_ascii=False, indent=2) + "\n")
    return 0 if report.status == ReportStatus.BALANCED else 1


def _broker_users(settings: Settings, apply: bool, definitions: bool, out: TextIO) -> int:
    from chalicelib.broker import users

    if not settings.rmq_worker_url:
        sys.stderr.write("set RMQ_WORKER_URL to the worker's URL (its user and password) and "
                         "RMQ_URL to the API's\n")
        return 2
    try:
        made = users.service_users(settings.rmq_url, settings.rmq_worker_url)
    except ValueError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    if definitions:
        out.write(json.dumps(users.definitions(made), indent=2) + "\n")
    elif apply:
        try:
            users.apply(made)
        except (OSError, RuntimeError) as exc:
            sys.stderr.write(f"{exc}\n")
            if isinstance(exc, OSError):  # rabbitmqctl not found, or not runnable
                sys.stderr.write(AMAZON_MQ_HINT + "\n")
            return 1
        for user in made:
            made_one = {"user": user.name, "role": user.role, "vhost": user.vhost}
            out.write(json.dumps(made_one) + "\n")
    else:
        for line in users.rabbitmqctl_commands(made):
            out.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
