"""QMP client against a fake QMP server on a socket pair: the human monitor through
human-monitor-command, and wait_for (wait_for_qmp_event's engine): filter, order, each event
once, a quick timeout naming what it waited for, and the bounded event log."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ntng import caps, check, qmp, testspec
from ntng.backends.qemu import MONITOR_COMMAND_TIMEOUT, QemuBackend
from ntng.errors import TestScriptError as ScriptError
from ntng.errors import WaitTimeout
from ntng.machine import Machine
from ntng.qmp import QMPClient, QMPError


class FakeQMP:
    """QEMU's side: greeting, replies to commands, and events sent when the test says."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._send({"QMP": {"version": {"qemu": {"major": 9}}, "capabilities": []}})
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _send(self, msg: dict[str, Any]) -> None:
        with self._lock:  # the server thread and the test both write
            self.sock.sendall(json.dumps(msg).encode() + b"\n")

    def event(self, name: str, **data: Any) -> None:
        self._send({"event": name, "data": data, "timestamp": {"seconds": 0, "microseconds": 0}})

    def _serve(self) -> None:
        buf = b""
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                self.received.append(msg)
                self._send({"id": msg["id"], "return": self._reply(msg)})

    def _reply(self, msg: dict[str, Any]) -> Any:
        if msg["execute"] == "human-monitor-command":
            return {"info status": "VM status: running\r\n"}.get(
                msg["arguments"]["command-line"], "unknown command\r\n")
        return {}


@pytest.fixture
def pair() -> Iterator[tuple[QMPClient, FakeQMP]]:
    ours, theirs = socket.socketpair()
    server = FakeQMP(theirs)
    client = QMPClient(ours, "m")
    client.negotiate(timeout=5)
    yield client, server
    client.close()
    theirs.close()


def wait_received(client: QMPClient, n: int) -> None:
    deadline = time.monotonic() + 5
    while client.received < n:
        assert time.monotonic() < deadline, f"{client.received} of {n} events arrived"
        time.sleep(0.01)


def test_monitor_command_goes_through_human_monitor_command(pair: tuple[QMPClient, FakeQMP], tmp_path: Path) -> None:
    client, server = pair
    backend = QemuBackend("m", {"files": {"disk": str(tmp_path / "disk")}, "stateDir": str(tmp_path)})
    backend.qmp = client
    assert backend.monitor_command("info status") == "VM status: running\r\n"
    assert server.received[-1]["execute"] == "human-monitor-command"
    assert server.received[-1]["arguments"] == {"command-line": "info status"}
    assert MONITOR_COMMAND_TIMEOUT > 30  # HMP commands may do real work (drive_add, savevm)


def test_wait_for_returns_the_first_match_and_hands_each_event_out_once(pair: tuple[QMPClient, FakeQMP]) -> None:
    client, server = pair
    server.event("STOP")
    server.event("RESUME", n=1)  # before the wait: still counts (trigger first, then wait)
    wait_received(client, 2)
    assert client.wait_for(lambda e: e["event"] == "RESUME", timeout=5)["data"] == {"n": 1}
    def later() -> None:
        server.event("STOP")
        server.event("RESUME", n=2)

    threading.Timer(0.2, later).start()
    # The first RESUME was handed out: the wait gets the one that comes later.
    assert client.wait_for(lambda e: e["event"] == "RESUME", timeout=5)["data"] == {"n": 2}
    # wait_event (SHUTDOWN after a reboot) reads the log without consuming it.
    assert client.wait_event({"STOP"}, timeout=1)["event"] == "STOP"


def test_timeout_is_quick_and_names_the_filter_and_what_passed(pair: tuple[QMPClient, FakeQMP]) -> None:
    client, server = pair
    server.event("STOP")
    server.event("NIC_RX_FILTER_CHANGED")
    wait_received(client, 2)
    t0 = time.monotonic()
    with pytest.raises(WaitTimeout) as e:
        client.wait_for(lambda e: e["event"] == "RESUME", timeout=0.3)
    assert 0.3 <= time.monotonic() - t0 < 2
    msg = str(e.value)
    assert msg.startswith("m: no QMP event matching ")
    assert 'lambda e: e["event"] == "RESUME"' in msg and "test_qmp.py:" in msg
    assert msg.endswith("within 0.3s (2 other event(s) passed over, the last: STOP, NIC_RX_FILTER_CHANGED)")
    with pytest.raises(WaitTimeout, match=r"within 0.1s \(no events came\)$"):
        client.wait_for(lambda e: True, timeout=0.1)


def test_named_filter_is_named(pair: tuple[QMPClient, FakeQMP]) -> None:
    client, _ = pair

    def usb_attached(event: dict[str, Any]) -> bool:
        return bool(event["event"] == "DEVICE_ADDED")

    with pytest.raises(WaitTimeout, match="matching .*usb_attached at test_qmp.py:"):
        client.wait_for(usb_attached, timeout=0)


def test_event_log_is_bounded_and_dropped_events_are_named(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qmp, "MAX_QUEUED_EVENTS", 5)
    ours, theirs = socket.socketpair()
    server = FakeQMP(theirs)
    client = QMPClient(ours, "m")
    try:
        client.negotiate(timeout=5)
        for n in range(12):
            server.event("STOP", n=n)
        wait_received(client, 12)
        assert len(client.events) == 5
        first = client.next_event(0)
        assert first is not None and first["data"] == {"n": 7}  # the oldest still kept
        assert client.dropped_unread == 7
        with pytest.raises(WaitTimeout, match=r"; 7 event\(s\) were dropped unread \(more than 5 queued\)\)$"):
            client.wait_for(lambda e: e["event"] == "RESUME", timeout=0)
        assert client.next_event(0) is None  # the others were read (passed over) by the wait
        assert client.wait_event({"STOP"}, timeout=0, since=11)["data"] == {"n": 11}
    finally:
        client.close()
        theirs.close()


def test_a_closed_connection_ends_the_wait_naming_it(pair: tuple[QMPClient, FakeQMP]) -> None:
    client, server = pair
    server.event("STOP")
    wait_received(client, 1)
    threading.Timer(0.2, server.sock.shutdown, (socket.SHUT_RDWR,)).start()  # QEMU exits
    t0 = time.monotonic()
    with pytest.raises(QMPError, match="QMP connection closed while waiting for an event .*matching .*RESUME"):
        client.wait_for(lambda e: e["event"] == "RESUME", timeout=30)
    assert time.monotonic() - t0 < 5


# -- Machine: the methods are QEMU's (capability "monitor") ---------------------------------------

NODES = """\
#: nodes.a = { };
#: nodes.b = { backend = "firecracker"; accel = "kvm"; };
#: nodes.c = { backend = "cloud-hypervisor"; accel = "kvm"; };
"""
SCRIPT = NODES + """\
start_all()
a.send_monitor_command("info status"); a.wait_for_qmp_event(lambda e: True, timeout=1)
b.send_monitor_command("info usb")
c.wait_for_qmp_event(lambda e: e["event"] == "RESUME")
"""


def test_ntng_check_names_the_missing_monitor_capability(tmp_path: Path) -> None:
    p = tmp_path / "t.py"
    p.write_text(SCRIPT)
    with pytest.raises(ScriptError) as e:
        check.check(p, type_check=False)
    assert str(e.value).splitlines() == [
        f'{p}:6: error: b.send_monitor_command(): backend firecracker lacks capability "monitor" '
        "(it has: snapshot, networks, block, console, consoleInput)",
        f'{p}:7: error: c.wait_for_qmp_event(): backend cloud-hypervisor lacks capability "monitor" '
        "(it has: snapshot, sharedDirs, networks, block, reboot, console)",
    ]


def test_run_time_guard_names_the_missing_monitor_capability(tmp_path: Path) -> None:
    p = tmp_path / "t.py"
    p.write_text(NODES + "start_all()\n")
    spec = testspec.load(p, {"kernel": "/k", "vmlinux": "/v", "initrd": "/i", "image": "/img",
                             "imageFormat": "raw", "accel": "kvm", "stateRoot": "/nonexistent/state"})
    b = Machine("b", spec.plans["b"], tmp_path, boot_timeout=1)
    with pytest.raises(caps.MissingCapability, match=r'^machine b: send_monitor_command\(\): backend '
                       r'firecracker lacks capability "monitor"'):
        b.send_monitor_command("info status")
    c = Machine("c", spec.plans["c"], tmp_path, boot_timeout=1)
    with pytest.raises(caps.MissingCapability, match=r'^machine c: wait_for_qmp_event\(\): backend cloud-hypervisor'):
        c.wait_for_qmp_event(lambda e: True)
    assert "monitor" in spec.plans["a"]["capabilities"]["features"]
    assert not b.booted and b.backend.proc is None
