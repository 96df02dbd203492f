"""RMQ_URL with one address or several (a cluster's nodes), and the order they are tried."""

from __future__ import annotations

from typing import Any

import pika
import pika.exceptions
import pytest

from chalicelib.broker import connection
from chalicelib.broker.connection import (
    BrokerUnavailable,
    broker_urls,
    connect,
    open_connection,
    parameters,
    safe_url,
)

ONE = "amqp://guest:guest@127.0.0.1:5672/%2F"
THREE = ("amqp://u:p@10.0.0.1:5672/shop,amqp://u:p@10.0.0.2:5673/shop, "
         "amqps://u:p@mq.example:5671/shop?heartbeat=60")


def test_one_url_is_taken_as_it_always_was() -> None:
    assert broker_urls(ONE) == [ONE]
    [params] = parameters(ONE)
    assert (params.host, params.port, params.virtual_host) == ("127.0.0.1", 5672, "/")
    assert params.socket_timeout == connection.CONNECTION_DEFAULTS["socket_timeout"]
    assert params.heartbeat == connection.CONNECTION_DEFAULTS["heartbeat"]


def test_a_comma_inside_one_url_does_not_split_it() -> None:
    url = "amqp://user:pa,ss@host:5672/v?client_properties=a,b"
    assert broker_urls(url) == [url]


def test_several_urls_are_split_in_order_each_with_its_own_query() -> None:
    assert broker_urls(THREE) == [
        "amqp://u:p@10.0.0.1:5672/shop",
        "amqp://u:p@10.0.0.2:5673/shop",
        "amqps://u:p@mq.example:5671/shop?heartbeat=60",
    ]
    params = parameters(THREE)
    assert [(p.host, p.port) for p in params] == [
        ("10.0.0.1", 5672), ("10.0.0.2", 5673), ("mq.example", 5671)]
    assert [p.virtual_host for p in params] == ["shop"] * 3
    assert [p.heartbeat for p in params] == [30, 30, 60]  # the URL's query wins
    assert params[2].ssl_options is not None and params[0].ssl_options is None


@pytest.mark.parametrize("bad", [
    "amqp://h1:5672/%2F,http://h2:5672/%2F",
    "amqp://h1:5672/%2F,amqp://:5672/%2F",
])
def test_a_list_with_something_else_than_an_amqp_url_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="amqp"):
        broker_urls(bad)


def test_safe_url_hides_every_password() -> None:
    shown = safe_url(THREE)
    assert "p@" not in shown and "u:" not in shown
    assert shown == ("amqp://10.0.0.1:5672/shop,amqp://10.0.0.2:5673/shop,"
                     "amqps://mq.example:5671/shop")
    assert safe_url(ONE) == "amqp://127.0.0.1:5672/%2F"


class FakeBlocking:
    """pika.BlockingConnection that answers only on the ports in `up`."""

    up: set[int] = set()
    tried: list[int] = []

    def __init__(self, params: pika.ConnectionParameters) -> None:
        FakeBlocking.tried.append(params.port)
        if params.port not in FakeBlocking.up:
            raise pika.exceptions.AMQPConnectionError(f"refused on {params.port}")
        self.port = params.port


@pytest.fixture
def fake_pika(monkeypatch: pytest.MonkeyPatch) -> type[FakeBlocking]:
    monkeypatch.setattr(connection.pika, "BlockingConnection", FakeBlocking)
    FakeBlocking.up, FakeBlocking.tried = set(), []
    return FakeBlocking


def cluster(*ports: int) -> list[pika.URLParameters]:
    return parameters(",".join(f"amqp://g:g@127.0.0.1:{p}/%2F" for p in ports))


def test_addresses_are_tried_in_turn_and_the_one_that_served_goes_last(
        fake_pika: Any) -> None:
    params = cluster(1, 2, 3)
    fake_pika.up = {2, 3}
    assert open_connection(params).port == 2
    assert fake_pika.tried == [1, 2]
    assert [p.port for p in params] == [3, 1, 2]
    # the reconnect, after node 2 went away, begins with node 3
    fake_pika.up, fake_pika.tried = {1, 3}, []
    assert open_connection(params).port == 3
    assert fake_pika.tried == [3]
    assert [p.port for p in params] == [1, 2, 3]


def test_no_address_answering_is_broker_unavailable_naming_each(fake_pika: Any) -> None:
    params = cluster(1, 2)
    with pytest.raises(pika.exceptions.AMQPConnectionError, match="127.0.0.1:1.*127.0.0.1:2"):
        open_connection(params)
    with pytest.raises(BrokerUnavailable, match="cannot connect"):
        connect("amqp://g:g@127.0.0.1:1/%2F,amqp://g:g@127.0.0.1:2/%2F", params)
    assert [p.port for p in params] == [1, 2]  # the order is kept when none answered


def test_one_address_down_raises_pikas_own_error_as_before(fake_pika: Any) -> None:
    with pytest.raises(pika.exceptions.AMQPConnectionError, match="refused on 1"):
        open_connection(cluster(1))
