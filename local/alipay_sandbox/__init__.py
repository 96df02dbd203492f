"""A local Alipay: the page-pay cashier, the async notify and the trade APIs,
speaking Alipay's protocol with real RSA2 signatures (see CONTRACT.md).

Start it with ``python -m local.alipay_sandbox``; in tests use ``make_server``.
"""

from .constants import DEFAULT_KEYS_DIR, DEFAULT_PORT, LOCAL_APP_ID, LOCAL_SELLER_ID
from .keys import ensure_keys
from .server import SandboxServer, make_server

__all__ = [
    "DEFAULT_KEYS_DIR",
    "DEFAULT_PORT",
    "LOCAL_APP_ID",
    "LOCAL_SELLER_ID",
    "SandboxServer",
    "ensure_keys",
    "make_server",
]
