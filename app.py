"""Routes only: parse the request, call a handler, shape the answer."""

from __future__ import annotations

import base64
import binascii
import functools
import html
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

from chalice import AuthResponse, Chalice, ForbiddenError, Rate, Response, UnauthorizedError

from chalicelib import (
    admin,
    auth,
    deps,
    events,
    handlers,
    logs,
    metrics,
    reconcile,
    refunds,
    seckill,
    webhooks,
)
from chalicelib.domain import (
    AlreadyHolding,
    Conflict,
    Invalid,
    NotFound,
    OutOfStock,
    Overloaded,
    PriceChanged,
    RefundExceedsPaid,
    RefundInProgress,
    RefundNotAllowed,
    RefundStatus,
    ShopError,
    SoldOut,
    TooManyUnpaidOrders,
    Unavailable,
    Unprocessable,
)

logs.configure()  # JSON lines; formats only, opens nothing
# No handler of chalice's own: its plain-text lines would bypass the JSON formatter
# (and its clipping of attacker-controlled values).
app = Chalice(app_name="shop-pay", configure_logs=False)
app.log.setLevel(logging.INFO)
log = logging.getLogger("shop-pay")


def _error(status: int, code: str, message: str, **extra: Any) -> Response:
    return Response(status_code=status, body={"Code": code, "Message": message, **extra},
                    headers={"Content-Type": "application/json"})


# The domain's errors as HTTP answers: (status, Code). The most specific class
# wins; an error of no class here is a 500.
ERRORS: dict[type[ShopError], tuple[int, str]] = {
    Invalid: (400, "BadRequestError"),
    NotFound: (404, "NotFoundError"),
    Conflict: (409, "ConflictError"),
    OutOfStock: (409, "OutOfStock"),
    TooManyUnpaidOrders: (409, "TooManyUnpaidOrders"),
    PriceChanged: (409, "PriceChanged"),
    SoldOut: (409, "SoldOut"),
    AlreadyHolding: (409, "AlreadyHolding"),
    RefundNotAllowed: (409, "RefundNotAllowed"),
    RefundInProgress: (409, "RefundInProgress"),
    RefundExceedsPaid: (409, "RefundExceedsPaid"),
    Overloaded: (429, "TooManyRequests"),
    Unprocessable: (422, "Unprocessable"),
    Unavailable: (503, "ServiceUnavailable"),
}


def error_response(exc: ShopError) -> Response:
    status, code = next((ERRORS[kind] for kind in type(exc).__mro__ if kind in ERRORS),
                        (500, "InternalError"))
    response = _error(status, code, exc.message, **exc.details)
    if isinstance(exc, Overloaded):
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


def api(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turns the handlers' errors into the contract's answers."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ShopError as exc:
            response = error_response(exc)
            if response.status_code >= 500:
                log.warning("%s: %s", fn.__name__, exc.message)
            return response

    return wrapper


# --- files served as they are ---------------------------------------------------

_ASSETS = Path(__file__).resolve().parent / "chalicelib"


@functools.cache
def _asset(name: str) -> str:
    """A file of chalicelib/, read once per process (on first use, not at import)."""
    return (_ASSETS / name).read_text(encoding="utf-8")


@app.route("/")
def storefront() -> Response:
    """A small shop page over the JSON API: goods, cart, orders, pay."""
    return Response(status_code=200, body=_asset("storefront.html"),
                    headers={"Content-Type": "text/html; charset=utf-8"})


@app.route("/openapi.json")
def openapi() -> Response:
    """The API as an OpenAPI 3.1 document (kept in step with the routes by a test)."""
    return Response(status_code=200, body=_asset("openapi.json"),
                    headers={"Content-Type": "application/json; charset=utf-8"})


# --- auth ---------------------------------------------------------------------


# No cache (API Gateway's default keeps a result 300 s): a token must stop working
# at its `exp`, and `python -m local token --ttl` issues any lifetime, however short.
# Verifying is one HMAC, no I/O; the cost is one authorizer call per request.
@app.authorizer(ttl_seconds=0)
def jwt_auth(auth_request: Any) -> AuthResponse:
    """Verifies the bearer token. A bad token is let through with the reason in the
    context, so that the route answers 401 in the contract's shape everywhere
    (API Gateway and `chalice local` alike) instead of the gateway's bare 403."""
    try:
        settings = deps.get().settings
        user, role = auth.identity_from_header(settings.jwt_secret, auth_request.token,
                                               settings.jwt_previous_secret)
        return AuthResponse(routes=["*"], principal_id=user, context={"role": role})
    except auth.AuthError as exc:
        return AuthResponse(routes=["*"], principal_id="anonymous",
                            context={"authError": str(exc)})


def current_user() -> str:
    context = app.current_request.context.get("authorizer") or {}
    if context.get("authError") or not context.get("principalId"):
        raise UnauthorizedError(context.get("authError") or "no valid token")
    return str(context["principalId"])


def current_operator() -> str:
    """The operator behind the request: 401 without a valid token, 403 when the
    token is not an operator's."""
    user = current_user()
    context = app.current_request.context.get("authorizer") or {}
    if context.get("role") != auth.OPERATOR:
        raise ForbiddenError(f"{user} is not an operator: this needs a token with "
                             f"role {auth.OPERATOR}")
    return user


def json_object() -> dict[str, Any]:
    body = app.current_request.json_body
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise Invalid("the body must be a JSON object")
    return body


# --- routes -------------------------------------------------------------------


@app.route("/health")
def health() -> Response:
    d = deps.get()
    checks: dict[str, str] = {}
    for name, ping in (("dynamodb", d.store.ping), ("rabbitmq", d.broker.ping)):
        try:
            ping()
            checks[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure is "down" here
            checks[name] = f"down: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    return Response(status_code=200 if ok else 503,
                    body={"status": "ok" if ok else "down", "checks": checks})


@app.route("/goods")
@api
def goods() -> Any:
    return handlers.list_goods(deps.get())


@app.route("/cart", authorizer=jwt_auth)
@api
def cart() -> Any:
    return handlers.get_cart(deps.get(), current_user())


@app.route("/cart/items/{goods_id}", methods=["PUT"], authorizer=jwt_auth)
@api
def put_cart_item(goods_id: str) -> Any:
    user = current_user()
    body = json_object()
    if "num" not in body:
        raise Invalid("the body must be {\"num\": 1..99}")
    return handlers.set_cart_item(deps.get(), user, goods_id, body["num"])


@app.route("/cart/items/{goods_id}", methods=["DELETE"], authorizer=jwt_auth)
@api
def delete_cart_item(goods_id: str) -> Any:
    return handlers.remove_cart_item(deps.get(), current_user(), goods_id)


@app.route("/orders", methods=["POST"], authorizer=jwt_auth)
@api
def create_order() -> Any:
    user = current_user()
    body = json_object()
    order = handlers.create_order(deps.get(), user, body.get("sourceType"))
    return Response(status_code=201, body=order)


@app.route("/orders", methods=["GET"], authorizer=jwt_auth)
@api
def list_orders() -> Any:
    return handlers.list_orders(deps.get(), current_user())


@app.route("/orders/{order_id}", methods=["GET"], authorizer=jwt_auth)
@api
def get_order(order_id: str) -> Any:
    return handlers.get_order(deps.get(), current_user(), order_id)


@app.route("/orders/{order_id}/cancel", methods=["POST"], authorizer=jwt_auth)
@api
def cancel_order(order_id: str) -> Any:
    return handlers.cancel_order(deps.get(), current_user(), order_id)


@app.route("/orders/{order_id}/pay", methods=["POST"], authorizer=jwt_auth)
@api
def pay_order(order_id: str) -> Any:
    return handlers.start_payment(deps.get(), current_user(), order_id)


# --- flash sales (chalicelib/seckill.py) ------------------------------------------


@app.route("/seckill", methods=["GET"])
@api
def list_sales() -> Any:
    return seckill.list_sales(deps.get())


@app.route("/seckill/{sale_id}", methods=["POST"], authorizer=jwt_auth)
@api
def request_seckill(sale_id: str) -> Any:
    ticket = seckill.request_ticket(deps.get(), current_user(), sale_id)
    return Response(status_code=202, body=ticket)


@app.route("/seckill/tickets/{ticket_id}", methods=["GET"], authorizer=jwt_auth)
@api
def get_seckill_ticket(ticket_id: str) -> Any:
    return seckill.get_ticket(deps.get(), current_user(), ticket_id)


# --- the operators ------------------------------------------------------------


@app.route("/admin")
def admin_page() -> Response:
    """The operator page: search, an order with its timeline, refunds, attention."""
    return Response(status_code=200, body=_asset("admin.html"),
                    headers={"Content-Type": "text/html; charset=utf-8"})


@app.route("/admin/orders", methods=["GET"], authorizer=jwt_auth)
@api
def admin_orders() -> Any:
    current_operator()
    q = app.current_request.query_params or {}
    return admin.search_orders(deps.get(), status=q.get("status"), start=q.get("from"),
                               end=q.get("to"), q=q.get("q"), limit=q.get("limit"),
                               cursor=q.get("cursor"))


@app.route("/admin/orders/{order_id}", methods=["GET"], authorizer=jwt_auth)
@api
def admin_order(order_id: str) -> Any:
    current_operator()
    return admin.order_detail(deps.get(), order_id)


def _refund_answer(refund: Any, repeated: bool) -> Response:
    status = 200 if repeated else 202 if refund.status == RefundStatus.PENDING else 201
    return Response(status_code=status, body=refund.to_wire())


@app.route("/admin/orders/{order_id}/refunds", methods=["POST"], authorizer=jwt_auth)
@api
def admin_refund(order_id: str) -> Any:
    operator = current_operator()
    body = json_object()
    key = (app.current_request.headers or {}).get("idempotency-key")
    refund, repeated = refunds.request_refund(deps.get(), operator, order_id,
                                              body.get("amount"), body.get("reason"), key)
    return _refund_answer(refund, repeated)


@app.route("/admin/orders/{order_id}/refunds/{refund_id}", methods=["GET"],
           authorizer=jwt_auth)
@api
def admin_get_refund(order_id: str, refund_id: str) -> Any:
    current_operator()
    return refunds.get_refund(deps.get(), refund_id, order_id).to_wire()


@app.route("/admin/refunds/{refund_id}/retry", methods=["POST"], authorizer=jwt_auth)
@api
def admin_retry_refund(refund_id: str) -> Any:
    operator = current_operator()
    return _refund_answer(refunds.retry_refund(deps.get(), operator, refund_id), False)


@app.route("/admin/attention", methods=["GET"], authorizer=jwt_auth)
@api
def admin_attention() -> Any:
    current_operator()
    return admin.attention(deps.get())


@app.route("/admin/reconciliations", methods=["GET"], authorizer=jwt_auth)
@api
def admin_reconciliations() -> Any:
    current_operator()
    return reconcile.list_reports(deps.get())


@app.route("/admin/reconciliations/{day}", methods=["POST"], authorizer=jwt_auth)
@api
def admin_run_reconciliation(day: str) -> Any:
    operator = current_operator()
    finished, body = reconcile.start(deps.get(), day, operator)
    return Response(status_code=200 if finished else 202, body=body)


@app.route("/admin/reconciliations/{day}", methods=["GET"], authorizer=jwt_auth)
@api
def admin_reconciliation(day: str) -> Any:
    current_operator()
    return reconcile.get_report(deps.get(), day)


@app.route("/admin/reconciliations/{day}/differences/{difference_id}/resolve",
           methods=["POST"], authorizer=jwt_auth)
@api
def admin_resolve_difference(day: str, difference_id: str) -> Any:
    operator = current_operator()
    return reconcile.resolve(deps.get(), day, difference_id, json_object().get("note"),
                             operator)


@app.route("/admin/reconciliations/{day}/differences.csv", methods=["GET"],
           authorizer=jwt_auth)
@api
def admin_differences_csv(day: str) -> Any:
    current_operator()
    return Response(status_code=200, body=reconcile.differences_csv(deps.get(), day),
                    headers={"Content-Type": "text/csv; charset=utf-8",
                             "Content-Disposition":
                                 f'attachment; filename="differences-{day[:10]}.csv"'})


@app.route("/admin/webhooks", methods=["POST"], authorizer=jwt_auth)
@api
def admin_subscribe() -> Any:
    operator = current_operator()
    return Response(status_code=201, body=webhooks.subscribe(deps.get(), json_object(),
                                                            by=operator))


@app.route("/admin/webhooks", methods=["GET"], authorizer=jwt_auth)
@api
def admin_subscriptions() -> Any:
    current_operator()
    return webhooks.list_subscriptions(deps.get())


@app.route("/admin/webhooks/{sub_id}", methods=["DELETE"], authorizer=jwt_auth)
@api
def admin_unsubscribe(sub_id: str) -> Any:
    operator = current_operator()
    webhooks.unsubscribe(deps.get(), sub_id, by=operator)
    return Response(status_code=204, body="")


@app.route("/admin/webhooks/{sub_id}/deliveries", methods=["GET"], authorizer=jwt_auth)
@api
def admin_subscription_deliveries(sub_id: str) -> Any:
    current_operator()
    return webhooks.deliveries_of_subscription(deps.get(), sub_id)


@app.route("/admin/orders/{order_id}/deliveries", methods=["GET"], authorizer=jwt_auth)
@api
def admin_order_deliveries(order_id: str) -> Any:
    current_operator()
    return webhooks.deliveries_of_order(deps.get(), order_id)


@app.route("/admin/deliveries/{delivery_id}/resend", methods=["POST"], authorizer=jwt_auth)
@api
def admin_resend_delivery(delivery_id: str) -> Any:
    operator = current_operator()
    return Response(status_code=202, body=webhooks.resend(deps.get(), delivery_id, by=operator))


# --- Alipay -------------------------------------------------------------------


# A real notify is 2-3 KB of form (some 25 fields and a 344-character RSA2
# signature, percent-encoded). 16 KB leaves room for a long subject or fields
# Alipay may add; anything larger is refused before it is decoded, parsed or
# logged (only its size is), on the route and the function URL alike.
MAX_NOTIFY_BYTES = 16 * 1024
# The same limit for a base64 body (4 characters per 3 bytes): a longer one is
# refused without decoding it.
MAX_NOTIFY_BASE64_CHARS = 4 * -(-MAX_NOTIFY_BYTES // 3)


def _notify_body(body: object, base64_encoded: bool) -> bytes | None:
    """The raw form an event carries (text, bytes, or base64 text), measured before
    anything else; None when it is too large or unusable."""
    if not isinstance(body, str | bytes | bytearray):
        log.warning("notify refused: no body")
        return None
    limit = MAX_NOTIFY_BASE64_CHARS if base64_encoded else MAX_NOTIFY_BYTES
    if len(body) > limit:
        unit = ("base64 characters" if base64_encoded
                else "characters" if isinstance(body, str) else "bytes")
        log.warning("notify refused: a body of %d %s, over the limit of %d",
                           len(body), unit, limit)
        return None
    try:
        if base64_encoded:
            raw = base64.b64decode(body, validate=True)
        elif isinstance(body, str):
            raw = body.encode("ascii")  # a form is percent-encoded ASCII
        else:
            raw = bytes(body)
    except (binascii.Error, ValueError):  # UnicodeEncodeError is a ValueError
        log.warning("notify refused: the body is not %s",
                           "base64" if base64_encoded else "ASCII")
        return None
    if len(raw) > MAX_NOTIFY_BYTES:
        log.warning("notify refused: a body of %d bytes, over the limit of %d",
                           len(raw), MAX_NOTIFY_BYTES)
        return None
    return raw


_CHARSET = re.compile(r"(?:^|&)charset=([^&]*)")


def _form(raw: bytes) -> dict[str, str] | None:
    """Alipay's form in its own charset; None when it is not a well-formed form."""
    try:
        text = raw.decode("ascii")
        # The charset field is ASCII itself: found without parsing the form twice.
        named = _CHARSET.search(text)
        charset = unquote_plus(named.group(1)) if named and named.group(1) else "utf-8"
        pairs = parse_qsl(text, keep_blank_values=True, encoding=charset, errors="strict",
                          strict_parsing=True, max_num_fields=100)
    except (UnicodeDecodeError, LookupError, ValueError):
        return None
    form = dict(pairs)
    if len(form) != len(pairs):
        return None  # the same key twice: ambiguous, refuse
    return form


def _plain(text: str, status: int = 200) -> Response:
    return Response(status_code=status, body=text,
                    headers={"Content-Type": "text/plain; charset=utf-8"})


def notify_answer(raw: bytes) -> str:
    """Alipay's async notify, however it arrived: `success` or `failure`.

    The one path behind both the API route and the function URL below. A body over
    MAX_NOTIFY_BYTES is `failure` unparsed (the callers measure it before decoding)."""
    if len(raw) > MAX_NOTIFY_BYTES:
        log.warning("notify refused: a body of %d bytes, over the limit of %d",
                           len(raw), MAX_NOTIFY_BYTES)
        return "failure"
    form = _form(raw)
    if form is None:
        log.warning("notify refused: not a well-formed form")
        return "failure"
    ctx = {"orderId": form.get("out_trade_no"), "tradeNo": form.get("trade_no"),
           "notifyId": form.get("notify_id")}
    try:
        ok = handlers.on_notify(deps.get(), form)
    except Unavailable as exc:
        log.warning("notify: %s", exc, extra=ctx)
        ok = False
    return "success" if ok else "failure"


@app.route("/alipay/notify", methods=["POST"],
           content_types=["application/x-www-form-urlencoded"])
def alipay_notify() -> Response:
    # The event's body as it came, not `raw_body`, which would decode base64 whatever
    # its size. Too large is still 200 `failure`: the contract's only answers, and
    # Alipay retries anything but `success` alike.
    event = app.current_request.to_original_event()
    raw = _notify_body(event.get("body") or b"", bool(event.get("isBase64Encoded")))
    return _plain("failure" if raw is None else notify_answer(raw))


def _function_url_body(event: dict[str, Any]) -> bytes | None:
    """The raw body of a Lambda function URL event (payload 2.0), None when unusable
    or over the size limit."""
    return _notify_body(event.get("body"), bool(event.get("isBase64Encoded")))


@app.lambda_function(name="alipay_notify_url")
def alipay_notify_url(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """The notify behind a Lambda function URL: the `notify_url` given to Alipay in
    production (no API Gateway stage path, no authorizer in front)."""

    def answer(text: str, status: int = 200) -> dict[str, Any]:
        return {"statusCode": status, "headers": {"Content-Type": "text/plain"}, "body": text}

    if not isinstance(event, dict):
        return answer("failure")
    method = ((event.get("requestContext") or {}).get("http") or {}).get("method", "POST")
    if str(method).upper() != "POST":
        return answer("failure", 405)
    headers = {str(k).lower(): str(v) for k, v in (event.get("headers") or {}).items()}
    content_type = headers.get("content-type", "application/x-www-form-urlencoded")
    if content_type.split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
        log.warning("notify refused: content type %r", content_type)
        return answer("failure")
    raw = _function_url_body(event)  # says itself why it is None
    return answer("failure" if raw is None else notify_answer(raw))


@app.route("/alipay/return", methods=["GET"])
def alipay_return() -> Response:
    params = dict(app.current_request.query_params or {})
    try:
        view = handlers.on_return(deps.get(), params)
    except ShopError as exc:
        status = error_response(exc).status_code
        status = 400 if status == 404 else status
        return _page(status, "Payment", f"<p>{html.escape(exc.message)}</p>")
    order = view["order"]
    status = html.escape(order["status"])
    waiting = order["status"] == "UNPAID"
    body = (
        f"<p class='muted'>Order</p><p><code id='order-id'>{html.escape(order['id'])}</code></p>"
        f"<p>Amount: {html.escape(order['totalMoney'])}</p>"
        f"<p class='status'>Status: <strong>{html.escape(view['label'])}</strong> "
        f"<span id='order-status' class='badge {status}'>{status}</span></p>"
        + ("<p class='muted'>Waiting for Alipay's confirmation; this page reloads itself.</p>"
           if waiting else "")
        + f"<script>window.orderStatus = {json.dumps(order['status'])};</script>"
    )
    # Only the notify (or the trade query) marks an order paid; while it is on its
    # way the page reloads, re-verifying the same signed query each time.
    return _page(200, "Payment", body, refresh=2 if waiting else None)


_PAGE_STYLE = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;background:#f5f6f8;"
    "color:#1f2933;margin:0}main{max-width:34rem;margin:4rem auto;background:#fff;"
    "border-radius:12px;box-shadow:0 1px 3px rgba(0,0,0,.08),0 8px 24px rgba(0,0,0,.05);"
    "padding:2rem 2.25rem}h1{margin:0 0 1rem;font-size:1.5rem}"
    "code{background:#f0f2f5;padding:.15rem .4rem;border-radius:4px}"
    ".muted{color:#6b7280;margin-bottom:.2rem}.status strong{font-size:1.3rem}"
    ".badge{display:inline-block;margin-left:.4rem;padding:.15rem .6rem;border-radius:999px;"
    "font-size:.85rem;font-weight:600;background:#e5e7eb}.badge.PAID{background:#d1fae5;"
    "color:#065f46}.badge.UNPAID{background:#fef3c7;color:#92400e}"
    ".badge.CLOSED,.badge.REFUNDED{background:#fee2e2;color:#991b1b}"
    "a.button{display:inline-block;margin-top:1rem;padding:.55rem 1.1rem;border-radius:8px;"
    "background:#1677ff;color:#fff;text-decoration:none;font-weight:600}"
)


def _page(status: int, title: str, body: str, refresh: int | None = None) -> Response:
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        + (f"<meta http-equiv='refresh' content='{int(refresh)}'>" if refresh else "")
        + f"<title>{html.escape(title)}</title><style>{_PAGE_STYLE}</style></head>"
        f"<body><main><h1>{html.escape(title)}</h1>{body}"
        # Relative: the shop is `/` locally and `/api/` behind API Gateway's stage.
        "<p><a class='button' href='../'>Back to the shop</a></p></main></body></html>"
    )
    return Response(status_code=status, body=page,
                    headers={"Content-Type": "text/html; charset=utf-8"})


# --- scheduled ----------------------------------------------------------------


@app.schedule(Rate(5, unit=Rate.MINUTES))
def sweeper(event: Any) -> dict[str, int]:
    """Checks UNPAID orders whose delay message was lost, closed orders whose payment
    link has expired, and refunds whose outcome is unknown; then says what needs a
    person as metrics (each with its alarm in the deploy template). It starts no
    check that might not end before the function's timeout (Lambda would run it
    again beside the next run): what it leaves, the next run does."""
    d = deps.get()
    context = getattr(event, "context", None)
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    seconds_left = (lambda: remaining() / 1000) if callable(remaining) else None
    result = handlers.sweep(d, seconds_left=seconds_left)
    log.info("sweeper: %s", result)
    try:
        metrics.emit_attention(admin.attention(d), stage=d.settings.stage)
    except Unavailable:
        log.warning("attention metrics not emitted", exc_info=True)
    return result


# The outbox table's stream. Its ARN is known only once the stack exists:
# .chalice/resources.json merges the table's StreamArn over this stand-in.
OUTBOX_STREAM_ARN = "@OUTBOX_STREAM_ARN@"


@app.on_dynamodb_record(stream_arn=OUTBOX_STREAM_ARN, batch_size=100, starting_position="LATEST")
def relay_events(event: Any) -> dict[str, int]:
    """Each new order event to RabbitMQ at once (chalicelib/events.py). A batch that
    fails is given again by the stream; the worker's sweep is the backstop."""
    published = events.relay_stream_records(deps.get(), event.to_dict().get("Records", []))
    return {"published": published}


@app.schedule(Rate(10, unit=Rate.MINUTES))
def reconciler(event: Any) -> dict[str, Any]:
    """Each morning after Alipay's bills are ready (10:00 Asia/Shanghai): the days
    not yet reconciled, up to yesterday, and those that failed; at any time, the days
    an operator asked for (POST /admin/reconciliations/{day} on AWS only records
    the request: a big day takes longer than API Gateway waits)."""
    return reconcile.run_scheduled(deps.get())
