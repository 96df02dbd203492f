"""A token bucket: at most `rate` takes a second, at most `burst` in a row.

The bridge drains a queue through one (local/bridge.py, `rate_limits`): the
queue holds the peak, the consumer writes at the rate the database takes.

With `burst=1` (the default) two takes are never closer than 1/rate seconds:
the bucket holds at most one token, and a take leaves it empty. So any window
of T seconds sees at most floor(T * rate) + 1 takes; a burst of b allows b - 1
more. Nothing here does I/O; the waiting is interruptible through `stop`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TokenBucket:
    def __init__(self, rate: float, burst: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not rate > 0 or rate == float("inf"):
            raise ValueError(f"rate must be a positive number of takes a second, not {rate!r}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, not {burst!r}")
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._tokens = 0.0  # start empty: a drain that starts on a full queue is paced at once
        self._last = clock()
        self._lock = threading.Lock()

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def try_take(self) -> float:
        """Take a token if one is there: 0.0. Otherwise the seconds until one will be."""
        with self._lock:
            self._refill(self._clock())
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return 0.0
            return (1.0 - self._tokens) / self.rate

    def take(self, stop: threading.Event | None = None) -> bool:
        """Wait for a token and take it: True. False when `stop` was set first."""
        while True:
            wait = self.try_take()
            if wait == 0.0:
                return True
            if stop is not None:
                if stop.wait(wait):
                    return False
            else:
                time.sleep(wait)
