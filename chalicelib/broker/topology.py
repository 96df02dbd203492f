"""The queues, exchanges and bindings of the contract, and declaring them.

Why a module of its own: the names and arguments are the contract with every
other RabbitMQ user (CONTRACT.md, "Queues"), both the publisher and the consumer
declare them, and a queue that already exists with other arguments needs an
error that says which queue, what differs and the way out.

    exchange.order.delay --queue.order.delay--> queue.order.delay
        (x-message-ttl = check delay; dead-letters to exchange.order.delay
         with key queue.order.check)
    exchange.order.delay --queue.order.check--> queue.order.check
    exchange.order.pay   --queue.order.pay----> queue.order.pay
    exchange.order.seckill --queue.order.seckill--> queue.order.seckill
    exchange.order.events (topic) --order.#--> queue.order.webhook
        (order events, routing key = the type; other consumers bind their own)
    exchange.order.webhook --queue.order.webhook.deliver--> queue.order.webhook.deliver
    exchange.order.webhook --<wait queue>--> queue.order.webhook.deliver.wait.<s>s
        (TTL <s> s, dead-letters back to queue.order.webhook.deliver: a failed
         delivery's wait before its next attempt)

plus, for each consumed queue Q: `Q.retry.<ms>ms` per retry delay (TTL <ms>,
dead-letters back to Q through the default exchange) and `Q.parked`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from chalicelib.broker.connection import (
    STALE,
    BrokerUnavailable,
    close_quietly,
    connect,
    parameters,
    safe_url,
)
from chalicelib.config import DEFAULT_RETRY_DELAYS_MS, DEFAULT_WEBHOOK_RETRY_SECONDS

logger = logging.getLogger(__name__)

EXCHANGE_DELAY = "exchange.order.delay"
QUEUE_DELAY = "queue.order.delay"
QUEUE_CHECK = "queue.order.check"
EXCHANGE_PAY = "exchange.order.pay"
QUEUE_PAY = "queue.order.pay"
EXCHANGE_SECKILL = "exchange.order.seckill"
QUEUE_SECKILL = "queue.order.seckill"
# A refund whose outcome is not known yet: `{"refundId"}`, settled by asking Alipay.
EXCHANGE_REFUND = "exchange.order.refund"
QUEUE_REFUND = "queue.order.refund"

# Order events (chalicelib/events.py): a topic exchange, routing key = the type.
EXCHANGE_EVENTS = "exchange.order.events"
EVENTS_BINDING = "order.#"
# Webhooks (chalicelib/webhooks.py): events fanned out into one delivery per
# subscription, then each delivery attempted, waiting between attempts.
QUEUE_WEBHOOK = "queue.order.webhook"
EXCHANGE_WEBHOOK = "exchange.order.webhook"
QUEUE_WEBHOOK_DELIVER = "queue.order.webhook.deliver"

PARKED_SUFFIX = ".parked"
QUEUE_CHECK_PARKED = QUEUE_CHECK + PARKED_SUFFIX
QUEUE_PAY_PARKED = QUEUE_PAY + PARKED_SUFFIX
QUEUE_SECKILL_PARKED = QUEUE_SECKILL + PARKED_SUFFIX
QUEUE_REFUND_PARKED = QUEUE_REFUND + PARKED_SUFFIX

#: The queues a consumer may read; each has retry queues and a parked queue.
CONSUMED_QUEUES: tuple[str, ...] = (QUEUE_CHECK, QUEUE_PAY, QUEUE_SECKILL, QUEUE_REFUND,
                                    QUEUE_WEBHOOK, QUEUE_WEBHOOK_DELIVER)

QUEUE_TYPES = ("classic", "quorum")

#: Every exchange of the contract: the API publishes to these and nothing else.
EXCHANGES: tuple[str, ...] = (EXCHANGE_DELAY, EXCHANGE_PAY, EXCHANGE_SECKILL, EXCHANGE_REFUND,
                              EXCHANGE_EVENTS, EXCHANGE_WEBHOOK)
EXCHANGE_TYPES = {EXCHANGE_EVENTS: "topic"}  # the others are direct


def webhook_wait_queue(seconds: int) -> str:
    """Where a delivery waits `seconds` before its next attempt."""
    return f"{QUEUE_WEBHOOK_DELIVER}.wait.{int(seconds)}s"


@dataclass(frozen=True)
class Permissions:
    """A user's RabbitMQ permissions in one vhost: three regexes over resource names.

    RabbitMQ checks `configure` for a (non-passive) declare or delete, `write` for
    a publish (the default exchange is `amq.default`), a queue.bind (the queue)
    and the dead-letter exchange of a declared queue, `read` for consume, get,
    purge, a queue.bind (the exchange) and the queue of a declared dead-letter
    queue. A passive declare needs no permission, only access to the vhost.
    """

    configure: str
    write: str
    read: str


_OUR_EXCHANGES = "|".join(re.escape(name) for name in EXCHANGES)
# Every consumed queue with its retry and parked queues, and queue.order.delay.
_OUR_QUEUES = r"queue\.order\..+"

#: The API: publishes to the exchanges, nothing else. Its health check and the
#: seckill queue depth are passive declares, which need no permission.
API_PERMISSIONS = Permissions(configure="^$", write=f"^({_OUR_EXCHANGES})$", read="^$")

#: The worker (and the operator's parked tools): declares the topology, consumes,
#: moves failed messages to the retry and parked queues through the default
#: exchange, replays parked ones, and publishes what its handlers publish.
WORKER_PERMISSIONS = Permissions(
    configure=f"^({_OUR_EXCHANGES}|{_OUR_QUEUES})$",
    write=f"^(amq\\.default|{_OUR_EXCHANGES}|{_OUR_QUEUES})$",
    read=f"^({_OUR_EXCHANGES}|{_OUR_QUEUES})$",
)


class TopologyMismatch(BrokerUnavailable):
    """A queue or exchange exists with other arguments than the code declares.

    RabbitMQ cannot change a queue's arguments in place. The message names the
    queue, what differs and the way out. It is a `BrokerUnavailable` (an HTTP
    caller answers 503 either way), but `run_consumer` does not retry it: it is
    a configuration problem that reconnecting cannot fix.
    """


class TopologyMissing(BrokerUnavailable):
    """The exchanges are not declared, and this user does not declare them (the API's
    may not): the worker declares them when it starts."""


def parked_queue_name(queue: str) -> str:
    """`queue.order.pay` -> `queue.order.pay.parked` (a parked name is returned as is)."""
    return queue if queue.endswith(PARKED_SUFFIX) else queue + PARKED_SUFFIX


def retry_queue_name(queue: str, delay_ms: int) -> str:
    """The queue where a failed message of `queue` waits `delay_ms` before coming back."""
    return f"{queue}.retry.{int(delay_ms)}ms"


def _queue_args(queue_type: str, **arguments: Any) -> dict[str, Any]:
    args = dict(arguments)
    if queue_type == "quorum":
        args["x-queue-type"] = "quorum"
        if "x-dead-letter-exchange" in args:
            # Without these a quorum queue dead-letters at-most-once: an expired
            # order-check message could be lost between the two queues.
            args["x-dead-letter-strategy"] = "at-least-once"
            args["x-overflow"] = "reject-publish"
    return args


def _topology(
    check_delay_ms: int, queue_type: str, retry_delays_ms: Sequence[int],
    webhook_waits_s: Sequence[int] = DEFAULT_WEBHOOK_RETRY_SECONDS,
) -> tuple[list[str], list[tuple[str, dict[str, Any]]], list[tuple[str, str, str]]]:
    exchanges = list(EXCHANGES)
    queues: list[tuple[str, dict[str, Any]]] = [
        (
            QUEUE_DELAY,
            _queue_args(
                queue_type,
                **{
                    "x-message-ttl": int(check_delay_ms),
                    "x-dead-letter-exchange": EXCHANGE_DELAY,
                    "x-dead-letter-routing-key": QUEUE_CHECK,
                },
            ),
        ),
        (QUEUE_CHECK, _queue_args(queue_type)),
        (QUEUE_PAY, _queue_args(queue_type)),
        (QUEUE_SECKILL, _queue_args(queue_type)),
        (QUEUE_REFUND, _queue_args(queue_type)),
        (QUEUE_WEBHOOK, _queue_args(queue_type)),
        (QUEUE_WEBHOOK_DELIVER, _queue_args(queue_type)),
    ]
    for wait in sorted(set(webhook_waits_s)):
        queues.append((webhook_wait_queue(wait), _queue_args(
            queue_type, **{"x-message-ttl": int(wait) * 1000,
                           "x-dead-letter-exchange": "",
                           "x-dead-letter-routing-key": QUEUE_WEBHOOK_DELIVER})))
    for queue in CONSUMED_QUEUES:
        queues.append((parked_queue_name(queue), _queue_args(queue_type)))
        for delay in sorted(set(retry_delays_ms)):
            queues.append(
                (
                    retry_queue_name(queue, delay),
                    _queue_args(
                        queue_type,
                        **{
                            "x-message-ttl": int(delay),
                            "x-dead-letter-exchange": "",  # the default exchange
                            "x-dead-letter-routing-key": queue,
                        },
                    ),
                )
            )
    bindings = [
        (QUEUE_DELAY, EXCHANGE_DELAY, QUEUE_DELAY),
        (QUEUE_CHECK, EXCHANGE_DELAY, QUEUE_CHECK),
        (QUEUE_PAY, EXCHANGE_PAY, QUEUE_PAY),
        (QUEUE_SECKILL, EXCHANGE_SECKILL, QUEUE_SECKILL),
        (QUEUE_REFUND, EXCHANGE_REFUND, QUEUE_REFUND),
        (QUEUE_WEBHOOK, EXCHANGE_EVENTS, EVENTS_BINDING),
        (QUEUE_WEBHOOK_DELIVER, EXCHANGE_WEBHOOK, QUEUE_WEBHOOK_DELIVER),
    ]
    bindings += [(webhook_wait_queue(w), EXCHANGE_WEBHOOK, webhook_wait_queue(w))
                 for w in sorted(set(webhook_waits_s))]
    return exchanges, queues, bindings


def validate_topology_args(
    check_delay_ms: int, queue_type: str, retry_delays_ms: Sequence[int]
) -> None:
    """ValueError for arguments `declare_topology` would refuse, before any connection."""
    if queue_type not in QUEUE_TYPES:
        raise ValueError(f"queue_type must be one of {QUEUE_TYPES}, not {queue_type!r}")
    if int(check_delay_ms) <= 0:
        raise ValueError(f"check_delay_ms must be positive, not {check_delay_ms!r}")
    if not retry_delays_ms or any(int(d) <= 0 for d in retry_delays_ms):
        raise ValueError(f"retry_delays_ms must be positive delays, not {retry_delays_ms!r}")


def declare_topology(
    channel: BlockingChannel,
    check_delay_ms: int,
    queue_type: str = "classic",
    *,
    retry_delays_ms: Sequence[int] = DEFAULT_RETRY_DELAYS_MS,
    webhook_waits_s: Sequence[int] = DEFAULT_WEBHOOK_RETRY_SECONDS,
) -> None:
    """Declare the contract's exchanges, queues and bindings, idempotently.

    Also declares the parked queue and one retry queue per delay in
    `retry_delays_ms` for each consumed queue. A queue or exchange that already
    exists with other arguments raises `TopologyMismatch`; RabbitMQ then closes
    `channel` (406), so the caller must open a new one.
    """
    validate_topology_args(check_delay_ms, queue_type, retry_delays_ms)
    exchanges, queues, bindings = _topology(check_delay_ms, queue_type, retry_delays_ms,
                                            webhook_waits_s)
    for exchange in exchanges:
        kind = EXCHANGE_TYPES.get(exchange, "direct")
        _declare(
            channel,
            "exchange",
            exchange,
            check_delay_ms,
            lambda e=exchange, k=kind: channel.exchange_declare(e, exchange_type=k, durable=True),
        )
    # Each queue is bound as soon as it is declared: a publisher that sees a queue
    # (the API, while the worker declares on its first start) finds it routable.
    bound: dict[str, list[tuple[str, str]]] = {}
    for queue, exchange, key in bindings:
        bound.setdefault(queue, []).append((exchange, key))
    for queue, arguments in queues:
        _declare(
            channel,
            "queue",
            queue,
            check_delay_ms,
            lambda q=queue, a=arguments: channel.queue_declare(q, durable=True, arguments=a),
        )
        for exchange, key in bound.get(queue, []):
            channel.queue_bind(queue, exchange, routing_key=key)
    logger.debug("topology declared (%s queues, check delay %d ms)", queue_type, check_delay_ms)


def declare_at(
    url: str,
    check_delay_seconds: int,
    queue_type: str = "classic",
    *,
    retry_delays_ms: Sequence[int] = DEFAULT_RETRY_DELAYS_MS,
    webhook_waits_s: Sequence[int] = DEFAULT_WEBHOOK_RETRY_SECONDS,
) -> None:
    """Declare the topology over a connection of its own (the worker's user), e.g.
    before the API first publishes on a new broker; the worker does it when it starts."""
    check_delay_ms = int(check_delay_seconds) * 1000
    validate_topology_args(check_delay_ms, queue_type, retry_delays_ms)
    connection = connect(url, parameters(url))
    try:
        declare_topology(
            connection.channel(), check_delay_ms, queue_type, retry_delays_ms=retry_delays_ms,
            webhook_waits_s=webhook_waits_s,
        )
    except pika.exceptions.ChannelClosedByBroker as exc:
        raise BrokerUnavailable(
            f"cannot declare the topology at {safe_url(url)}: {exc.reply_code} {exc.reply_text}"
        ) from exc
    except STALE as exc:
        raise BrokerUnavailable(f"RabbitMQ went away while declaring: {exc!r}") from exc
    finally:
        close_quietly(connection)


def _declare(
    channel: BlockingChannel,
    kind: str,
    name: str,
    check_delay_ms: int,
    declare: Callable[[], object],
) -> None:
    try:
        declare()
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 406:
            raise
        raise TopologyMismatch(
            _mismatch_message(channel, kind, name, check_delay_ms, exc.reply_text)
        ) from exc


_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']*)' for (?P<kind>queue|exchange) '(?P<name>[^']*)'"
    r" in vhost '(?P<vhost>[^']*)': received (?P<wanted>.*) but current is (?P<current>.*)$"
)


_QUORUM_ONLY_ARGS = ("x-queue-type", "x-overflow", "x-dead-letter-strategy")


def _value(text: str) -> str:
    """`'5000'` / `the value '5000' of type 'signedint'` / `none` -> `5000` / `none`."""
    found = re.search(r"'([^']*)'", text)
    return found.group(1) if found else text.strip()


def _mismatch_message(
    channel: BlockingChannel, kind: str, name: str, check_delay_ms: int, reply_text: str
) -> str:
    found = _INEQUIVALENT.search(reply_text)
    vhost = found.group("vhost") if found else "VHOST"
    if found:
        arg, current, wanted = found.group("arg"), _value(found["current"]), _value(found["wanted"])
        differs = f"{arg} is {current} on the broker, {wanted} wanted"
    else:
        arg, current, differs = "", "", "its arguments differ"
    if kind == "exchange":
        return (
            f"exchange {name!r} in vhost {vhost!r} already exists with other arguments: {differs}. "
            f"Way out: delete the exchange (rabbitmqadmin -V {vhost} delete exchange "
            f"name={name}; on Amazon MQ: Delete on the exchange's page of the broker's "
            f"RabbitMQ web console, or DELETE /api/exchanges/<vhost>/{name} on its "
            f"management API) or use another vhost. Broker said: {reply_text}"
        )
    held = _message_count(channel, name)
    holding = f" and holds {held} message(s)" if held is not None else ""
    message = (
        f"queue {name!r} in vhost {vhost!r} already exists with other arguments{holding}: "
        f"{differs}. RabbitMQ cannot change a queue's arguments. Way out: delete the queue "
        f"when it is empty (rabbitmqctl delete_queue -p {vhost} {name}; on Amazon MQ, which "
        f"has no rabbitmqctl: Delete on the queue's page of the broker's RabbitMQ web "
        f"console, or DELETE /api/queues/<vhost>/{name} on its management API, the vhost "
        f"URL-encoded: / is %2F), use another vhost"
    )
    if name == QUEUE_DELAY and arg == "x-message-ttl":
        old = f", {int(current) / 1000:g}" if current.isdigit() else ""
        message += (
            f", or set ORDER_CHECK_DELAY_SECONDS back to the old value{old}"
            f" (it is {check_delay_ms / 1000:g} now)"
        )
    elif arg in _QUORUM_ONLY_ARGS:
        message += (
            " (the queue was made with another queue type: classic and quorum queues"
            " cannot be converted in place)"
        )
    return f"{message}. Broker said: {reply_text}"


def _message_count(channel: BlockingChannel, queue: str) -> int | None:
    """Best effort: how many messages `queue` holds, on a fresh channel (406 closed ours)."""
    try:
        probe = channel.connection.channel()
        try:
            return int(probe.queue_declare(queue, passive=True).method.message_count)
        finally:
            if probe.is_open:
                probe.close()
    except Exception:  # noqa: BLE001 - only decorates an error message
        return None
