"""get_file from a hostile guest: no setuid/setgid/sticky or world-writable bits on the host,
no writing through a symlink planted at the partial file's name, a size limit."""

from __future__ import annotations

import hashlib
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from scripted_agent import MiB, ScriptedAgent, hostile, request_id

from ntng import client as C
from ntng import protocol as P
from ntng.errors import BackdoorError, FileTooLarge

pytestmark = [pytest.mark.timeout(60)]

DATA = b"#!/bin/sh\nid\n"


def serve_file(mode: int, data: bytes = DATA) -> Callable[[ScriptedAgent], None]:
    def script(agent: ScriptedAgent) -> None:
        rid = request_id(agent, P.FrameType.FILE_GET)
        agent.send_frame(P.FrameType.FILE_DATA, rid, data)
        agent.send_frame(P.FrameType.FILE_DATA, rid)
        agent.send(P.FileDone(len(data), hashlib.sha256(data).digest(), mode).frame(rid))
        agent.drain_forever()
    return script


@pytest.mark.parametrize("mode", [0o6777, 0o4755, 0o2755, 0o1777, 0o666, 0o7000])
def test_no_setuid_setgid_sticky_or_world_writable_bits(tmp_path: Path, mode: int) -> None:
    with hostile(serve_file(mode)) as (client, _agent):
        client.get_file("/bin/evil", tmp_path / "evil", timeout=5)
    got = stat.S_IMODE((tmp_path / "evil").stat().st_mode)
    assert got == mode & 0o755, oct(got)
    assert (tmp_path / "evil").read_bytes() == DATA


def test_a_symlink_at_the_partial_name_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    victim.chmod(0o600)
    outdir = tmp_path / "out"
    outdir.mkdir()
    (outdir / ".got.ntng-partial").symlink_to(victim)  # the name the client used to write to
    with hostile(serve_file(0o777)) as (client, _agent):
        client.get_file("/x", outdir / "got", timeout=5)
    assert victim.read_bytes() == b"precious\n" and stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert (outdir / "got").read_bytes() == DATA and not (outdir / "got").is_symlink()
    assert sorted(p.name for p in outdir.iterdir() if not p.is_symlink()) == ["got"]


def test_the_partial_file_is_private_while_it_is_written(tmp_path: Path) -> None:
    seen: list[int] = []

    def script(agent: ScriptedAgent) -> None:
        rid = request_id(agent, P.FrameType.FILE_GET)
        agent.send_frame(P.FrameType.FILE_DATA, rid, DATA)
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:  # look at the partial file meanwhile
            seen.extend(stat.S_IMODE(p.lstat().st_mode) for p in tmp_path.iterdir())
            time.sleep(0.01)
        agent.send_frame(P.FrameType.FILE_DATA, rid)
        agent.send(P.FileDone(len(DATA), hashlib.sha256(DATA).digest(), 0o644).frame(rid))
        agent.drain_forever()

    with hostile(script) as (client, _agent):
        client.get_file("/x", tmp_path / "got", timeout=10)
    assert seen == [0o600]
    assert stat.S_IMODE((tmp_path / "got").stat().st_mode) == 0o644


def test_endless_file_data_stops_at_the_size_limit(tmp_path: Path) -> None:
    chunk = bytes(P.CHUNK)

    def script(agent: ScriptedAgent) -> None:
        rid = request_id(agent, P.FrameType.FILE_GET)
        credit = P.DEFAULT_WINDOW
        frame = P.encode_frame(P.FrameType.FILE_DATA, rid, chunk)
        while True:  # honest flow control, but the file never ends
            while credit >= len(chunk):
                agent.send(frame)
                credit -= len(chunk)
            credit += P.Credit.parse(agent.expect(P.FrameType.CREDIT).payload).amount

    with hostile(script) as (client, _agent):
        with pytest.raises(FileTooLarge, match=r"8388608 bytes.*max_size") as info:
            client.get_file("/dev/zero", tmp_path / "zero", timeout=20, max_size=8 * MiB)
        assert isinstance(info.value, BackdoorError)
        assert list(tmp_path.iterdir()) == []  # the partial file is gone


def test_default_size_limit_is_stated() -> None:
    assert C.DEFAULT_MAX_FILE_SIZE >= 4 * 1024 * MiB
