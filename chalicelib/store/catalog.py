"""Goods and carts."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from chalicelib.domain import CartLine, Goods
from chalicelib.store.base import StoreBase, conditional, dynamo

log = logging.getLogger(__name__)


class CatalogStore(StoreBase):
    # --- goods --------------------------------------------------------------

    def put_goods(self, goods: Goods) -> None:
        m = self.models
        m.Goods(goods.id, name=goods.name, price_fen=goods.price_fen, stock=goods.stock).save()

    def list_goods(self) -> list[Goods]:
        m = self.models
        with dynamo():
            return sorted(
                (Goods(g.id, g.name, int(g.price_fen), int(g.stock)) for g in m.Goods.scan()),
                key=lambda g: g.id,
            )

    def get_goods(self, ids: Iterable[str]) -> dict[str, Goods]:
        m = self.models
        keys = sorted(set(ids))
        if not keys:
            return {}
        with dynamo():
            return {
                g.id: Goods(g.id, g.name, int(g.price_fen), int(g.stock))
                for g in m.Goods.batch_get(keys)
            }

    # --- cart ---------------------------------------------------------------

    def get_cart_lines(self, username: str) -> list[CartLine]:
        m = self.models
        with dynamo():
            return [
                CartLine(x.goods_id, int(x.num),
                         int(x.price_fen) if x.price_fen is not None else None, x.name)
                for x in m.CartLine.query(username)
            ]

    def get_cart(self, username: str) -> dict[str, int]:
        return {line.goods_id: line.num for line in self.get_cart_lines(username)}

    def set_cart_line(self, username: str, goods_id: str, num: int,
                      goods: Goods | None = None) -> None:
        """`goods`: the goods as just read, its price and name kept on the line."""
        m = self.models
        with dynamo():
            m.CartLine(username, goods_id, num=num,
                       price_fen=goods.price_fen if goods else None,
                       name=goods.name if goods else None).save()

    def refresh_cart_line(self, username: str, goods: Goods) -> None:
        """The goods' current price and name onto the user's line, if it still exists."""
        m = self.models
        with conditional():  # the line is gone: nothing to refresh
            m.CartLine(username, goods.id).update(
                actions=[m.CartLine.price_fen.set(goods.price_fen),
                         m.CartLine.name.set(goods.name)],
                condition=m.CartLine.num.exists())

    def delete_cart_line(self, username: str, goods_id: str) -> None:
        m = self.models
        with dynamo():
            m.CartLine(username, goods_id).delete()

