"""A nacked publish is made again on a new channel, and a nacked move makes the
consumer reconnect: a quorum queue electing a leader nacks, and RabbitMQ 3.10 goes on
nacking on a channel whose first publish to it came then (tests/reliability/test_cluster.py)."""

from __future__ import annotations

from typing import Any

import pika.exceptions
import pytest

from chalicelib.broker import publisher
from chalicelib.broker.connection import NACK_RETRY_PAUSES_S, BrokerUnavailable, Nacked


class FakeChannel:
    def __init__(self, nacks: bool) -> None:
        self.nacks = nacks
        self.is_open = True
        self.published: list[bytes] = []

    def basic_publish(self, exchange: str, key: str, body: bytes, *args: Any,
                      **kwargs: Any) -> None:
        if self.nacks:
            raise pika.exceptions.NackError([])
        self.published.append(body)

    def close(self) -> None:
        self.is_open = False


def broker_on(monkeypatch: pytest.MonkeyPatch, channels: list[FakeChannel]
              ) -> tuple[publisher.Broker, list[float], list[FakeChannel]]:
    b = publisher.Broker("amqp://g:g@127.0.0.1:1/%2F,amqp://g:g@127.0.0.1:2/%2F", 60)
    given: list[FakeChannel] = []
    pauses: list[float] = []

    def ensure_channel() -> Any:
        """The fake channels stand in for the connection's, one after the other."""
        if b._channel is None:
            b._channel = channels[len(given)]  # type: ignore[assignment]
            given.append(channels[len(given)])
        return b._channel

    monkeypatch.setattr(b, "_ensure_channel", ensure_channel)
    monkeypatch.setattr(publisher.time, "sleep", pauses.append)
    return b, pauses, given


def test_a_nacked_publish_is_made_again_on_a_new_channel(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    channels = [FakeChannel(nacks=True), FakeChannel(nacks=True), FakeChannel(nacks=False)]
    b, pauses, given = broker_on(monkeypatch, channels)
    b.publish_refund("R1")
    assert given == channels
    assert [c.is_open for c in channels] == [False, False, True]  # the nacking ones closed
    assert len(channels[2].published) == 1
    assert pauses == list(NACK_RETRY_PAUSES_S[:2])
    b.publish_refund("R2")  # the good channel is kept
    assert len(given) == 3 and len(channels[2].published) == 2


def test_a_publish_nacked_on_every_new_channel_is_broker_unavailable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    channels = [FakeChannel(nacks=True) for _ in range(len(NACK_RETRY_PAUSES_S) + 1)]
    b, pauses, given = broker_on(monkeypatch, channels)
    with pytest.raises(Nacked, match="nacked") as caught:
        b.publish_refund("R1")
    assert isinstance(caught.value, BrokerUnavailable)  # the API answers 503
    assert given == channels and pauses == list(NACK_RETRY_PAUSES_S)


class FakeConsumerChannel(FakeChannel):
    def __init__(self, nacks: bool) -> None:
        super().__init__(nacks)
        self.acked: list[int] = []
        self.requeued: list[int] = []

    def basic_ack(self, tag: int) -> None:
        self.acked.append(tag)

    def basic_nack(self, tag: int, requeue: bool) -> None:
        assert requeue
        self.requeued.append(tag)


def delivery() -> Any:
    from types import SimpleNamespace

    from pika.spec import BasicProperties

    return SimpleNamespace(method=SimpleNamespace(delivery_tag=7), body=b'{"orderId":"x"}',
                           properties=BasicProperties(headers={}), queue="queue.order.pay")


def test_a_nacked_move_requeues_and_makes_the_consumer_reconnect() -> None:
    from chalicelib.broker import dispatcher

    channel = FakeConsumerChannel(nacks=True)
    # an AMQPChannelError: run_consumer's loop reconnects, with new channels
    with pytest.raises(pika.exceptions.AMQPChannelError, match="nacked"):
        dispatcher._move(channel, delivery(), {}, "queue.order.pay.retry.1000ms")  # type: ignore[arg-type]
    assert channel.requeued == [7] and channel.acked == []
    moved = FakeConsumerChannel(nacks=False)
    assert dispatcher._move(moved, delivery(), {}, "queue.order.pay.retry.1000ms")  # type: ignore[arg-type]
    assert moved.acked == [7] and len(moved.published) == 1
