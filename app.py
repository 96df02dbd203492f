"""Routes only: parse the request, call a handler, shape the answer."""

from __future__ import annotations

import functools
import html
import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from chalice import AuthResponse, Chalice, Rate, Response, UnauthorizedError

from chalicelib import auth, deps, handlers
from chalicelib.orders import BadRequest, ShopError, Unavailable

app = Chalice(app_name="shop-pay")
app.log.setLevel(logging.INFO)
log = logging.getLogger("shop-pay")


def _error(status: int, code: str, message: str, **extra: Any) -> Response:
    return Response(status_code=status, body={"Code": code, "Message": message, **extra},
                    headers={"Content-Type": "application/json"})


def api(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turns the handlers' errors into the contract's answers."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ShopError as exc:
            if exc.status >= 500:
                log.warning("%s: %s", fn.__name__, exc.message)
            return _error(exc.status, exc.code, exc.message, **exc.extra)

    return wrapper


# --- auth ---------------------------------------------------------------------


@app.authorizer()
def jwt_auth(auth_request: Any) -> AuthResponse:
    """Verifies the bearer token. A bad token is let through with the reason in the
    context, so that the route answers 401 in the contract's shape everywhere
    (API Gateway and `chalice local` alike) instead of the gateway's bare 403."""
    try:
        user = auth.username_from_header(deps.get().settings.jwt_secret, auth_request.token)
        return AuthResponse(routes=["*"], principal_id=user)
    except auth.AuthError as exc:
        return AuthResponse(routes=["*"], principal_id="anonymous",
                            context={"authError": str(exc)})


def current_user() -> str:
    context = app.current_request.context.get("authorizer") or {}
    if context.get("authError") or not context.get("principalId"):
        raise UnauthorizedError(context.get("authError") or "no valid token")
    return str(context["principalId"])


def json_object() -> dict[str, Any]:
    body = app.current_request.json_body
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
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
        raise BadRequest("the body must be {\"num\": 1..99}")
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


# --- Alipay -------------------------------------------------------------------


def _form(raw: bytes) -> dict[str, str] | None:
    """Alipay's form in its own charset; None when it is not a well-formed form."""
    try:
        text = raw.decode("ascii")
        charset = dict(parse_qsl(text, keep_blank_values=True)).get("charset") or "utf-8"
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


@app.route("/alipay/notify", methods=["POST"],
           content_types=["application/x-www-form-urlencoded"])
def alipay_notify() -> Response:
    form = _form(app.current_request.raw_body or b"")
    if form is None:
        log.warning("notify refused: not a well-formed form")
        return _plain("failure")
    try:
        ok = handlers.on_notify(deps.get(), form)
    except Unavailable as exc:
        log.warning("notify: %s", exc)
        ok = False
    return _plain("success" if ok else "failure")


@app.route("/alipay/return", methods=["GET"])
def alipay_return() -> Response:
    params = dict(app.current_request.query_params or {})
    try:
        view = handlers.on_return(deps.get(), params)
    except ShopError as exc:
        status = 400 if exc.status in (400, 404) else exc.status
        return _page(status, "Payment", f"<p>{html.escape(exc.message)}</p>")
    order = view["order"]
    body = (
        f"<p>Order <code>{html.escape(order['id'])}</code></p>"
        f"<p>Amount: {html.escape(order['totalMoney'])}</p>"
        f"<p class='status'>Status: <strong>{html.escape(view['label'])}</strong></p>"
        f"<script>window.orderStatus = {json.dumps(order['status'])};</script>"
    )
    return _page(200, "Payment", body)


def _page(status: int, title: str, body: str) -> Response:
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:40rem;margin:3rem auto;"
        "padding:0 1rem;color:#222}code{background:#f3f3f3;padding:.1rem .3rem}"
        ".status strong{font-size:1.3rem}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )
    return Response(status_code=status, body=page,
                    headers={"Content-Type": "text/html; charset=utf-8"})


# --- scheduled ----------------------------------------------------------------


@app.schedule(Rate(5, unit=Rate.MINUTES))
def sweeper(event: Any) -> dict[str, int]:
    """Checks UNPAID orders whose delay message was lost."""
    return handlers.sweep(deps.get())
