"""Polling until something holds, for the tests that wait on a broker or a bridge."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(pred: Callable[[], bool], timeout: float, what: str,
               step: float = 0.05) -> float:
    """Poll `pred` every `step` s until it is true; the seconds that took.
    Not within `timeout` s: AssertionError naming `what`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if pred():
            return time.monotonic() - start
        time.sleep(step)
    raise AssertionError(f"not within {timeout} s: {what}")
