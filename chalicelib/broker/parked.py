"""The operator's tools for parked messages: look at them, move them back.

Why a module of its own: these run from a person's command line (`python -m
local parked`), not in the message path, with a short-lived connection each.
Listing consumes nothing; replaying moves each message with a confirmed publish
before acking it, so a failure half-way loses nothing.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from chalicelib.broker.connection import (
    STALE,
    BrokerUnavailable,
    Unroutable,
    close_quietly,
    connect,
    parameters,
)
from chalicelib.broker.messages import (
    H_ATTEMPTS,
    H_ERROR,
    H_ORIGINAL_QUEUE,
    H_PARKED_AT,
    H_REPLAYED_AT,
    fresh_headers,
    now,
    properties_like,
    text,
)
from chalicelib.broker.topology import PARKED_SUFFIX, parked_queue_name

logger = logging.getLogger(__name__)


def _open_tool_channel(url: str, queue: str) -> tuple[BlockingConnection, BlockingChannel, int]:
    connection = connect(url, parameters(url))
    try:
        channel = connection.channel()
        try:
            count = int(channel.queue_declare(queue, passive=True).method.message_count)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                raise LookupError(f"no queue {queue!r} on the broker") from exc
            raise
    except BaseException:
        close_quietly(connection)
        raise
    return connection, channel, count


def list_parked(url: str, queue: str, *, limit: int = 1000) -> list[dict[str, Any]]:
    """The parked messages of `queue` (`queue.order.pay` or `queue.order.pay.parked`).

    Each is `{"body": dict | str, "headers": dict, "properties": dict}`. Nothing
    is consumed: the messages are fetched unacked and given back by closing the
    channel. At most `limit`, and at most as many as the queue held when asked,
    so it cannot loop.
    """
    name = parked_queue_name(queue)
    try:
        connection, channel, count = _open_tool_channel(url, name)
        try:
            found: list[dict[str, Any]] = []
            for _ in range(min(count, limit)):
                method, properties, body = channel.basic_get(name, auto_ack=False)
                if method is None:
                    break
                try:
                    shown: Any = json.loads(body.decode("utf-8"))
                except ValueError:
                    shown = body.decode("utf-8", errors="replace")
                found.append(
                    {
                        "body": shown,
                        "headers": text(dict(properties.headers or {})),
                        "properties": {
                            "content_type": properties.content_type,
                            "message_id": properties.message_id,
                            "timestamp": properties.timestamp,
                        },
                    }
                )
            # Unacked messages are given back when the channel closes. (Not
            # nack: a quorum queue would count it as a failed delivery.)
            channel.close()
            return found
        finally:
            close_quietly(connection)
    except STALE as exc:
        raise BrokerUnavailable(f"listing {name} failed: {exc!r}") from exc


def replay_parked(url: str, queue: str) -> int:
    """Move every parked message of `queue` back to its original queue; returns how many.

    The attempts start again (the x-attempts, x-error, x-parked-at headers are
    removed). Each message is published with a confirm before it is acked, so a
    failure half-way loses nothing (the rest stays parked); it raises
    `BrokerUnavailable` or `Unroutable` saying how many were moved.
    """
    name = parked_queue_name(queue)
    default_target = name[: -len(PARKED_SUFFIX)]
    moved = 0
    try:
        connection, channel, count = _open_tool_channel(url, name)
        try:
            channel.confirm_delivery()
            for _ in range(count):
                method, properties, body = channel.basic_get(name, auto_ack=False)
                if method is None:
                    break
                headers = fresh_headers(properties.headers or {})
                target = str(text(headers.pop(H_ORIGINAL_QUEUE, None) or default_target))
                for header in (H_ATTEMPTS, H_ERROR, H_PARKED_AT):
                    headers.pop(header, None)
                headers[H_REPLAYED_AT] = now()
                try:
                    channel.basic_publish(
                        "", target, body, properties_like(properties, headers), mandatory=True
                    )
                except pika.exceptions.UnroutableError as exc:
                    raise Unroutable(
                        f"replay of {name} stopped after {moved}: no queue {target!r}"
                    ) from exc
                except pika.exceptions.NackError as exc:
                    raise BrokerUnavailable(
                        f"replay of {name} stopped after {moved}: publish to {target} nacked"
                    ) from exc
                channel.basic_ack(method.delivery_tag)
                moved += 1
            channel.close()
        finally:
            close_quietly(connection)
    except STALE as exc:
        raise BrokerUnavailable(f"replay of {name} stopped after {moved}: {exc!r}") from exc
    logger.warning("replayed %d parked message(s) from %s", moved, name)
    return moved
