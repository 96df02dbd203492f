"""RabbitMQ adapter: topology, confirmed publishing, the consume loop, parked tools.

This package is the only part of the project that imports pika. Nothing here
opens a socket at import time or when a `Broker` is constructed: Lambda imports
the package once and reuses the warm container, so the connection is opened by
the first call that needs it and kept for the next ones.

    topology.py    the contract's names and queue arguments, declare_topology
    publisher.py   Broker: the confirmed publisher (API, handlers)
    consumer.py    run_consumer: the connection's thread, reconnects, stop
    dispatcher.py  Park and the worker thread: decode, handle, ack / retry / park
    parked.py      list_parked, replay_parked (the operator's tools)
    users.py       the API's and the worker's users (rabbitmqctl, definitions)
    connection.py  connection parameters, safe_url, the errors
    messages.py    JSON bodies, properties, our headers

Order events go to the topic exchange exchange.order.events (routing key = the
type); queue.order.webhook takes them all for the webhooks, whose deliveries
wait between attempts in queue.order.webhook.deliver.wait.<s>s.

For each consumed queue Q (check, pay, seckill, refund, webhook, webhook.deliver)
there are retry queues `Q.retry.<ms>ms` (a failed message waits there instead
of at the head of Q, so it never blocks the messages behind it; one TTL per queue, so they expire in
order) and `Q.parked`, where a message goes after `max_attempts`, or at once
when it is not a JSON object or the handler raised `Park`. A person looks at it
with `list_parked` and moves it back with `replay_parked`.

Delivery guarantees: publishes are persistent, mandatory and confirmed; the
consumer acks a message only after its handler returned (the handler does the
durable write), and moves a message to a retry or parked queue with a confirmed
publish *before* acking the original. Every step is therefore at-least-once:
handlers must be idempotent (they are: every state change is a conditional write).
"""

from __future__ import annotations

from chalicelib.broker.connection import BrokerUnavailable, Unroutable, safe_url
from chalicelib.broker.consumer import run_consumer
from chalicelib.broker.dispatcher import Park
from chalicelib.broker.parked import list_parked, replay_parked
from chalicelib.broker.publisher import Broker
from chalicelib.broker.topology import (
    CONSUMED_QUEUES,
    DEFAULT_RETRY_DELAYS_MS,
    EXCHANGE_DELAY,
    EXCHANGE_EVENTS,
    EXCHANGE_PAY,
    EXCHANGE_REFUND,
    EXCHANGE_SECKILL,
    EXCHANGE_WEBHOOK,
    QUEUE_CHECK,
    QUEUE_CHECK_PARKED,
    QUEUE_DELAY,
    QUEUE_PAY,
    QUEUE_PAY_PARKED,
    QUEUE_REFUND,
    QUEUE_REFUND_PARKED,
    QUEUE_SECKILL,
    QUEUE_SECKILL_PARKED,
    QUEUE_WEBHOOK,
    QUEUE_WEBHOOK_DELIVER,
    TopologyMismatch,
    TopologyMissing,
    declare_at,
    declare_topology,
    parked_queue_name,
    retry_queue_name,
    webhook_wait_queue,
)

# Not in __all__, but kept as before: tests/reliability reads broker.PARKED_SUFFIX.
from chalicelib.broker.topology import PARKED_SUFFIX as PARKED_SUFFIX

__all__ = [
    "CONSUMED_QUEUES",
    "DEFAULT_RETRY_DELAYS_MS",
    "EXCHANGE_DELAY",
    "EXCHANGE_EVENTS",
    "EXCHANGE_PAY",
    "EXCHANGE_REFUND",
    "EXCHANGE_SECKILL",
    "EXCHANGE_WEBHOOK",
    "QUEUE_CHECK",
    "QUEUE_CHECK_PARKED",
    "QUEUE_DELAY",
    "QUEUE_PAY",
    "QUEUE_PAY_PARKED",
    "QUEUE_REFUND",
    "QUEUE_REFUND_PARKED",
    "QUEUE_SECKILL",
    "QUEUE_SECKILL_PARKED",
    "QUEUE_WEBHOOK",
    "QUEUE_WEBHOOK_DELIVER",
    "Broker",
    "BrokerUnavailable",
    "Park",
    "TopologyMismatch",
    "TopologyMissing",
    "Unroutable",
    "declare_at",
    "declare_topology",
    "list_parked",
    "parked_queue_name",
    "replay_parked",
    "retry_queue_name",
    "run_consumer",
    "safe_url",
    "webhook_wait_queue",
]
