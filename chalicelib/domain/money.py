"""Money: Decimal in code, integer fen in storage, a two-decimal string on the wire."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_CENT = Decimal("0.01")


def to_fen(amount: Decimal | str) -> int:
    """'59.90' or Decimal('59.9') -> 5990. Refuses more than two decimals."""
    try:
        value = Decimal(amount)
    except (InvalidOperation, TypeError, ValueError) as exc:
        raise ValueError(f"not an amount: {amount!r}") from exc
    if not value.is_finite():
        raise ValueError(f"not an amount: {amount!r}")
    cents = value.quantize(_CENT)
    if cents != value:
        raise ValueError(f"more than two decimals: {amount!r}")
    return int(cents * 100)


def from_fen(fen: int) -> Decimal:
    return (Decimal(int(fen)) / 100).quantize(_CENT)


def money_str(fen: int) -> str:
    """5990 -> '59.90', the only way money goes on the wire."""
    return f"{from_fen(fen):.2f}"


def parse_amount(text: str) -> int | None:
    """An amount as written on the wire ('59.90') -> fen, or None if it is not one."""
    if not isinstance(text, str) or not re.fullmatch(r"[0-9]{1,10}(\.[0-9]{1,2})?", text):
        return None
    return to_fen(text)
