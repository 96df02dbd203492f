"""``python -m local.alipay_sandbox [--host 127.0.0.1] [--port 8001] [--keys local/.keys]
[--refund-notify 1|0] [--refund-rule alipay|sandbox] [--bills-today 1|0] [--fault-rate R]
[--faults slow,5xx,unsigned,badsign] [--slow-seconds S] [--notify-delay S]``
(the faults: see ``local.alipay_sandbox.faults``)

Prints one start line (gateway URL, app id, seller id, keys dir) on stdout, logs
JSON lines on stderr, and stops cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from . import faults as gateway_faults
from . import logs
from .billing import BILLS_TODAY_ENV
from .constants import DEFAULT_KEYS_DIR, DEFAULT_PORT, LOCAL_APP_ID, LOCAL_SELLER_ID
from .server import (
    NOTIFY_SCHEDULE_ENV,
    REFUND_NOTIFY_ENV,
    REFUND_RULE_ENV,
    make_server,
    parse_flag,
    parse_refund_rule,
    parse_schedule,
)
from .trades import REFUND_RULES

logger = logging.getLogger("local.alipay_sandbox")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m local.alipay_sandbox", description="The local Alipay sandbox."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("SANDBOX_PORT") or DEFAULT_PORT),
        help="default: $SANDBOX_PORT, else %(default)s",
    )
    parser.add_argument(
        "--keys",
        type=Path,
        default=DEFAULT_KEYS_DIR,
        help="directory of the four PEM files (made when missing)",
    )
    parser.add_argument("--app-id", default=LOCAL_APP_ID)
    parser.add_argument("--seller-id", default=LOCAL_SELLER_ID)
    parser.add_argument(
        "--refund-notify",
        choices=("1", "0"),
        default=None,
        help=f"notify refunds to the trade's notify_url (default: ${REFUND_NOTIFY_ENV}, else 1)",
    )
    parser.add_argument(
        "--refund-rule",
        choices=REFUND_RULES,
        default=None,
        help=f"sandbox: one full refund per trade (default: ${REFUND_RULE_ENV}, else alipay)",
    )
    parser.add_argument(
        "--bills-today",
        choices=("1", "0"),
        default=None,
        help=f"1: today's bill may be fetched too (default: ${BILLS_TODAY_ENV}, else 0: "
        "past days only, as Alipay)",
    )
    parser.add_argument(
        "--fault-rate", default=os.environ.get(gateway_faults.RATE_ENV),
        help=f"fraction of API calls that get a fault (default: ${gateway_faults.RATE_ENV}, "
        "else 0)",
    )
    parser.add_argument(
        "--faults", default=os.environ.get(gateway_faults.KINDS_ENV),
        help=f"{','.join(gateway_faults.FAULT_KINDS)} (default: ${gateway_faults.KINDS_ENV}, "
        "else all)",
    )
    parser.add_argument(
        "--slow-seconds", default=os.environ.get(gateway_faults.SLOW_ENV),
        help=f"delay of a slow answer (default: ${gateway_faults.SLOW_ENV}, else 5)",
    )
    parser.add_argument(
        "--notify-delay", default=os.environ.get(gateway_faults.NOTIFY_DELAY_ENV),
        help=f"delay of each notify's first attempt (default: ${gateway_faults.NOTIFY_DELAY_ENV}, "
        "else 0)",
    )
    parser.add_argument("--log-level", default=os.environ.get("SANDBOX_LOG_LEVEL", "INFO"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logs.configure(getattr(logging, str(args.log_level).upper(), logging.INFO))
    schedule_env = os.environ.get(NOTIFY_SCHEDULE_ENV)
    try:
        schedule = parse_schedule(schedule_env) if schedule_env else None
        server = make_server(
            args.host,
            args.port,
            args.keys,
            schedule,
            app_id=args.app_id,
            seller_id=args.seller_id,
            refund_notify=parse_flag(args.refund_notify) if args.refund_notify else None,
            refund_rule=parse_refund_rule(args.refund_rule) if args.refund_rule else None,
            bills_today=(parse_flag(args.bills_today, BILLS_TODAY_ENV) if args.bills_today
                         else None),
            faults=gateway_faults.GatewayFaults.parse(
                args.fault_rate, args.faults, args.slow_seconds, args.notify_delay,
                os.environ.get(gateway_faults.SEED_ENV),
            ),
        )
    except (OSError, ValueError) as exc:
        logger.error("sandbox cannot start: %s", exc)
        return 1

    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("stopping on %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    serving = threading.Thread(target=server.serve_forever, name="sandbox-http", daemon=True)
    serving.start()
    sys.stdout.write(
        f"alipay sandbox: {server.gateway_url} app_id={server.app_id} "
        f"seller_id={server.seller_id} keys={server.keys_dir.resolve()} "
        f"notify_schedule={','.join(f'{d:g}' for d in server.notifier.schedule)} "
        f"refund_notify={int(server.refund_notify)} refund_rule={server.refund_rule} "
        f"bills_today={int(server.bills.serve_today)} "
        f"faults={server.faults.report()}\n"
    )
    sys.stdout.flush()
    while not stop.wait(1.0):
        if not serving.is_alive():  # pragma: no cover - serve_forever died
            logger.error("HTTP server thread stopped unexpectedly")
            break
    server.shutdown()
    server.server_close()
    logger.info("sandbox stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
