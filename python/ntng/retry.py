"""retry: the NixOS driver's wait loop (a test-script global, and what every Machine wait uses).

A leaf module: the driver, the Machine and polling conditions all import it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .errors import RequestedAssertionFailed

PROGRESS_EVERY = 10.0  # seconds between "still waiting" lines


def retry(fn: Callable[[bool], Any], timeout_seconds: int | float = 900,
          progress: Callable[[float], None] | None = None) -> None:
    """Call fn(False) every second until it returns truthy; then one last fn(True).
    progress(elapsed) is called about every PROGRESS_EVERY seconds of waiting."""
    start = time.monotonic()
    next_progress = start + PROGRESS_EVERY
    while time.monotonic() - start < timeout_seconds:
        if fn(False):
            return
        time.sleep(1)
        if progress is not None and time.monotonic() >= next_progress:
            progress(time.monotonic() - start)
            next_progress = time.monotonic() + PROGRESS_EVERY
    elapsed = time.monotonic() - start
    if not fn(True):
        raise RequestedAssertionFailed(
            f"action timed out after {elapsed:.2f} seconds (timeout={timeout_seconds})"
        )
