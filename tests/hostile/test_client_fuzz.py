"""Client-level fuzzing: random and mutated frames in answer to each request type.  Only the
project's own errors (NtngError) may escape a call, no thread may die of an exception, and the
client stays usable (a ping works) or is cleanly closed."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scripted_agent import ScriptedAgent, hostile, reader_alive

from ntng import protocol as P
from ntng.client import BackdoorClient
from ntng.errors import NtngError

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]

EXAMPLES = 150

VALID: dict[int, bytes] = {
    P.FrameType.EXIT: P.Exit(0, 0, False, 5).payload(),
    P.FrameType.FILE_DONE: P.FileDone(0, hashlib.sha256(b"").digest(), 0o644).payload(),
    P.FrameType.ERROR: P.Error(21, "no such file").payload(),
    P.FrameType.CREDIT: P.Credit(65536).payload(),
    P.FrameType.PONG: P.Pong(b"x" * 8).payload(),
    P.FrameType.ANNOUNCE: P.Announce("b00t", "fuzz", 1).payload(),
    P.FrameType.STDOUT: b"hello",
    P.FrameType.STDERR: b"oops",
    P.FrameType.FILE_DATA: b"data",
}


@st.composite
def payloads(draw: st.DrawFn, ftype: int) -> bytes:
    base = VALID.get(ftype, b"")
    kind = draw(st.sampled_from(["valid", "random", "truncated", "flipped", "extended"]))
    if kind == "valid" or (not base and kind != "random"):
        return base
    if kind == "random":
        return draw(st.binary(max_size=64))
    if kind == "truncated":
        return base[: draw(st.integers(0, max(0, len(base) - 1)))]
    if kind == "flipped":
        i = draw(st.integers(0, len(base) - 1))
        return base[:i] + bytes([base[i] ^ draw(st.integers(1, 255))]) + base[i + 1:]
    return base + draw(st.binary(min_size=1, max_size=16))


@st.composite
def answers(draw: st.DrawFn) -> list[tuple[str, int, int, bytes]]:
    """A list of (what, type, request id offset, payload): frames, noise, damaged frames."""
    out = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["frame", "frame", "frame", "noise", "bad-crc"]))
        ftype = draw(st.sampled_from(sorted(VALID)) | st.sampled_from(list(P.FrameType)) | st.integers(0, 255))
        rid = draw(st.sampled_from([0, 0, 0, 0, 1, -1]))  # 0: this request; 1: another; -1: handshake
        out.append((kind, ftype, rid, draw(payloads(ftype))))
    return out


def fuzz_script(request_types: set[int], frames: list[tuple[str, int, int, bytes]],
                final: Callable[[P.Frame], list[bytes]]) -> Callable[[ScriptedAgent], None]:
    def script(agent: ScriptedAgent) -> None:
        req = agent.recv_frame(10)
        while req.type not in request_types:
            req = agent.recv_frame(10)
        for kind, ftype, off, payload in frames:
            rid = P.HANDSHAKE_REQUEST_ID if off < 0 else req.request_id + off
            if kind == "noise":
                agent.send(payload)
                continue
            wire = bytearray(P.encode_frame(ftype, rid, payload))
            if kind == "bad-crc":
                wire[-1] ^= 0x55
            agent.send(bytes(wire))
        for wire in final(req):
            agent.send(wire)
        serve_honestly(agent)
    return script


def serve_honestly(agent: ScriptedAgent) -> None:
    """After the attack: answer HELLO and PING so the test can check the client is usable."""
    while True:
        f = agent.recv_frame(3600)
        if f.type == P.FrameType.HELLO:
            hello = P.Hello.parse(f.payload)
            agent.send(P.HelloAck(P.VERSION, hello.nonce, "fuzz", "b00t", "h", P.DEFAULT_MAX_FRAME,
                                  P.DEFAULT_WINDOW, 8, ["identity"]).frame(0))
        elif f.type == P.FrameType.PING:
            agent.send(P.pong_frame(f) or b"")


def check(call: Callable[[BackdoorClient], object], request_types: set[int],
          frames: list[tuple[str, int, int, bytes]], final: Callable[[P.Frame], list[bytes]]) -> None:
    with hostile(fuzz_script(request_types, frames, final)) as (client, agent):
        try:
            call(client)
        except NtngError:
            pass  # the only kind of error allowed out
        assert agent.error is None, repr(agent.error)
        if client.closed:
            assert isinstance(client._closed, NtngError), repr(client._closed)
            return
        assert reader_alive(client), "the reader thread died"
        client.ping(timeout=10)


def exit_frame(req: P.Frame) -> list[bytes]:
    return [P.Exit(0, 0, False, 1).frame(req.request_id)]


FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
CALL_TIMEOUT = 3.0


@FUZZ
@given(answers(), st.booleans())
def test_execute(frames: list[tuple[str, int, int, bytes]], with_stdin: bool) -> None:
    check(lambda c: c.execute(P.Exec(argv=["x"]), stdin=b"in" if with_stdin else None, wait=CALL_TIMEOUT),
          {P.FrameType.EXEC}, frames, exit_frame)


@FUZZ
@given(answers())
def test_set_identity(frames: list[tuple[str, int, int, bytes]]) -> None:
    check(lambda c: c.set_identity(P.Identity("h", "c", 0), timeout=CALL_TIMEOUT),
          {P.FrameType.IDENTITY}, frames, exit_frame)


@FUZZ
@given(answers())
def test_get_file(tmp_path_factory: pytest.TempPathFactory, frames: list[tuple[str, int, int, bytes]]) -> None:
    out = tmp_path_factory.mktemp("get")

    def final(req: P.Frame) -> list[bytes]:
        return [P.encode_frame(P.FrameType.FILE_DATA, req.request_id), VALID_FILE_DONE(req.request_id)]

    check(lambda c: c.get_file("/x", out / "got", timeout=CALL_TIMEOUT), {P.FrameType.FILE_GET}, frames, final)
    assert all(".ntng-partial" not in p.name for p in out.iterdir()), "a partial file was left"


def VALID_FILE_DONE(rid: int) -> bytes:  # noqa: N802 - reads as the constant it stands for
    return P.encode_frame(P.FrameType.FILE_DONE, rid, VALID[P.FrameType.FILE_DONE])


@FUZZ
@given(answers())
def test_put_file(tmp_path_factory: pytest.TempPathFactory, frames: list[tuple[str, int, int, bytes]]) -> None:
    src = tmp_path_factory.mktemp("put") / "src"
    src.write_bytes(b"payload" * 100)
    check(lambda c: c.put_file(src, "/tmp/x", timeout=CALL_TIMEOUT), {P.FrameType.FILE_PUT}, frames,
          lambda req: [VALID_FILE_DONE(req.request_id)])


@FUZZ
@given(answers())
def test_ping(frames: list[tuple[str, int, int, bytes]]) -> None:
    def final(req: P.Frame) -> list[bytes]:
        return [P.pong_frame(req) or b""]

    check(lambda c: c.ping(timeout=CALL_TIMEOUT), {P.FrameType.PING}, frames, final)

