"""A guest that stops reading (or never grants credit): every call returns within its timeout
plus the stated grace with a project error, and the reader thread's own sends are bounded."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from scripted_agent import MiB, ScriptedAgent, hostile, request_id

from ntng import client as C
from ntng import protocol as P
from ntng.errors import ConnectionLost, NtngError, WaitTimeout

pytestmark = [pytest.mark.timeout(60)]

GRACE = 2.0  # what the client promises past a call's timeout (client.SEND_GRACE and overhead)


def outcome(fn: Callable[[], object], limit: float) -> tuple[float, BaseException | object]:
    """Run fn in a thread; (seconds it took, what it returned or raised).  Fails the test when
    it is still blocked after `limit` seconds (the thread is left behind, a daemon)."""
    q: queue.SimpleQueue[tuple[float, object]] = queue.SimpleQueue()
    t0 = time.monotonic()

    def run() -> None:
        try:
            r: object = fn()
        except BaseException as e:  # noqa: BLE001 - returned to the test
            r = e
        q.put((time.monotonic() - t0, r))

    threading.Thread(target=run, daemon=True).start()
    try:
        return q.get(timeout=limit)
    except queue.Empty:
        pytest.fail(f"still blocked after {limit:.1f}s")


def stop_reading(agent: ScriptedAgent) -> None:
    """After the handshake, the guest reads nothing more (an agent under SIGSTOP)."""
    agent.reading = False
    time.sleep(3600)


@pytest.fixture
def big_file(tmp_path: Path) -> Path:
    p = tmp_path / "big"
    p.write_bytes(b"\xa5" * (8 * MiB))
    return p


def test_put_file_to_a_guest_that_stopped_reading_returns_in_time(big_file: Path) -> None:
    with hostile(stop_reading, sndbuf=64 * 1024) as (client, _agent):
        took, r = outcome(lambda: client.put_file(big_file, "/tmp/big", timeout=3), 3 + GRACE + 1)
        print(f"measured: put_file(timeout=3) with a guest that stopped reading: {r!r} after {took:.2f}s")
        assert isinstance(r, NtngError), repr(r)
        assert took <= 3 + GRACE
        assert "stopped reading" in str(r) or isinstance(r, WaitTimeout), str(r)
        # Later calls do not hang behind the stuck one.
        took, r = outcome(lambda: client.ping(timeout=2), 2 + GRACE + 1)
        assert isinstance(r, NtngError) and took <= 2 + GRACE, (took, r)
        took, r = outcome(lambda: client.execute(P.Exec(argv=["true"]), wait=2), 2 + GRACE + 1)
        assert isinstance(r, NtngError) and took <= 2 + GRACE, (took, r)


def test_ping_and_execute_while_another_send_is_stuck(big_file: Path) -> None:
    """One call's send is stuck (its timeout is long): a ping and an execute with short
    timeouts still return within theirs."""
    with hostile(stop_reading, sndbuf=64 * 1024) as (client, _agent):
        threading.Thread(target=lambda: _ignore(lambda: client.put_file(big_file, "/x", timeout=30)),
                         daemon=True).start()
        time.sleep(0.5)  # the put is now blocked in a send
        took, r = outcome(lambda: client.ping(timeout=2), 2 + GRACE + 1)
        assert isinstance(r, WaitTimeout) and took <= 2 + GRACE, (took, r)
        took, r = outcome(lambda: client.execute(P.Exec(argv=["true"]), wait=2), 2 + GRACE + 1)
        assert isinstance(r, NtngError) and took <= 2 + GRACE, (took, r)


def _ignore(fn: Callable[[], object]) -> None:
    try:
        fn()
    except NtngError:
        pass


def test_put_file_without_credit_raises_wait_timeout(big_file: Path) -> None:
    """The guest reads but never grants credit: a WaitTimeout (the project's type), not the
    builtin TimeoutError of protocol.SendWindow."""
    def script(agent: ScriptedAgent) -> None:
        request_id(agent, P.FrameType.FILE_PUT)
        agent.drain_forever()

    with hostile(script) as (client, _agent):
        took, r = outcome(lambda: client.put_file(big_file, "/tmp/big", timeout=2), 2 + GRACE + 1)
        assert type(r) is WaitTimeout, repr(r)
        assert "credit" in str(r) and took <= 2 + GRACE


def test_reader_thread_sends_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """ANNOUNCEs from a guest that reads nothing: the reader thread's HELLO answers fill the
    socket, and the reader must not block on them for ever (READER_SEND_TIMEOUT)."""
    monkeypatch.setattr(C, "READER_SEND_TIMEOUT", 1.0, raising=False)
    announce = P.Announce("b00t", "scripted", 0).frame(P.HANDSHAKE_REQUEST_ID)

    def script(agent: ScriptedAgent) -> None:
        agent.reading = False
        time.sleep(0.5)  # let the client see the first HELLO_ACK
        for _ in range(100_000):
            agent.send(announce)

    with hostile(script, sndbuf=16 * 1024) as (client, _agent):
        deadline = time.monotonic() + 1.0 + GRACE + 3
        while not client.closed and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.closed, "the reader stayed blocked in a send"
        with pytest.raises(ConnectionLost, match="stopped reading"):
            client.ping(timeout=1)


def test_pending_requests_fail_when_a_send_deadline_closes_the_link(big_file: Path) -> None:
    def script(agent: ScriptedAgent) -> None:
        request_id(agent, P.FrameType.EXEC)
        stop_reading(agent)

    with hostile(script, sndbuf=64 * 1024) as (client, _agent):
        waiting = threading.Thread(target=lambda: _ignore(
            lambda: client.execute(P.Exec(argv=["sleep", "100"]), wait=60)), daemon=True)
        waiting.start()
        time.sleep(0.3)
        took, r = outcome(lambda: client.put_file(big_file, "/tmp/big", timeout=2), 2 + GRACE + 1)
        assert isinstance(r, NtngError)
        waiting.join(GRACE)
        assert not waiting.is_alive(), "the pending execute was not failed with the link"
