"""`--shard I/N`: CI matrix job I of N (1-based) runs every N-th test of the sorted test ids.

Sorted ids make the split independent of the command line's order, and round-robin keeps the
shards within one test of each other in size; together the N shards run every test once.
"""

from __future__ import annotations

import re

from ..errors import UsageError
from .discover import TestFile


def parse(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise UsageError(f"--shard {text!r}: expected I/N, e.g. 2/4 (job 2 of 4, counting from 1)")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1:
        raise UsageError(f"--shard {text}: N must be at least 1")
    if not 1 <= i <= n:
        raise UsageError(f"--shard {text}: index {i} is out of range, it must be from 1 to {n}")
    return i, n


def select(tests: list[TestFile], index: int, count: int) -> list[TestFile]:
    """The tests of shard `index` (1-based) of `count`."""
    return [t for pos, t in enumerate(sorted(tests, key=lambda t: t.id)) if pos % count == index - 1]
