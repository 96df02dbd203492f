"""Faults of the sandbox's gateway: Alipay answering slowly, with a 5xx, or unsigned.

For a chosen fraction (``rate``) of the merchant's server API calls (query, close,
refund, refund query), one of the chosen ``kinds``:

- ``slow``: the call is done, and its (true, signed) answer written ``slow_seconds``
  later: the merchant may have given up waiting, and the call happened all the same;
- ``5xx``: a front end's 502 or 503 (the call did not reach Alipay), or 504 (it did,
  and was done: the answer timed out on its way back);
- ``unsigned``: the call not done, the answer a lie without a ``sign``
  (``40004 ACQ.TRADE_NOT_EXIST``: what would close a paid order if believed);
- ``badsign``: the call done, the answer a lie carrying the true answer's signature
  (wrongly signed): "no such trade", or when that is the truth, success ("paid",
  "refunded").

``notify_delay_seconds`` holds every notify's first attempt back so long.

Settings: ``make_server(faults=...)``, ``python -m local.alipay_sandbox
--fault-rate 0.2 --faults slow,5xx --slow-seconds 5 --notify-delay 2``, the
environment (SANDBOX_FAULT_RATE, SANDBOX_FAULTS, SANDBOX_SLOW_SECONDS,
SANDBOX_NOTIFY_DELAY_SECONDS, SANDBOX_FAULT_SEED) or, on a running sandbox,
``PUT /sandbox/faults`` with the JSON of ``GatewayFaults.to_json`` (fields left
out keep their value), ``GET`` to read them with what was injected, ``DELETE`` to
turn them off.
"""

from __future__ import annotations

import os
import random
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .constants import API_METHODS

FAULT_KINDS = ("slow", "5xx", "unsigned", "badsign")
RATE_ENV = "SANDBOX_FAULT_RATE"
KINDS_ENV = "SANDBOX_FAULTS"
SLOW_ENV = "SANDBOX_SLOW_SECONDS"
NOTIFY_DELAY_ENV = "SANDBOX_NOTIFY_DELAY_SECONDS"
SEED_ENV = "SANDBOX_FAULT_SEED"
_FIELDS = ("rate", "kinds", "slow_seconds", "notify_delay_seconds", "methods", "seed")


@dataclass(frozen=True)
class GatewayFaults:
    rate: float = 0.0
    kinds: tuple[str, ...] = FAULT_KINDS
    slow_seconds: float = 5.0
    notify_delay_seconds: float = 0.0
    methods: tuple[str, ...] = API_METHODS
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"the fault rate must be within 0..1: {self.rate}")
        if not self.kinds or set(self.kinds) - set(FAULT_KINDS):
            raise ValueError(f"faults must be some of {','.join(FAULT_KINDS)}: {self.kinds}")
        if set(self.methods) - set(API_METHODS):
            raise ValueError(f"methods must be some of {', '.join(API_METHODS)}")
        if self.slow_seconds < 0 or self.notify_delay_seconds < 0:
            raise ValueError("delays must not be negative")

    @classmethod
    def parse(cls, rate: Any = None, kinds: Any = None, slow_seconds: Any = None,
              notify_delay_seconds: Any = None, seed: Any = None) -> GatewayFaults:
        base = cls()
        return cls(
            rate=float(rate) if rate not in (None, "") else base.rate,
            kinds=_names(kinds) if kinds not in (None, "") else base.kinds,
            slow_seconds=(float(slow_seconds) if slow_seconds not in (None, "")
                          else base.slow_seconds),
            notify_delay_seconds=(float(notify_delay_seconds)
                                  if notify_delay_seconds not in (None, "") else 0.0),
            seed=int(seed) if seed not in (None, "") else None)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewayFaults:
        env = os.environ if env is None else env
        return cls.parse(env.get(RATE_ENV), env.get(KINDS_ENV), env.get(SLOW_ENV),
                         env.get(NOTIFY_DELAY_ENV), env.get(SEED_ENV))

    def changed(self, change: Mapping[str, Any]) -> GatewayFaults:
        """These settings with the fields of `change` (a JSON object) put in."""
        unknown = set(change) - set(_FIELDS)
        if unknown:
            raise ValueError(f"unknown fields: {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for name in ("rate", "slow_seconds", "notify_delay_seconds"):
            if name in change:
                values[name] = float(change[name])
        for name in ("kinds", "methods"):
            if name in change:
                values[name] = _names(change[name])
        if "seed" in change:
            values["seed"] = None if change["seed"] is None else int(change["seed"])
        return replace(self, **values)

    def to_json(self) -> dict[str, Any]:
        return {"rate": self.rate, "kinds": list(self.kinds), "slow_seconds": self.slow_seconds,
                "notify_delay_seconds": self.notify_delay_seconds,
                "methods": list(self.methods), "seed": self.seed}


def _names(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"a list of names or a comma-separated string: {value!r}")


class FaultPicker:
    """The sandbox's current faults and the draw for each call; thread-safe."""

    def __init__(self, faults: GatewayFaults) -> None:
        self._lock = threading.Lock()
        self._faults = faults
        self._random = random.Random(faults.seed)
        self._injected: Counter[str] = Counter()

    @property
    def faults(self) -> GatewayFaults:
        return self._faults

    def set(self, faults: GatewayFaults) -> None:
        with self._lock:
            self._faults = faults
            self._random = random.Random(faults.seed)
            self._injected = Counter()

    def pick(self, method: str) -> str | None:
        with self._lock:
            f = self._faults
            if f.rate <= 0 or method not in f.methods or self._random.random() >= f.rate:
                return None
            kind = self._random.choice(f.kinds)
            self._injected[kind] += 1
            return kind

    def status_5xx(self) -> int:
        with self._lock:
            return self._random.choice((502, 503, 504))

    def report(self) -> dict[str, Any]:
        with self._lock:
            return {**self._faults.to_json(), "injected": dict(self._injected)}
