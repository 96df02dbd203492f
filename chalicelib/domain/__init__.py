"""The domain core: orders, money, goods and flash sales, refunds, errors.

No I/O and no HTTP or AMQP here; everything else imports from this package.
"""

from chalicelib.domain.catalog import (
    MAX_SALE_SHARDS,
    SALE_ID_RE,
    TICKET_DUPLICATE,
    TICKET_FAILED,
    TICKET_FINAL,
    TICKET_ID_RE,
    TICKET_ORDERED,
    TICKET_QUEUED,
    TICKET_SOLD_OUT,
    AlreadyHolding,
    CartLine,
    Goods,
    PriceChanged,
    Sale,
    SeckillOutcome,
    SoldOut,
    Ticket,
    TicketStatus,
    new_ticket_id,
    sale_of,
    shard_key,
    split_stock,
)
from chalicelib.domain.errors import (
    Conflict,
    Forged,
    Invalid,
    NotFound,
    OutOfStock,
    Overloaded,
    ShopError,
    TooManyUnpaidOrders,
    Unavailable,
    Unprocessable,
)
from chalicelib.domain.money import from_fen, money_str, parse_amount, to_fen
from chalicelib.domain.order import (
    CLOSED,
    GOODS_ID_RE,
    MAX_CART_LINES,
    MAX_NUM,
    MAX_TRANSACTION_ACTIONS,
    ORDER_ID_RE,
    PAID,
    PAY_TYPE_ALIPAY,
    REFUNDED,
    SOURCE_TYPES,
    STATES,
    UNPAID,
    Line,
    Order,
    OrderStatus,
    iso,
    new_order_id,
    parse_iso,
)
from chalicelib.domain.refund import (
    REFUND_ID_RE,
    SYSTEM_OPERATOR,
    Refund,
    RefundExceedsPaid,
    RefundInProgress,
    RefundNotAllowed,
    RefundStatus,
    refund_id,
    refund_request_no,
)
from chalicelib.domain.timeline import EventType, TimelineEvent

__all__ = [
    "CLOSED", "GOODS_ID_RE", "MAX_CART_LINES", "MAX_NUM", "MAX_TRANSACTION_ACTIONS",
    "ORDER_ID_RE", "PAID", "PAY_TYPE_ALIPAY", "REFUNDED", "SALE_ID_RE", "SOURCE_TYPES",
    "STATES", "TICKET_DUPLICATE", "TICKET_FAILED", "TICKET_FINAL", "TICKET_ID_RE",
    "TICKET_ORDERED", "TICKET_QUEUED", "TICKET_SOLD_OUT", "UNPAID",
    "AlreadyHolding", "CartLine", "Conflict", "Forged", "Goods", "Invalid", "Line", "NotFound",
    "Order", "OrderStatus",
    "OutOfStock", "Overloaded", "PriceChanged", "RefundStatus", "Sale", "SeckillOutcome",
    "ShopError", "SoldOut", "Ticket", "TicketStatus", "Unavailable", "Unprocessable",
    "from_fen", "iso", "money_str", "new_order_id", "new_ticket_id", "parse_amount",
    "parse_iso", "refund_id", "refund_request_no", "to_fen",
    "REFUND_ID_RE", "SYSTEM_OPERATOR", "Refund", "RefundExceedsPaid", "RefundInProgress",
    "RefundNotAllowed", "EventType", "TimelineEvent", "TooManyUnpaidOrders",
    "MAX_SALE_SHARDS", "sale_of", "shard_key", "split_stock",
]
