"""The store's contract for order events and webhooks (part of tests/store_contract.py's
StoreContract, so run on both stores): each change writes its event in its own
transaction, a change that does not happen writes none, and the relay's marks.

The DynamoDB tables are shared by the tests of a session: every test makes orders
of its own and asks about those (the unsent index is read with a cutoff before
this test's orders for the sweep's test, so others' events do not matter)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from chalicelib.domain import OutOfStock
from chalicelib.domain.events import EventKind
from chalicelib.domain.webhooks import Attempt, Delivery, DeliveryStatus, Subscription, delivery_id


def kinds(store: Any, order_id: str) -> list[str]:
    return [e.kind.value for e in store.events_of(order_id)]


class OutboxContract:

    def test_each_change_writes_its_one_event_and_a_refused_change_none(
            self, store: Any) -> None:
        from tests.store_contract import HOUR, T0, fresh, paid_order, reserved, settled

        order = paid_order(store, "ke1", 1000)
        assert kinds(store, order.id) == ["order.created", "order.paid"]
        paid = store.events_of(order.id)[1]
        assert paid.event_id == f"EVT_{order.id}_paid"
        assert paid.data["transactionId"] == f"T-{order.id}"
        # paid again, or for another amount: no change, no event
        assert not store.mark_paid(order.id, total_fen=1000, trade_no="T-2", pay_time=T0,
                                   notify_id=None, now=T0 + HOUR)
        assert not store.close_order(fresh(store, order.id), now=T0 + HOUR)
        assert kinds(store, order.id) == ["order.created", "order.paid"]
        # a refund that fails writes nothing; one that succeeds its event; the one
        # that brings it to the total, two (in that order)
        failed = reserved(store, order.id, 300)
        assert settled(store, failed, status=failed.status.FAILED, now=T0 + HOUR)
        assert kinds(store, order.id) == ["order.created", "order.paid"]
        part = reserved(store, order.id, 300, at=T0 + 2 * HOUR)
        assert settled(store, part, now=T0 + 3 * HOUR)
        rest = reserved(store, order.id, 700, at=T0 + 4 * HOUR)
        assert settled(store, rest, now=T0 + 5 * HOUR)
        assert not settled(store, rest, now=T0 + 6 * HOUR)  # settled already
        events = store.events_of(order.id)
        assert [e.kind for e in events] == [EventKind.CREATED, EventKind.PAID,
                                            EventKind.REFUND_SUCCEEDED,
                                            EventKind.REFUND_SUCCEEDED, EventKind.REFUNDED]
        assert [e.data.get("refundId") for e in events[2:4]] == [part.id, rest.id]
        assert [e.data["refundedMoney"] for e in events[2:]] == ["3.00", "10.00", "10.00"]
        assert len({e.event_id for e in events}) == 5

    def test_a_close_writes_its_event_and_a_refused_create_writes_none(self, store: Any) -> None:
        from tests.store_contract import HOUR, T0, fresh, line_of, new_order, put_goods

        goods = put_goods(store, "ke2", 500, 1)
        order = new_order("alice", [line_of(goods, 1)])
        store.create_order(order, None)
        assert store.close_order(fresh(store, order.id), now=T0 + HOUR)
        assert not store.close_order(fresh(store, order.id), now=T0 + 2 * HOUR)
        assert not store.mark_paid(order.id, total_fen=500, trade_no="T-x", pay_time=T0,
                                   notify_id=None, now=T0 + 2 * HOUR)
        assert kinds(store, order.id) == ["order.created", "order.closed"]
        too_many = new_order("bob", [line_of(goods, 5)])
        try:
            store.create_order(too_many, None)
        except OutOfStock:
            pass
        else:
            raise AssertionError("five of a goods with one in stock was ordered")
        assert store.events_of(too_many.id) == []
        assert store.unsent_events(too_many.id) == []

    def test_a_flash_sale_order_writes_its_created_event(self, store: Any) -> None:
        from tests.store_contract import claimed, put_goods, put_sale, sale_order

        put_goods(store, "ke3", 100, 5)
        sale = put_sale(store, "kes3", 2, "ke3")
        ticket = claimed(store, "alice", sale.id)
        order = sale_order(sale, "alice")
        store.create_seckill_order(order, ticket)
        assert kinds(store, order.id) == ["order.created"]
        assert store.create_seckill_order(sale_order(sale, "alice"), ticket) != "ORDERED"
        assert kinds(store, order.id) == ["order.created"]

    def test_the_relay_marks_sweeps_and_parks(self, store: Any) -> None:
        from tests.store_contract import T0, paid_order

        order = paid_order(store, "ke4", 1000, at=T0 - timedelta(days=3650))
        created, paid = store.events_of(order.id)
        assert store.unsent_events(order.id) == [created, paid]
        # the sweep's index: an unsent event older than the cutoff, and none before it
        assert order.id in store.unsent_orders(created.occurred_at + timedelta(seconds=1))
        assert order.id not in store.unsent_orders(created.occurred_at - timedelta(days=1))
        store.mark_events_sent([created], now=T0)
        store.mark_events_sent([created], now=T0)  # twice: the same
        assert store.unsent_events(order.id) == [paid]
        assert store.events_of(order.id) == [created, paid]  # sent ones are kept
        assert not store.event_failed(paid, reason="boom", park_after=2)
        assert store.unsent_events(order.id) == [paid]
        assert store.event_failed(paid, reason="boom again", park_after=2)
        assert store.unsent_events(order.id) == []
        assert order.id not in store.unsent_orders(T0)
        parked = dict((e.event_id, why) for e, why in store.parked_events(1000))
        assert parked[paid.event_id] == "boom again"
        assert not store.event_failed(created, reason="sent", park_after=1)  # sent: no

    def test_the_sweep_reads_a_batch_and_marks_many_at_once(self, store: Any) -> None:
        from tests.store_contract import T0, paid_order

        old = T0 - timedelta(days=7300)  # older than any other test's events
        a = paid_order(store, "ke5", 1000, at=old)
        b = paid_order(store, "ke6", 500, at=old + timedelta(seconds=1))
        cutoff = old + timedelta(seconds=2)
        batch = sorted((e for page in store.unsent_pages(cutoff, page_size=1000) for e in page
                        if e.order_id in (a.id, b.id)), key=lambda e: (e.order_id, e.seq))
        assert batch == sorted(store.events_of(a.id) + store.events_of(b.id),
                               key=lambda e: (e.order_id, e.seq))
        assert [e.kind for e in batch if e.order_id == a.id] == [EventKind.CREATED,
                                                                 EventKind.PAID]
        paged = [e for page in store.unsent_pages(cutoff, page_size=1) for e in page
                 if e.order_id in (a.id, b.id)]
        assert paged == sorted(batch, key=lambda e: e.seq)  # oldest first, each order's in order
        assert all(len(page) <= 3 for page in store.unsent_pages(cutoff, page_size=3))
        store.mark_events_sent(batch, now=T0)
        assert store.unsent_events(a.id) == store.unsent_events(b.id) == []
        assert store.events_of(a.id) == [e for e in batch if e.order_id == a.id]
        assert not [e for page in store.unsent_pages(cutoff, page_size=1000) for e in page
                    if e.order_id in (a.id, b.id)]
        assert store.get_orders([a.id, b.id, "ORDER_0000000000000_0123456789abcdef"]) == {
            a.id: store.get_order(a.id), b.id: store.get_order(b.id)}
        assert store.get_orders([]) == {}

    # --- webhooks -----------------------------------------------------------------

    def test_subscriptions_are_saved_listed_and_deleted(self, store: Any) -> None:
        from tests.store_contract import T0, ms

        T0 = ms(T0)  # noqa: N806 - as the stores keep it
        sub = Subscription("WH_contract_1", "https://shop.example/hook",
                           ("order.paid", "order.refunded"), "s" * 20, T0, "carol")
        store.save_subscription(sub)
        assert store.get_subscription(sub.id) == sub
        assert sub in store.list_subscriptions()
        assert store.delete_subscription(sub.id, now=T0)
        assert not store.delete_subscription(sub.id, now=T0)
        assert store.get_subscription(sub.id) is None
        assert sub.id not in [s.id for s in store.list_subscriptions()]
        assert not store.delete_subscription("WH_none", now=T0)

    def test_a_delivery_is_made_once_and_its_attempts_recorded_once(self, store: Any) -> None:
        from tests.store_contract import HOUR, T0, ms

        T0 = ms(T0)  # noqa: N806 - as the stores keep it
        did = delivery_id("WH_contract_2", "EVT_x_paid_contract")
        d = Delivery(did, "WH_contract_2", "EVT_x_paid_contract", "order.paid",
                     "ORDER_contract_2", "https://shop.example/hook", '{"a":1}',
                     DeliveryStatus.PENDING, T0)
        assert store.create_delivery(d)
        assert not store.create_delivery(d)
        assert store.get_delivery(did) == d
        first = Attempt(T0, 500, 12, "oops")
        assert store.record_attempt(d, first, DeliveryStatus.PENDING)
        assert not store.record_attempt(d, first, DeliveryStatus.PENDING)  # read before it
        now = store.get_delivery(did)
        assert now.attempts == (first,) and now.status == DeliveryStatus.PENDING
        assert store.record_attempt(now, Attempt(T0 + HOUR, None, 5000, "timeout"),
                                    DeliveryStatus.FAILED)
        assert did in [x.id for x in store.failed_deliveries(1000)]
        assert [x.id for x in store.deliveries_of_order("ORDER_contract_2")] == [did]
        assert [x.id for x in store.deliveries_of_subscription("WH_contract_2")] == [did]
        reopened = store.reopen_delivery(did)
        assert reopened is not None and reopened.status == DeliveryStatus.PENDING
        assert len(reopened.attempts) == 2
        assert did not in [x.id for x in store.failed_deliveries(1000)]
        assert store.reopen_delivery("DLV_none") is None
        assert store.get_delivery("DLV_none") is None
