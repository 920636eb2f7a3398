"""A hostile guest's file listings and shares cannot make the host write outside the run folder,
follow a symlink, or keep setuid bits.

copy_from_machine is the real Machine code, called on a stand-in machine whose execute() returns
the listing a hostile guest chose (whatever the command asked for) and whose client's get_file
writes the way client.get_file does (a partial file next to the target, then a rename): the
listing is the attack surface and nothing else on that path needs a VM or an agent.  Share
copies use a real host folder; the "guest" is a local shell whose view of the share is the host
folder itself, which is what a share is.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ntng import shares
from ntng.errors import NtngError, UnsafePath
from ntng.machine import Machine

Record = tuple[str, str]  # (find's %y type letter, path below the copied folder)


class StubClient:
    def __init__(self) -> None:
        self.got: list[tuple[str, Path]] = []

    def get_file(self, source: str, target: Path | str) -> None:
        target = Path(target)
        self.got.append((source, target))
        tmp = target.with_name(f".{target.name}.ntng-partial")
        with open(tmp, "wb") as out:
            out.write(f"content of {source}\n".encode())
        os.replace(tmp, target)


class HostileMachine:
    """What copy_from_machine uses of a Machine; the listing is the guest's choice."""

    name = "evil"
    plan: dict[str, Any] = {}
    _copy_listed = getattr(Machine, "_copy_listed", None)  # the real code (absent before the fix)

    def __init__(self, out_dir: Path, records: list[Record], root: str = "d") -> None:
        self.out_dir = out_dir
        self.records = records
        self.root = root
        self.client = StubClient()
        self.logged: list[str] = []

    def log(self, msg: str) -> None:
        self.logged.append(msg)

    def connect(self) -> StubClient:
        return self.client

    def execute(self, command: str, **_: Any) -> tuple[int, str]:
        if "-printf" in command:  # typed records
            return 0, self.root + "\0" + "".join(f"{t} {p}\0" for t, p in self.records)
        return 0, "".join(f"{p}\0" for t, p in self.records if t == "f")  # find -type f -print0


def copy(m: HostileMachine, source: str, target_dir: str = "") -> None:
    Machine.copy_from_machine(m, source, target_dir)  # type: ignore[arg-type]


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def box(tmp_path: Path) -> tuple[Path, Path]:
    """(outside, run folder inside it): nothing may appear in outside but the run folder."""
    run = tmp_path / "run"
    run.mkdir()
    return tmp_path, run


def assert_nothing_outside(outside: Path, run: Path, before: set[str] | None = None) -> None:
    names = files_under(outside) - files_under(run) - {"run"} - {f"run/{n}" for n in files_under(run)}
    assert names == (before or set()), f"written outside the run folder: {names}"


@pytest.mark.parametrize("evil", ["../escape", "a/../../escape", "/tmp/ntng-abs-escape", "a//b", "./a"])
def test_listing_names_that_lead_out_are_refused(box: tuple[Path, Path], evil: str) -> None:
    outside, run = box
    m = HostileMachine(run, [("f", "fine"), ("f", evil)])
    with pytest.raises(UnsafePath, match="evil|refused|absolute"):
        copy(m, "/var/log")
    assert_nothing_outside(outside, run)
    assert not Path("/tmp/ntng-abs-escape").exists()


@pytest.mark.parametrize("source", ["/x/..", "/x/.", "/", "//"])
def test_a_source_without_a_name_is_refused(box: tuple[Path, Path], source: str) -> None:
    outside, run = box
    m = HostileMachine(run, [("f", "a")])
    with pytest.raises(UnsafePath, match="no usable name"):
        copy(m, source)
    assert_nothing_outside(outside, run)
    assert m.client.got == []


@pytest.mark.parametrize("target_dir", ["../up", "/abs", "a/../../up"])
def test_a_target_dir_that_leads_out_is_refused(box: tuple[Path, Path], target_dir: str) -> None:
    outside, run = box
    m = HostileMachine(run, [("f", "a")])
    with pytest.raises(UnsafePath):
        copy(m, "/var/log", target_dir)
    assert_nothing_outside(outside, run)


def test_a_symlink_already_in_the_destination_is_not_written_through(box: tuple[Path, Path]) -> None:
    # e.g. left by the guest in the artifacts share, or by an earlier copy
    outside, run = box
    (outside / "etc").mkdir()
    (run / "log").mkdir()
    (run / "log" / "link").symlink_to(outside / "etc")
    m = HostileMachine(run, [("d", "link"), ("f", "link/passwd")])
    with pytest.raises(UnsafePath, match="symlink"):
        copy(m, "/var/log")
    assert list((outside / "etc").iterdir()) == []


def test_a_guest_symlink_is_not_made_on_the_host_and_not_followed(box: tuple[Path, Path]) -> None:
    outside, run = box
    m = HostileMachine(run, [("l", "link"), ("f", "link/passwd"), ("f", "ok")])
    copy(m, "/srv/tree")
    assert not any(p.is_symlink() for p in run.rglob("*"))
    assert (run / "tree" / "link" / "passwd").is_file()  # a real folder of the run folder
    assert (run / "tree" / "ok").read_text() == "content of /srv/tree/ok\n"
    assert any("skipped 1 symlink" in line and "link" in line for line in m.logged), m.logged
    assert_nothing_outside(outside, run)


def test_an_ordinary_tree_and_a_single_file_copy(box: tuple[Path, Path]) -> None:
    outside, run = box
    m = HostileMachine(run, [("d", "a"), ("d", "a/empty"), ("f", "a/b c"), ("f", "top"), ("p", "fifo")])
    copy(m, "/srv/data/", "nested/dir")
    root = run / "nested" / "dir" / "data"
    assert files_under(root) == {"a", "a/empty", "a/b c", "top"}
    assert (root / "a" / "b c").read_text() == "content of /srv/data//a/b c\n"
    one = HostileMachine(run, [], root="f")
    copy(one, "/etc/hostname")
    assert (run / "hostname").read_text() == "content of /etc/hostname\n"
    assert_nothing_outside(outside, run)


def test_a_garbled_listing_is_a_clear_error(box: tuple[Path, Path]) -> None:
    _, run = box
    m = HostileMachine(run, [("f", "a")], root="x")
    with pytest.raises(NtngError, match="listing"):
        copy(m, "/srv/data")


# -- shares -------------------------------------------------------------------------------------


class GuestShell:
    """The guest's shell; `attack(command)` runs after each command, as a hostile guest may."""

    def __init__(self, attack: Callable[[str], None] | None = None) -> None:
        self.attack = attack

    def succeed(self, *commands: str, timeout: int | None = None) -> str:
        out = ""
        for c in commands:
            out += subprocess.run(["sh", "-c", c], check=True, capture_output=True, text=True).stdout
            if self.attack:
                self.attack(c)
        return out


def stage_in(command: str, share: Path) -> Path:
    m = re.search(r"\.ntng-copy-[0-9a-f]+", command)
    assert m, command
    return share / m.group(0)


def share_of(path: Path) -> dict[str, Any]:
    path.mkdir(exist_ok=True)
    return {"tag": "shared", "type": "9p", "source": str(path), "target": str(path), "readOnly": False}


def test_share_stage_swapped_for_a_symlink_moves_no_host_file(tmp_path: Path) -> None:
    share, secret_dir, dest = tmp_path / "share", tmp_path / "secret", tmp_path / "run"
    secret_dir.mkdir()
    dest.mkdir()
    (secret_dir / "shadow").write_text("host secret\n")
    (tmp_path / "guest").mkdir()
    (tmp_path / "guest" / "shadow").write_text("guest file\n")

    def swap(command: str) -> None:  # the guest turns the staging folder into a symlink
        stage = stage_in(command, share)
        subprocess.run(["rm", "-rf", str(stage)], check=True)
        stage.symlink_to(secret_dir)

    try:
        shares.from_guest(GuestShell(swap), share_of(share), str(tmp_path / "guest" / "shadow"), dest)
    except NtngError:
        pass  # refusing is fine; moving the host's file is not
    assert (secret_dir / "shadow").read_text() == "host secret\n"
    assert not (dest / "shadow").exists() or (dest / "shadow").read_text() != "host secret\n"


def test_share_copy_does_not_write_through_a_symlink_left_in_the_destination(tmp_path: Path) -> None:
    share, outside, dest = tmp_path / "share", tmp_path / "outside", tmp_path / "run"
    outside.mkdir()
    (dest / "logs").mkdir(parents=True)
    (dest / "logs" / "link").symlink_to(outside)  # from an earlier copy
    guest = tmp_path / "guest" / "logs"
    (guest / "link").mkdir(parents=True)
    (guest / "link" / "planted").write_text("x\n")
    try:
        shares.from_guest(GuestShell(), share_of(share), str(guest), dest)
    except NtngError:
        pass
    assert list(outside.iterdir()) == []


def test_share_copy_strips_setuid_and_skips_symlinks(tmp_path: Path) -> None:
    share, dest = tmp_path / "share", tmp_path / "run"
    dest.mkdir()
    guest = tmp_path / "guest" / "tree"
    guest.mkdir(parents=True)
    (guest / "suid").write_text("#!/bin/sh\n")
    (guest / "suid").chmod(0o6777)
    (guest / "sub").mkdir()
    (guest / "sub").chmod(0o3777)
    (guest / "etc").symlink_to("/etc")
    shares.from_guest(GuestShell(), share_of(share), str(guest), dest)
    for p in (dest / "tree" / "suid", dest / "tree" / "sub"):
        mode = stat.S_IMODE(p.lstat().st_mode)
        assert mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | stat.S_IWOTH | stat.S_IWGRP) == 0, (p, oct(mode))
    assert stat.S_IMODE((dest / "tree" / "suid").stat().st_mode) == 0o755
    assert not (dest / "tree" / "etc").exists() and not (dest / "tree" / "etc").is_symlink()
    assert list(share.iterdir()) == []


def test_share_copy_of_a_guest_fifo_or_device_does_not_block_or_read_it(tmp_path: Path) -> None:
    share, dest = tmp_path / "share", tmp_path / "run"
    dest.mkdir()
    guest = tmp_path / "guest" / "tree"
    guest.mkdir(parents=True)
    os.mkfifo(guest / "fifo")
    os.mknod(guest / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (guest / "f").write_text("f\n")
    shares.from_guest(GuestShell(), share_of(share), str(guest), dest)
    assert sorted(p.name for p in (dest / "tree").iterdir()) == ["f"]


# -- copy_from_host_via_shell -------------------------------------------------------------------


class BashMachine:
    """Runs commands as Machine.run does in the guest (bash -c 'set -euo pipefail; …'), here."""

    def succeed(self, *commands: str, timeout: int | None = None) -> str:
        return "".join(subprocess.run(["bash", "-c", f"set -euo pipefail; {c}"], check=True,
                                      capture_output=True, text=True).stdout for c in commands)


def test_copy_from_host_via_shell_quotes_the_target(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"payload \x00\xff\n")
    target = tmp_path / "dir with space" / "$(touch pwned1);touch pwned2;x 'y'"
    Machine.copy_from_host_via_shell(BashMachine(), str(src), str(target))  # type: ignore[arg-type]
    assert target.read_bytes() == b"payload \x00\xff\n"
    assert not list(tmp_path.rglob("pwned*")) and not list(Path.cwd().glob("pwned*"))
