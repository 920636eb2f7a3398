"""A guest that answers with malformed frames, or with a stream of fake headers that each cost
a full CRC: the host raises the project's own errors, names the request and the frame, keeps
its reader thread alive, and closes a link past its budget of bytes that failed their CRC."""

from __future__ import annotations

import struct
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from scripted_agent import MiB, ScriptedAgent, hostile, pong_forever, reader_alive, request_id

from ntng import client as C
from ntng import protocol as P
from ntng.errors import BackdoorError, GuestMisbehaved, NtngError

pytestmark = [pytest.mark.timeout(60)]


def answer_each_request_with(ftype: int, payload: bytes) -> Callable[[ScriptedAgent], None]:
    """Answer every request with one frame of `ftype`, PINGs with PONGs (a usable link)."""
    def script(agent: ScriptedAgent) -> None:
        while True:
            f = agent.recv_frame(60)
            if f.type == P.FrameType.PING:
                agent.send(P.pong_frame(f) or b"")
            elif f.type in (P.FrameType.EXEC, P.FrameType.FILE_GET, P.FrameType.FILE_PUT,
                            P.FrameType.IDENTITY):
                if f.type == P.FrameType.FILE_GET:
                    agent.send_frame(P.FrameType.FILE_DATA, f.request_id)
                agent.send_frame(ftype, f.request_id, payload)
    return script


MALFORMED = [(P.FrameType.EXIT, b"\x00"), (P.FrameType.FILE_DONE, b"\x01\x02"),
             (P.FrameType.ERROR, b"\x00\x01\xff")]


def _calls(tmp_path: Path) -> dict[str, Callable[[C.BackdoorClient], object]]:
    src = tmp_path / "src"
    src.write_bytes(b"x" * 1000)
    return {
        "execute": lambda c: c.execute(P.Exec(argv=["true"]), wait=5),
        "get_file": lambda c: c.get_file("/etc/hostname", tmp_path / "got", timeout=5),
        "put_file": lambda c: c.put_file(src, "/tmp/x", timeout=5),
        "set_identity": lambda c: c.set_identity(P.Identity("h", "c", 0), timeout=5),
    }


@pytest.mark.parametrize("ftype,payload", MALFORMED, ids=lambda v: getattr(v, "name", ""))
@pytest.mark.parametrize("call", ["execute", "get_file", "put_file", "set_identity"])
def test_malformed_answer_is_a_backdoor_error_naming_request_and_frame(
    tmp_path: Path, call: str, ftype: P.FrameType, payload: bytes
) -> None:
    with hostile(answer_each_request_with(ftype, payload)) as (client, _agent):
        with pytest.raises(NtngError) as info:
            _calls(tmp_path)[call](client)
        assert isinstance(info.value, BackdoorError), repr(info.value)
        msg = str(info.value)
        assert ftype.name in msg and "request" in msg, msg
        assert reader_alive(client) and not client.closed
        client.ping(timeout=5)  # the link still works


def test_stdin_feeder_errors_are_reported() -> None:
    """A stdin iterable that fails half-way: the command's EXIT must not hide the failure."""
    def script(agent: ScriptedAgent) -> None:
        rid = request_id(agent, P.FrameType.EXEC)
        agent.expect(P.FrameType.STDIN)
        time.sleep(0.3)  # the feeder fails meanwhile
        agent.send(P.Exit(0, 0, False, 1).frame(rid))
        agent.drain_forever()

    def stdin() -> Iterator[bytes]:
        yield b"first chunk"
        raise OSError("the test's stdin source broke")

    with hostile(script) as (client, _agent):
        with pytest.raises(BackdoorError, match="stdin.*the test's stdin source broke"):
            client.execute(P.Exec(argv=["cat"]), stdin=stdin(), wait=5)


# -- the CRC budget --------------------------------------------------------------------------


def fake_headers(total: int) -> bytes:
    """Back-to-back headers with a valid header CRC and the largest length: each makes the
    decoder wait for and CRC a whole frame, then skip just its magic and find the next one."""
    head = struct.pack(">4sBBHII", P.MAGIC, P.VERSION, P.FrameType.STDOUT, 0, 1, P.DEFAULT_MAX_FRAME)
    one = head + zlib.crc32(head).to_bytes(4, "big")
    return one * (total // len(one))


def test_crc_attack_is_cheap_and_closes_the_link() -> None:
    attack = fake_headers(1_250_000) + bytes(P.DEFAULT_MAX_FRAME + 64)  # 1.25 MB, then padding

    def script(agent: ScriptedAgent) -> None:
        try:
            agent.send(attack)
        except OSError:
            pass  # the host closed the link before it had all of it

    t0, cpu0 = time.monotonic(), time.process_time()
    with hostile(lambda a: None) as (client, agent):
        script(agent)
        deadline = time.monotonic() + 20
        while not client.closed and time.monotonic() < deadline:
            time.sleep(0.01)
        cpu = time.process_time() - cpu0
        print(f"measured: CRC attack: 1.25 MB of fake headers cost {cpu:.3f}s CPU, "
              f"{time.monotonic() - t0:.3f}s wall; link closed: {client.closed}")
        assert client.closed, "the link must be closed once the CRC budget is spent"
        with pytest.raises(GuestMisbehaved, match=r"corrupt frames: \d+ bytes failed their CRC, the link is closed"):
            client.ping(timeout=1)
    assert cpu < 1.0, f"{cpu:.2f}s of CPU for 1.25 MB of input"


def test_a_few_damaged_frames_stay_within_the_budget() -> None:
    """Occasional corruption (a guest reset mid-frame) is skipped, the link goes on."""
    frame = bytearray(P.encode_frame(P.FrameType.STDOUT, 7, bytes(P.DEFAULT_MAX_FRAME)))
    frame[-1] ^= 0xFF  # a bad trailer CRC

    with hostile(pong_forever) as (client, agent):
        for _ in range(4):
            agent.send(bytes(frame))
        client.ping(timeout=5)
        assert not client.closed and client.garbage_bytes >= 4


def test_budget_constant_is_stated() -> None:
    assert C.MAX_CRC_FAILED_BYTES >= 4 * (P.DEFAULT_MAX_FRAME + P.HEADER_SIZE + P.TRAILER_SIZE)
    assert C.MAX_CRC_FAILED_BYTES <= 64 * MiB
