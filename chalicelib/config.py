"""Settings from the environment, read once, lazily.

`chalice local` and Lambda both copy the stage's `environment_variables` from
`.chalice/config.json` into the environment; a value already set in the
environment wins (see local/stack.py). Nothing here opens a connection.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

LOCAL_JWT_SECRET = "local-dev-secret-0123456789abcdef"


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number, got {raw!r}") from exc
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {raw!r}")
    return value


def _secret(name: str, file_name: str) -> str:
    """A secret as text: `NAME` holds it, or `NAME_FILE` names a file that does."""
    value = os.environ.get(name, "")
    if value:
        return value
    path = os.environ.get(file_name, "")
    if path:
        return Path(path).read_text()
    return ""


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
    jwt_secret: str
    alipay_app_id: str
    alipay_seller_id: str
    alipay_gateway: str
    alipay_notify_url: str
    alipay_return_url: str
    bridge_prefetch: int
    bridge_max_attempts: int
    # flash sales (chalicelib/seckill.py)
    sales_table: str = "shop-local-sales"
    seckill_table: str = "shop-local-seckill"  # tickets and per-user-per-sale markers
    seckill_orders_per_second: float = 200.0  # the bridge's drain rate of queue.order.seckill
    seckill_max_queue_depth: int = 10000  # deeper: POST /seckill/{id} answers 429
    seckill_cache_ms: int = 150  # how long the API reuses a sale and a queue depth it read
    bridge_pay_per_second: float = 0.0  # 0: queue.order.pay is drained as fast as it comes
    bridge_workers: int = 2  # consumers (a connection each) on the unpaced queues

    @property
    def alipay_app_private_key(self) -> str:
        return _secret("ALIPAY_APP_PRIVATE_KEY", "ALIPAY_APP_PRIVATE_KEY_FILE")

    @property
    def alipay_public_key(self) -> str:
        return _secret("ALIPAY_PUBLIC_KEY", "ALIPAY_PUBLIC_KEY_FILE")


def load() -> Settings:
    stage = os.environ.get("STAGE", "local")
    prefix = os.environ.get("TABLE_PREFIX", f"shop-{stage}")
    jwt_secret = os.environ.get("JWT_SECRET", "")
    if not jwt_secret and stage == "local":
        jwt_secret = LOCAL_JWT_SECRET
    return Settings(
        stage=stage,
        goods_table=os.environ.get("GOODS_TABLE", f"{prefix}-goods"),
        carts_table=os.environ.get("CARTS_TABLE", f"{prefix}-carts"),
        orders_table=os.environ.get("ORDERS_TABLE", f"{prefix}-orders"),
        rmq_url=os.environ.get("RMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"),
        rmq_queue_type=os.environ.get("RMQ_QUEUE_TYPE", "classic"),
        check_delay_seconds=_int("ORDER_CHECK_DELAY_SECONDS", 2100),
        pay_timeout_seconds=_int("ORDER_PAY_TIMEOUT_SECONDS", 1800),
        jwt_secret=jwt_secret,
        alipay_app_id=os.environ.get("ALIPAY_APP_ID", ""),
        alipay_seller_id=os.environ.get("ALIPAY_SELLER_ID", ""),
        alipay_gateway=os.environ.get("ALIPAY_GATEWAY", ""),
        alipay_notify_url=os.environ.get("ALIPAY_NOTIFY_URL", ""),
        alipay_return_url=os.environ.get("ALIPAY_RETURN_URL", ""),
        # Small: a message prefetched by a busy worker waits behind it while another
        # worker may be free (at 20, stage 4 of the bench closed late by 1.2 s at p99;
        # at 5 with 2 workers, 164 ms).
        bridge_prefetch=max(1, _int("BRIDGE_PREFETCH", 5)),
        bridge_max_attempts=_int("BRIDGE_MAX_ATTEMPTS", 5),
        sales_table=os.environ.get("SALES_TABLE", f"{prefix}-sales"),
        seckill_table=os.environ.get("SECKILL_TABLE", f"{prefix}-seckill"),
        seckill_orders_per_second=_float("SECKILL_ORDERS_PER_SECOND", 200.0),
        seckill_max_queue_depth=_int("SECKILL_MAX_QUEUE_DEPTH", 10000),
        seckill_cache_ms=_int("SECKILL_CACHE_MS", 150),
        bridge_pay_per_second=_float("BRIDGE_PAY_PER_SECOND", 0.0),
        bridge_workers=max(1, _int("BRIDGE_WORKERS", 2)),
    )


@lru_cache(maxsize=1)
def get() -> Settings:
    return load()
