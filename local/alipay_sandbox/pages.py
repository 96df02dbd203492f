"""The sandbox's HTML pages: the cashier, and the pages that refuse."""

from __future__ import annotations

from html import escape

from .trades import WAIT_BUYER_PAY, CashierView

_STYLE = """
body{font-family:system-ui,-apple-system,"PingFang SC","Microsoft YaHei",sans-serif;
background:#f5f6f8;margin:0;color:#222}
header{background:#1677ff;color:#fff;padding:14px 24px;font-size:18px;font-weight:600}
main{max-width:480px;margin:40px auto;background:#fff;border-radius:10px;
box-shadow:0 2px 12px rgba(0,0,0,.08);padding:28px 32px}
h1{font-size:20px;margin:0 0 18px}
dl{display:grid;grid-template-columns:auto 1fr;gap:8px 16px;margin:0 0 24px}
dt{color:#888}dd{margin:0;word-break:break-all}
.amount{font-size:32px;font-weight:700;color:#1677ff;margin:8px 0 20px}
.status{display:inline-block;padding:2px 10px;border-radius:10px;background:#eee;font-size:13px}
.error{color:#c0392b}
button{font-size:16px;border:0;border-radius:6px;padding:10px 22px;cursor:pointer}
button.pay{background:#1677ff;color:#fff}
button.drop{background:#eee;color:#555;margin-left:8px}
footer{color:#999;font-size:12px;text-align:center;margin-top:12px}
"""


def _page(title: str, body: str) -> bytes:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)} - Alipay sandbox</title><style>{_STYLE}</style></head>"
        f"<body><header>Alipay sandbox (local)</header><main>{body}</main>"
        "<footer>Local test cashier. No real money moves.</footer></body></html>"
    ).encode()


def cashier_page(view: CashierView) -> bytes:
    details = (
        f"<dl><dt>Subject</dt><dd>{escape(view.subject)}</dd>"
        f"<dt>Order</dt><dd>{escape(view.out_trade_no)}</dd>"
        f"<dt>Trade</dt><dd>{escape(view.trade_no)}</dd>"
        f"<dt>Pay before</dt><dd>{escape(view.time_expire)} (Asia/Shanghai)</dd>"
        f'<dt>Status</dt><dd><span class="status">{escape(view.status)}</span></dd></dl>'
    )
    amount = f'<div class="amount">&yen; {escape(view.total_amount)}</div>'
    if view.status == WAIT_BUYER_PAY:
        action = (
            '<form method="post" action="/sandbox/pay">'
            f'<input type="hidden" name="out_trade_no" value="{escape(view.out_trade_no)}">'
            '<button class="pay" type="submit">Pay</button>'
            '<button class="drop" type="submit" name="notify" value="drop" '
            'title="Pay, but lose the async notify">Pay, lose the notify</button></form>'
        )
    elif view.status == "TRADE_SUCCESS":
        action = "<p>This trade is already paid (TRADE_SUCCESS).</p>"
    else:
        reason = escape(view.close_reason or "")
        action = (
            f'<p class="error">This trade is closed (TRADE_CLOSED, {reason})'
            " and cannot be paid.</p>"
        )
    return _page("Cashier", f"<h1>Checkout</h1>{amount}{details}{action}")


def error_page(title: str, code: str, detail: str) -> bytes:
    return _page(
        title,
        f'<h1 class="error">{escape(title)}</h1>'
        f"<p><code>{escape(code)}</code></p><p>{escape(detail)}</p>",
    )


def paid_page(out_trade_no: str, trade_no: str, total_amount: str) -> bytes:
    return _page(
        "Paid",
        "<h1>Payment done</h1>"
        f"<dl><dt>Order</dt><dd>{escape(out_trade_no)}</dd>"
        f"<dt>Trade</dt><dd>{escape(trade_no)}</dd>"
        f"<dt>Amount</dt><dd>&yen; {escape(total_amount)}</dd></dl>"
        "<p>The page-pay request had no return_url, so there is nowhere to go back to.</p>",
    )
