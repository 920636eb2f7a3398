"""The console as lines under a flooding guest: CPU linear in the bytes (no re-copy of a line
without a newline), memory bounded (a capped line length and a bounded in-memory tail), the
artifact streamed to disk as it arrives and capped, with one truncation marker."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from ntng.backends import console as console_mod
from ntng.backends.console import ConsoleLines, Read

MiB = 1024 * 1024


def lines_from(chunks: Iterable[bytes], artifact: Path | None = None) -> ConsoleLines:
    c = ConsoleLines()
    c._init_console()
    c.console_artifact = artifact
    it = iter(chunks)
    read: Read = lambda: next(it, b"")  # noqa: E731
    c._pump_console(read)
    c.close_console_artifact()
    return c


def flood(no_newline: int, lines: int) -> Iterator[bytes]:
    """`no_newline` bytes of one endless line, then `lines` short lines, in 64 KiB reads."""
    block = b"x" * 65536
    for _ in range(no_newline // len(block)):
        yield block
    yield b"\n"
    thousand = b"".join(b"line %d of a chatty guest\n" % i for i in range(1000))
    for _ in range(lines // 1000):
        yield thousand


def test_64_mib_without_newline_and_a_million_lines_cost_little_cpu(tmp_path: Path) -> None:
    """Before: every read re-copied and re-split the whole unfinished line (64 MiB: ~30 s of CPU,
    quadratic).  Now each byte is looked at once."""
    t0 = time.thread_time()
    c = lines_from(flood(64 * MiB, 1_000_000), tmp_path / "console.log")
    took = time.thread_time() - t0
    print(f"64 MiB without newline + 1,000,000 lines through _pump_console: {took:.2f}s CPU")
    assert took < 10
    assert c.console_tail(1) == "line 999 of a chatty guest"


def test_memory_stays_bounded_whatever_the_guest_prints(tmp_path: Path) -> None:
    tracemalloc.start()
    try:
        c = lines_from(flood(32 * MiB, 200_000), tmp_path / "console.log")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"peak traced memory pumping 32 MiB + 200,000 lines: {peak / MiB:.1f} MiB")
    bound = console_mod.CONSOLE_TAIL_CHARS * 2 + 4 * console_mod.CONSOLE_MAX_LINE + 4 * MiB
    assert peak < bound
    kept = c.get_console_lines()
    assert sum(len(line) for line in kept) <= console_mod.CONSOLE_TAIL_CHARS
    assert kept[-1] == "line 999 of a chatty guest"


def test_a_long_line_is_split_at_the_stated_length() -> None:
    n = console_mod.CONSOLE_MAX_LINE
    c = lines_from([b"a" * (n // 2), b"a" * n, b"a" * n + b"tail\nnext"])
    got = c.get_console_lines()
    assert [len(x) for x in got] == [n, n, n // 2 + 4, 4]
    assert got[-2].endswith("tail") and got[-1] == "next"


def test_crlf_and_callbacks_see_each_line() -> None:
    c = ConsoleLines()
    c._init_console()
    seen: list[str] = []
    c.console_callbacks.append(seen.append)
    it = iter([b"one\r\ntw", b"o\n", b"three"])
    c._pump_console(lambda: next(it, b""))
    assert seen == c.get_console_lines() == ["one", "two", "three"]


def test_the_artifact_is_written_as_lines_arrive(tmp_path: Path) -> None:
    path = tmp_path / "m" / "console.log"
    c = ConsoleLines()
    c._init_console()
    c.console_artifact = path
    chunks = iter([b"first\n", b"second\n"])

    def read() -> bytes:
        data = next(chunks, None)
        if data is None:  # before the end: the lines are on disk already
            assert path.read_text() == "first\nsecond\n"
            return b""
        return data

    c._pump_console(read)
    c.close_console_artifact()
    assert path.read_text() == "first\nsecond\n"


def test_the_artifact_is_capped_with_one_marker_and_the_last_lines(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console_mod, "CONSOLE_ARTIFACT_BYTES", 1000)
    path = tmp_path / "console.log"
    c = lines_from([b"".join(b"line %04d\n" % i for i in range(1000))], path)
    text = path.read_text()
    assert text.startswith("line 0000\nline 0001\n")
    assert text.count("truncated") == 1
    assert "CONSOLE_ARTIFACT_BYTES" in text
    assert text.endswith("line 0999\n")
    assert len(text) < 1000 + console_mod.CONSOLE_TAIL_CHARS + 1000
    assert all(text.count(f"line {i:04d}\n") <= 1 for i in range(1000))  # none written twice
    assert c.get_console_lines()[-1] == "line 0999"


def test_an_artifact_appended_across_boots_shares_one_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console_mod, "CONSOLE_ARTIFACT_BYTES", 100)
    path = tmp_path / "console.log"
    lines_from([b"boot one\n" * 5], path)  # 45 bytes
    lines_from([b"boot two\n" * 20], path)  # over the cap: marker
    lines_from([b"boot three\n"], path)  # nothing more but its tail after another marker
    text = path.read_text()
    assert text.startswith("boot one\n" * 5)
    assert len(text.split("boot two\n")) > 2
    assert text.endswith("boot three\n")
