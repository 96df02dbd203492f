"""Settings: the one module that reads the environment.

`load()` builds a `Settings` from an environment mapping (the process's by
default) and everything else takes the settings it is given: the store its table
names, the broker its URL, the worker its pacing. `get()` is the process's own,
built on first use (never at import) and then reused by a warm Lambda or the
worker. `chalice local` and Lambda copy the stage's `environment_variables` from
`.chalice/config.json` into the environment; a value already set there wins
(see local/stack.py). Nothing here opens a connection.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

LOCAL_JWT_SECRET = "local-dev-secret-0123456789abcdef"
LOCAL_RMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_RETRY_DELAYS_MS = (1000, 5000, 30000)  # a failed message waits these, then parks
# 10 s, 1 min, 5 min, 30 min, 2 h, 6 h, 15 h: the last attempt about a day after the first
DEFAULT_WEBHOOK_RETRY_SECONDS = (10, 60, 300, 1800, 7200, 21600, 54000)


class _Env:
    """Typed reads of one environment mapping, each error naming the variable."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def str(self, name: str, default: str = "") -> str:
        return self._environ.get(name, default)

    def int(self, name: str, default: int) -> int:
        raw = self._environ.get(name, "").strip()
        if not raw:
            return default
        try:
            return int(raw)
        except ValueError as exc:
            raise ValueError(f"{name} must be an integer, got {raw!r}") from exc

    def float(self, name: str, default: float) -> float:
        raw = self._environ.get(name, "").strip()
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError as exc:
            raise ValueError(f"{name} must be a number, got {raw!r}") from exc
        if not value >= 0 or value == float("inf"):
            raise ValueError(f"{name} must be a finite number >= 0, got {raw!r}")
        return value

    def ints(self, name: str, default: tuple[int, ...]) -> tuple[int, ...]:
        raw = self._environ.get(name, "").strip()
        if not raw:
            return default
        try:
            return tuple(int(x) for x in raw.split(",") if x.strip())
        except ValueError as exc:
            raise ValueError(f"{name} must be integers separated by commas, got {raw!r}") from exc

    def secret(self, name: str) -> str:
        """`NAME` holds the secret, or `NAME_FILE` names a file that does."""
        value = self._environ.get(name, "")
        if value:
            return value
        path = self._environ.get(f"{name}_FILE", "")
        return Path(path).read_text() if path else ""


@dataclass(frozen=True)
class Tables:
    """DynamoDB table names; the store takes them when it is built."""

    goods: str
    carts: str
    orders: str
    sales: str
    seckill: str  # tickets and per-user-per-sale markers
    refunds: str  # refunds and operators' idempotency keys
    timeline: str  # each order's payment events
    reconciliations: str = "shop-local-reconciliations"  # daily reports against the bill
    outbox: str = "shop-local-outbox"  # order events, written with their change
    webhooks: str = "shop-local-webhooks"  # webhook subscriptions and deliveries


@dataclass(frozen=True)
class Settings:
    stage: str
    goods_table: str
    carts_table: str
    orders_table: str
    rmq_url: str
    rmq_queue_type: str
    check_delay_seconds: int
    pay_timeout_seconds: int
    jwt_secret: str = field(repr=False)
    alipay_app_id: str
    alipay_seller_id: str
    alipay_gateway: str
    alipay_notify_url: str
    alipay_return_url: str
    bridge_prefetch: int
    bridge_max_attempts: int
    # flash sales (chalicelib/seckill.py)
    sales_table: str = "shop-local-sales"
    seckill_table: str = "shop-local-seckill"
    refunds_table: str = "shop-local-refunds"
    timeline_table: str = "shop-local-timeline"
    reconciliations_table: str = "shop-local-reconciliations"
    outbox_table: str = "shop-local-outbox"
    webhooks_table: str = "shop-local-webhooks"
    # An event not published this long after its change is published by the
    # backstop sweep (the stream's relay does it within a second or two).
    outbox_sweep_after_seconds: float = 60.0
    # How often the worker relays events (the local stack: its stream stand-in) and
    # sweeps for unsent ones.
    relay_interval_seconds: float = 1.0
    # A webhook delivery's waits between attempts (about a day in all), then FAILED.
    webhook_retry_seconds: tuple[int, ...] = DEFAULT_WEBHOOK_RETRY_SECONDS
    webhook_timeout_seconds: float = 5.0  # one attempt, all of it
    webhook_workers: int = 4  # consumers of queue.order.webhook.deliver
    # S3 bucket of the provider's raw daily bills (kept unchanged). Empty: the
    # reconciliation keeps no copy and says so in its log (local tests only).
    bills_bucket: str = ""
    # Whether reconciliations run in-process: POST /admin/reconciliations/{day}
    # inside the request and the worker's rounds (the local stack, which has no
    # scheduled functions); else the reconciler function's rounds do them (AWS: a
    # big day takes longer than API Gateway waits).
    reconcile_inline: bool = True
    seckill_orders_per_second: float = 200.0  # the worker's drain rate of queue.order.seckill
    seckill_max_queue_depth: int = 10000  # deeper: POST /seckill/{id} answers 429
    seckill_cache_ms: int = 150  # how long the API reuses a sale and a queue depth it read
    bridge_pay_per_second: float = 0.0  # 0: queue.order.pay is drained as fast as it comes
    bridge_workers: int = 2  # consumers (a connection each) on the unpaced queues
    bridge_retry_delays_ms: tuple[int, ...] = DEFAULT_RETRY_DELAYS_MS
    sweep_interval_seconds: float = 60.0
    # A check message this much before its order's check time is still taken (the
    # API's and the worker's clocks may differ); earlier, it is parked as forged.
    check_skew_seconds: int = 30
    # "kill-before-ack": the worker kills itself after a handler's write, before the
    # ack (the crash-recovery tests only).
    bridge_fault: str = ""
    aws_region: str = "us-east-1"
    log_level: str = "INFO"
    alipay_app_private_key: str = field(default="", repr=False)
    alipay_public_key: str = field(default="", repr=False)
    # The worker's RabbitMQ user (RMQ_WORKER_URL or _FILE): it declares, consumes and
    # parks; the API's (rmq_url) may only publish. Empty: the worker uses rmq_url.
    rmq_worker_url: str = field(default="", repr=False)
    # The most UNPAID cart orders one user may hold; one more: 409 TooManyUnpaidOrders.
    max_unpaid_orders_per_user: int = 5
    # FUNCTION_ROLE: which of the deployed functions this process is (ROLES); each
    # is given only its own secrets, so `check` asks for exactly those. Empty: the
    # local stack (one process doing everything) or the worker's container.
    function_role: str = ""
    # SECRET_ID: the stage's secret in Secrets Manager (its name, e.g. shop-pay/prod),
    # from which a deployed function reads its own SECRET_KEYS at run time
    # (chalicelib/secrets.py). Empty: the secrets are in the environment (NAME or
    # NAME_FILE), as on the local stack and in the worker's container.
    secret_id: str = ""
    # How long a warm function keeps the secret it read before reading it again (a
    # rotation reaches it within this; RabbitMQ refusing its user, at once).
    secret_refresh_seconds: float = 300.0
    # JWT_PREVIOUS_SECRET: while JWT_SECRET is rotated, tokens signed with the
    # previous one are still accepted (never issued), until it is taken out.
    jwt_previous_secret: str = field(default="", repr=False)

    @property
    def worker_rmq_url(self) -> str:
        return self.rmq_worker_url or self.rmq_url

    @property
    def tables(self) -> Tables:
        return Tables(goods=self.goods_table, carts=self.carts_table, orders=self.orders_table,
                      sales=self.sales_table, seckill=self.seckill_table,
                      refunds=self.refunds_table, timeline=self.timeline_table,
                      reconciliations=self.reconciliations_table,
                      outbox=self.outbox_table, webhooks=self.webhooks_table)


LOCAL_STAGES = ("local", "test")  # one machine: make run, and the test suite


MIN_JWT_SECRET_BYTES = 32  # HS256: a shorter key is guessable offline from one token

# What each role needs outside the local stages (the deploy template gives each
# function exactly these, .chalice/config.json). The authorizer only verifies
# tokens; the API and the sweeper call Alipay with the app's private key; the
# notify function only checks Alipay's signature (its public key) and publishes.
_PAYMENT = ("ALIPAY_APP_ID", "ALIPAY_SELLER_ID", "ALIPAY_GATEWAY",
            "ALIPAY_APP_PRIVATE_KEY", "ALIPAY_PUBLIC_KEY")
ROLE_NEEDS: dict[str, tuple[str, ...]] = {
    "api": (*_PAYMENT, "RMQ_URL"),
    "authorizer": ("JWT_SECRET",),
    "notify": ("ALIPAY_APP_ID", "ALIPAY_SELLER_ID", "ALIPAY_PUBLIC_KEY", "RMQ_URL"),
    "sweeper": (*_PAYMENT, "RMQ_URL"),
    # Reads the bill (the app's key signs the query) and keeps it; a late payment it
    # finds is refunded through Alipay at once, so it publishes nothing.
    "reconciler": (*_PAYMENT, "BILLS_BUCKET"),
    # The outbox stream's function: publishes order events, pays and closes nothing.
    "relay": ("RMQ_URL",),
    "worker": (*_PAYMENT, "RMQ_URL"),  # RMQ_WORKER_URL stands in for RMQ_URL
    "": (*_PAYMENT, "RMQ_URL"),  # the worker's container, the CLI: as the worker
}
ROLES = tuple(r for r in ROLE_NEEDS if r)

# The settings that are secrets: on AWS a function reads them at run time from the
# stage's secret in Secrets Manager (SECRET_ID names it), never from its
# environment. Setting -> the key of the secret's JSON that holds it.
SECRET_KEYS: dict[str, str] = {
    "JWT_SECRET": "JWT_SECRET",
    "ALIPAY_APP_PRIVATE_KEY": "ALIPAY_APP_PRIVATE_KEY",
    "RMQ_URL": "RMQ_PUBLISH_URL",
}
# Keys of the secret a role takes when they are there, and goes on without: the
# previous JWT secret is only there while JWT_SECRET is being rotated.
OPTIONAL_SECRET_KEYS: dict[str, str] = {"JWT_PREVIOUS_SECRET": "JWT_PREVIOUS_SECRET"}
ROLE_MAY_TAKE: dict[str, tuple[str, ...]] = {"authorizer": ("JWT_PREVIOUS_SECRET",)}

# --- timeouts -----------------------------------------------------------------
# Each outbound call's worst case in seconds, from the timeouts the module that
# makes it sets, and from them the longest chain of calls one invocation of each
# role can make: a function's timeout must be longer, and an API route's chain must
# fit API Gateway's 29 s integration timeout (API_MAX_CHAIN_SECONDS, some left for
# DynamoDB). DynamoDB's own calls (chalicelib/store: 3 s connect, 10 s read, 3
# attempts per call) are not in these sums: they answer in milliseconds while
# DynamoDB is up, and a call that spends its timeouts fails the request with 503.

# Secrets Manager (chalicelib/secrets.py): one attempt. A failed read fails this
# invocation (or, on a refresh, keeps the secret in hand) and a later one reads again.
SECRETS_CONNECT_TIMEOUT_SECONDS = 1.0
SECRETS_READ_TIMEOUT_SECONDS = 2.0
SECRETS_READ_SECONDS = SECRETS_CONNECT_TIMEOUT_SECONDS + SECRETS_READ_TIMEOUT_SECONDS

# Alipay's server calls (chalicelib/alipay_gateway.py) are urllib GETs: the timeout
# bounds the connect, and then the wait for the answer, so a call waits up to twice it.
# Short where someone waits on the answer: an HTTP request (a cancel queries and
# closes the trade, a refund asks for it) and the sweeper (its deadline is counted in
# checks); the worker's consumers and the reconciler wait as long as Alipay needs.
ALIPAY_SHORT_TIMEOUT_SECONDS = 2.5
ALIPAY_TIMEOUT_SECONDS = 15.0
ALIPAY_SHORT_CALL_SECONDS = 2 * ALIPAY_SHORT_TIMEOUT_SECONDS
ALIPAY_SHORT_ROLES = ("api", "sweeper")

# RabbitMQ (chalicelib/broker/connection.py): a connect is bounded by pika's
# stack_timeout, a publish held by a broker's alarm by blocked_connection_timeout,
# and a nacked publish is made again after each of NACK_RETRY_PAUSES_S.
RABBITMQ_CONNECT_SECONDS = 10.0
RABBITMQ_BLOCKED_SECONDS = 5.0
RABBITMQ_NACK_PAUSES_SECONDS = 0.25 + 0.5 + 1.0
RABBITMQ_PUBLISH_SECONDS = (RABBITMQ_CONNECT_SECONDS + RABBITMQ_BLOCKED_SECONDS
                            + RABBITMQ_NACK_PAUSES_SECONDS)
RELAY_FAILED_PUBLISHES = 3  # the failures that end a relay run (chalicelib/events.py)
# A reconciler's round: the bill's URL, its download (each read waits at most the
# Alipay timeout) and the late payments it finds queried one by one: no sum bounds
# it, so it has a budget of its own, and keeps a lease (chalicelib/reconcile.py).
RECONCILER_ROUND_SECONDS = 600.0


def alipay_timeout_seconds(role: str) -> float:
    """The socket timeout of the role's Alipay calls (see ALIPAY_SHORT_ROLES)."""
    return ALIPAY_SHORT_TIMEOUT_SECONDS if role in ALIPAY_SHORT_ROLES else ALIPAY_TIMEOUT_SECONDS


def alipay_call_seconds(role: str) -> float:
    """One Alipay server call of the role at its worst: the connect, then the answer."""
    return 2 * alipay_timeout_seconds(role)


def sweep_check_seconds(role: str) -> float:
    """One check of the sweep at its worst: a query and a close, or a query and the
    refund of a late payment whose unknown outcome is then queued."""
    return 2 * alipay_call_seconds(role) + RABBITMQ_PUBLISH_SECONDS


# The API's routes that call more than DynamoDB, each with its chain.
_REFUND = ALIPAY_SHORT_CALL_SECONDS + RABBITMQ_PUBLISH_SECONDS  # an unknown outcome is queued
API_ROUTE_CHAIN_SECONDS: dict[str, float] = {
    "POST /orders/{id}/cancel": 2 * ALIPAY_SHORT_CALL_SECONDS,  # query, then close
    "POST /admin/orders/{id}/refunds": _REFUND,
    "POST /admin/refunds/{id}/retry": _REFUND,
    "POST /orders": RABBITMQ_PUBLISH_SECONDS,  # the order's delay message
    "POST /seckill/{id}": RABBITMQ_PUBLISH_SECONDS,  # the queue's depth, then the ticket
}
API_GATEWAY_TIMEOUT_SECONDS = 29.0
API_MAX_CHAIN_SECONDS = 25.0

# Kept free at the end of a sweeper's run: the attention metrics after the sweep
# (their parked counts may connect to RabbitMQ) and the DynamoDB reads between checks.
SWEEP_READS_SECONDS = 2.0
SWEEP_MARGIN_SECONDS = RABBITMQ_CONNECT_SECONDS + SWEEP_READS_SECONDS

# The longest chain of outbound calls one invocation of each role can make, in
# seconds (timeouts added up, retries included); the secret's read counts for
# each function that reads one (a cold start, or a refresh).
OUTBOUND_CHAIN_SECONDS: dict[str, float] = {
    "api": SECRETS_READ_SECONDS + max(API_ROUTE_CHAIN_SECONDS.values()),
    "authorizer": SECRETS_READ_SECONDS,  # verifying a token is one HMAC
    "notify": SECRETS_READ_SECONDS + RABBITMQ_PUBLISH_SECONDS,  # Alipay's signature: no call
    # It starts no check with less than one check's worst case and the margin left.
    "sweeper": SECRETS_READ_SECONDS + sweep_check_seconds("sweeper") + SWEEP_MARGIN_SECONDS,
    "reconciler": SECRETS_READ_SECONDS + RECONCILER_ROUND_SECONDS,
    "relay": SECRETS_READ_SECONDS + RELAY_FAILED_PUBLISHES * RABBITMQ_PUBLISH_SECONDS,
}


class SettingsError(ValueError):
    """The settings cannot run this stage; the message says what is missing."""


def check(settings: Settings) -> Settings:
    """Refuses settings that would lose money or leak: outside the local stages, a
    service without payment settings would take orders it can never close safely
    (an order is closed only after Alipay said it was not paid), and everywhere a
    JWT secret short enough to guess, or the local stack's well-known one."""
    if settings.function_role not in ROLE_NEEDS:
        raise SettingsError(f"FUNCTION_ROLE {settings.function_role!r} is none of "
                            f"{', '.join(ROLES)}")
    secret = settings.jwt_secret
    jwt_secrets = {"JWT_SECRET": secret, "JWT_PREVIOUS_SECRET": settings.jwt_previous_secret}
    for name, value in jwt_secrets.items():
        if value and len(value.encode()) < MIN_JWT_SECRET_BYTES:
            raise SettingsError(f"{name} is {len(value.encode())} bytes; at least "
                                f"{MIN_JWT_SECRET_BYTES} are needed")
    if settings.stage in LOCAL_STAGES:
        return settings
    for name, value in jwt_secrets.items():
        if value == LOCAL_JWT_SECRET:
            raise SettingsError(f"{name} is the local stack's well-known secret; stage "
                                f"{settings.stage!r} needs its own")
    values = {
        "ALIPAY_APP_ID": settings.alipay_app_id,
        "ALIPAY_SELLER_ID": settings.alipay_seller_id,
        "ALIPAY_GATEWAY": settings.alipay_gateway,
        "ALIPAY_APP_PRIVATE_KEY": settings.alipay_app_private_key,
        "ALIPAY_PUBLIC_KEY": settings.alipay_public_key,
        "RMQ_URL": (settings.rmq_url if settings.function_role not in ("worker", "")
                    else settings.worker_rmq_url),
        "JWT_SECRET": secret,
        "BILLS_BUCKET": settings.bills_bucket,
    }
    missing = [n for n in ROLE_NEEDS[settings.function_role] if not values[n]]
    if missing:
        role = settings.function_role or "no FUNCTION_ROLE: the worker's settings"
        raise SettingsError(f"stage {settings.stage!r} ({role}) needs: "
                            f"{', '.join(missing)} (or their _FILE forms) not set")
    return settings


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from `environ` (the process's environment when None)."""
    env = _Env(os.environ if environ is None else environ)
    stage = env.str("STAGE")
    if not stage:
        # The local stack is the default only off AWS: a function or task that lost
        # its STAGE would otherwise run with the local tables and the local secret.
        if env.str("AWS_LAMBDA_FUNCTION_NAME") or env.str("AWS_EXECUTION_ENV"):
            raise SettingsError("STAGE is not set; outside the local stack it is required")
        stage = "local"
    prefix = env.str("TABLE_PREFIX", f"shop-{stage}")
    jwt_secret = env.str("JWT_SECRET")
    if not jwt_secret and stage == "local":
        jwt_secret = LOCAL_JWT_SECRET
    return Settings(
        stage=stage,
        goods_table=env.str("GOODS_TABLE", f"{prefix}-goods"),
        carts_table=env.str("CARTS_TABLE", f"{prefix}-carts"),
        orders_table=env.str("ORDERS_TABLE", f"{prefix}-orders"),
        # The guest user only on the local stack's own broker: a deployed function
        # without RMQ_URL is refused by `check` (its role needs one) or publishes nowhere.
        rmq_url=env.str("RMQ_URL", LOCAL_RMQ_URL if stage in LOCAL_STAGES else ""),
        rmq_queue_type=env.str("RMQ_QUEUE_TYPE", "classic"),
        check_delay_seconds=env.int("ORDER_CHECK_DELAY_SECONDS", 2100),
        pay_timeout_seconds=env.int("ORDER_PAY_TIMEOUT_SECONDS", 1800),
        jwt_secret=jwt_secret,
        alipay_app_id=env.str("ALIPAY_APP_ID"),
        alipay_seller_id=env.str("ALIPAY_SELLER_ID"),
        alipay_gateway=env.str("ALIPAY_GATEWAY"),
        alipay_notify_url=env.str("ALIPAY_NOTIFY_URL"),
        alipay_return_url=env.str("ALIPAY_RETURN_URL"),
        # Small: a message prefetched by a busy worker waits behind it while another
        # worker may be free (see the README's Performance section).
        bridge_prefetch=max(1, env.int("BRIDGE_PREFETCH", 5)),
        bridge_max_attempts=env.int("BRIDGE_MAX_ATTEMPTS", 5),
        sales_table=env.str("SALES_TABLE", f"{prefix}-sales"),
        seckill_table=env.str("SECKILL_TABLE", f"{prefix}-seckill"),
        refunds_table=env.str("REFUNDS_TABLE", f"{prefix}-refunds"),
        timeline_table=env.str("TIMELINE_TABLE", f"{prefix}-timeline"),
        reconciliations_table=env.str("RECONCILIATIONS_TABLE", f"{prefix}-reconciliations"),
        outbox_table=env.str("OUTBOX_TABLE", f"{prefix}-outbox"),
        webhooks_table=env.str("WEBHOOKS_TABLE", f"{prefix}-webhooks"),
        # The local stack has no stream function: its worker's sweep is the relay.
        outbox_sweep_after_seconds=max(0.0, env.float(
            "OUTBOX_SWEEP_AFTER_SECONDS", 0.0 if stage in LOCAL_STAGES else 60.0)),
        relay_interval_seconds=max(0.05, env.float("RELAY_INTERVAL_SECONDS", 1.0)),
        webhook_retry_seconds=env.ints("WEBHOOK_RETRY_SECONDS", DEFAULT_WEBHOOK_RETRY_SECONDS),
        webhook_timeout_seconds=max(0.1, env.float("WEBHOOK_TIMEOUT_SECONDS", 5.0)),
        webhook_workers=max(1, env.int("WEBHOOK_WORKERS", 4)),
        bills_bucket=env.str("BILLS_BUCKET"),
        reconcile_inline=env.str("RECONCILE_INLINE", "1" if stage in LOCAL_STAGES else "0")
        not in ("0", "false", "no", ""),
        seckill_orders_per_second=env.float("SECKILL_ORDERS_PER_SECOND", 200.0),
        seckill_max_queue_depth=env.int("SECKILL_MAX_QUEUE_DEPTH", 10000),
        seckill_cache_ms=env.int("SECKILL_CACHE_MS", 150),
        bridge_pay_per_second=env.float("BRIDGE_PAY_PER_SECOND", 0.0),
        bridge_workers=max(1, env.int("BRIDGE_WORKERS", 2)),
        bridge_retry_delays_ms=env.ints("BRIDGE_RETRY_DELAYS_MS", DEFAULT_RETRY_DELAYS_MS),
        sweep_interval_seconds=env.float("SWEEP_INTERVAL_SECONDS", 60.0),
        check_skew_seconds=max(0, env.int("CHECK_CLOCK_SKEW_SECONDS", 30)),
        bridge_fault=env.str("BRIDGE_FAULT"),
        aws_region=env.str("AWS_DEFAULT_REGION") or env.str("AWS_REGION") or "us-east-1",
        log_level=env.str("LOG_LEVEL", "INFO"),
        alipay_app_private_key=env.secret("ALIPAY_APP_PRIVATE_KEY"),
        alipay_public_key=env.secret("ALIPAY_PUBLIC_KEY"),
        rmq_worker_url=env.secret("RMQ_WORKER_URL").strip(),
        max_unpaid_orders_per_user=max(1, env.int("MAX_UNPAID_ORDERS_PER_USER", 5)),
        function_role=env.str("FUNCTION_ROLE"),
        secret_id=env.str("SECRET_ID").strip(),
        secret_refresh_seconds=env.float("SECRET_REFRESH_SECONDS", 300.0),
        jwt_previous_secret=env.str("JWT_PREVIOUS_SECRET"),
    )


def on_lambda(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process runs in AWS Lambda (whose runtime owns the log handler)."""
    return bool((os.environ if environ is None else environ).get("AWS_LAMBDA_FUNCTION_NAME"))


@lru_cache(maxsize=1)
def get() -> Settings:
    """The process's settings, read once on first use."""
    return load()
