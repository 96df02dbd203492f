"""Fixed identities and protocol constants of the local Alipay sandbox."""

from __future__ import annotations

from pathlib import Path

LOCAL_APP_ID = "9021000000000001"
"""The merchant app id the sandbox accepts (Alipay app ids are 16 digits)."""

LOCAL_SELLER_ID = "2088000000000001"
"""The seller (partner) id the sandbox puts into notifies and returns."""

LOCAL_BUYER_ID = "2088000000009999"
"""The one buyer who pays every sandbox trade."""

DEFAULT_PORT = 8001
DEFAULT_KEYS_DIR = Path(__file__).resolve().parent.parent / ".keys"

# Alipay's async-notify retry schedule after the first attempt, in seconds:
# 4m, 10m, 10m, 1h, 2h, 6h, 15h (about 25 hours in all).
ALIPAY_NOTIFY_SCHEDULE: tuple[float, ...] = (240, 600, 600, 3600, 7200, 21600, 54000)

# The sandbox's default: the same schedule with a minute compressed to a second.
DEFAULT_NOTIFY_SCHEDULE: tuple[float, ...] = tuple(s / 60 for s in ALIPAY_NOTIFY_SCHEDULE)

PAGE_PAY_METHOD = "alipay.trade.page.pay"
API_METHODS = (
    "alipay.trade.query",
    "alipay.trade.close",
    "alipay.trade.refund",
    "alipay.trade.fastpay.refund.query",
    "alipay.data.dataservice.bill.downloadurl.query",
)
