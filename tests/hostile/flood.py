"""One flood scenario in a process of its own, so its peak RSS (VmHWM) means something:
`python flood.py SCENARIO MIB` prints one JSON line: the baseline RSS after the handshake,
the peak, the error the client raised, the time taken."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scripted_agent import MiB, ScriptedAgent, hostile, request_id  # noqa: E402

from ntng import protocol as P  # noqa: E402
from ntng.client import BackdoorClient  # noqa: E402
from ntng.errors import NtngError  # noqa: E402

CHUNK = bytes(P.CHUNK)


def status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


class Flood:
    """The guest's side of one scenario: `total` bytes of attack, then done.set()."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = threading.Event()
        self.signals: list[int] = []

    def stdout_within_credit(self, agent: ScriptedAgent) -> None:
        rid = request_id(agent, P.FrameType.EXEC)
        frame = P.encode_frame(P.FrameType.STDOUT, rid, CHUNK)
        credit, sent = P.DEFAULT_WINDOW, 0
        while sent < self.total:
            while credit >= len(CHUNK) and sent < self.total:
                agent.send(frame)
                credit -= len(CHUNK)
                sent += len(CHUNK)
            f = agent.recv_frame(30)
            if f.type == P.FrameType.CREDIT:
                credit += P.Credit.parse(f.payload).amount
            elif f.type == P.FrameType.SIGNAL:
                self.signals.append(P.Signal.parse(f.payload).signum)
                agent.send(P.Exit(-1, self.signals[-1], False, 1).frame(rid))
                break
        else:
            agent.send(P.Exit(0, 0, False, 1).frame(rid))
        self.done.set()
        agent.drain_forever()

    def stdout_ignoring_credit(self, agent: ScriptedAgent) -> None:
        rid = request_id(agent, P.FrameType.EXEC)
        agent.drain_forever()
        frame = P.encode_frame(P.FrameType.STDOUT, rid, CHUNK)
        for _ in range(self.total // len(CHUNK)):
            agent.send(frame)
        agent.send(P.Exit(0, 0, False, 1).frame(rid))
        self.done.set()

    def control_flood(self, agent: ScriptedAgent) -> None:
        """Control frames (here EXIT-typed, the largest payload allowed) for a put_file whose
        caller is stuck waiting for credit, so nothing takes them off its queue."""
        rid = request_id(agent, P.FrameType.FILE_PUT)
        agent.drain_forever()
        time.sleep(0.5)  # let the caller use up its window first, as a slow CI machine did
        frame = P.encode_frame(P.FrameType.EXIT, rid, bytes(P.DEFAULT_MAX_FRAME))
        for _ in range(self.total // len(frame)):
            agent.send(frame)
        self.done.set()

    def unknown_ids(self, agent: ScriptedAgent) -> None:
        """Data for requests nobody made, PONGs for pings nobody sent."""
        frames = [P.encode_frame(P.FrameType.STDOUT, 4242, CHUNK),
                  P.encode_frame(P.FrameType.EXIT, 4243, CHUNK),
                  P.Pong(os.urandom(P.CHUNK)).frame(P.HANDSHAKE_REQUEST_ID)]
        sent = 0
        while sent < self.total:
            for f in frames:
                agent.send(f)
                sent += len(f)
        self.done.set()
        while True:  # answer pings honestly afterwards: the client must still be usable
            f = agent.expect(P.FrameType.PING, 60)
            agent.send(P.pong_frame(f) or b"")


def run(scenario: str, total: int) -> dict[str, object]:
    flood = Flood(total)
    script = getattr(flood, {"default_limit": "stdout_within_credit",
                             "huge_window": "stdout_ignoring_credit"}.get(scenario, scenario))
    ack = {"window": 0xFFFFFFFF} if scenario == "huge_window" else {}
    result: dict[str, object] = {"scenario": scenario, "flood_mib": total // MiB}
    def attack(agent: ScriptedAgent) -> None:
        try:
            script(agent)
        finally:
            flood.done.set()  # also when the host closed the link under it

    with tempfile.TemporaryDirectory() as tmp, hostile(attack, **ack) as (client, _agent):
        result["base_mib"] = status_mib("VmRSS")
        t0 = time.monotonic()
        try:
            call(scenario, client, Path(tmp))
            result["error"] = None
        except NtngError as e:
            result["error"], result["message"] = type(e).__name__, str(e)
        except BaseException as e:  # noqa: BLE001 - reported: only project errors may escape
            result["error"], result["message"] = "NOT-A-PROJECT-ERROR " + type(e).__name__, str(e)
        flood.done.wait(120)  # memory must stay bounded while the guest keeps flooding
        result["seconds"] = round(time.monotonic() - t0, 2)
        if scenario == "unknown_ids":
            client.ping(timeout=10)
            result["pongs_waiting"] = len(client._pongs)
        result["closed"] = client.closed
        result["signals"] = flood.signals
    result["peak_mib"] = status_mib("VmHWM")
    return result


def call(scenario: str, client: BackdoorClient, tmp: Path) -> None:
    if scenario == "stdout_within_credit":
        client.execute(P.Exec(argv=["yes"]), wait=120, max_output=32 * MiB)
    elif scenario in ("stdout_ignoring_credit", "huge_window"):
        # A consumer slower than the flood: only the receive window bounds what is queued.
        client.execute(P.Exec(argv=["yes"]), wait=120, on_stdout=lambda b: time.sleep(0.001))
    elif scenario == "default_limit":
        client.execute(P.Exec(argv=["yes"]), wait=120)
    elif scenario == "control_flood":
        # Larger than the send window, so the caller stays in its wait for credit (which
        # the scripted agent never gives) and no EXIT is taken off the queue: a file that
        # fits the window raced the flood (CI: the copy was sent before 5 frames queued).
        src = tmp / "big"
        src.write_bytes(bytes(4 * P.DEFAULT_WINDOW))
        client.put_file(src, "/tmp/big", timeout=120)


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1], int(sys.argv[2]) * MiB)), flush=True)
