"""State folders hold the sockets of the VMs (QMP, console, backdoor, hybrid vsock) and the
run's backdoor key: only the runner's user may enter them (0700), the key is 0600."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from ntng import backdoorkey, nixeval, runner
from ntng.backends.qemu import QemuBackend
from ntng.errors import SetupError


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_kept_state_folder_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NTNG_CACHE", str(tmp_path / "cache"))
    old = os.umask(0o022)
    try:
        script = tmp_path / "t.py"
        d = runner.kept_state_dir(script)
        assert mode(d) == 0o700
        d.chmod(0o755)  # made by an older runner
        assert runner.kept_state_dir(script) == d and mode(d) == 0o700
    finally:
        os.umask(old)


def test_fresh_state_folder_is_private() -> None:
    d = runner.fresh_state_dir()
    try:
        assert mode(d) == 0o700 and d.name.startswith("ntng-run-")
    finally:
        d.rmdir()


@pytest.fixture
def plan(tmp_path: Path) -> dict[str, object]:
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    return nixeval.call("qemu.launch", {"name": "m", "kernel": "/k", "image": str(base),
                                        "stateDir": str(tmp_path / "state" / "m")})


def test_node_state_folder_and_key_file(plan: dict[str, object], tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        backend = QemuBackend("m", plan)
        backend._prepare("qemu-utils")
    finally:
        os.umask(old)
    key = Path(plan["backdoor"]["keyFile"])  # type: ignore[index]
    assert key.parent == tmp_path / "state" / "m" and mode(key.parent) == 0o700
    assert mode(key) == 0o600 and key.stat().st_uid == os.getuid()
    first = key.read_bytes()
    assert len(first) == backdoorkey.KEY_BYTES
    assert backdoorkey.read(plan) == first
    backend._prepare("qemu-utils")  # a new start (crash(), -K): a new key
    assert key.read_bytes() != first and mode(key) == 0o600


def test_the_key_is_never_written_through_a_symlink(plan: dict[str, object], tmp_path: Path) -> None:
    key = Path(plan["backdoor"]["keyFile"])  # type: ignore[index]
    key.parent.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"keep")
    key.symlink_to(elsewhere)
    backdoorkey.write(plan)
    assert not key.is_symlink() and elsewhere.read_bytes() == b"keep"
    # Reading refuses a symlink or a file others can read (someone else made it).
    key.unlink()
    key.symlink_to(elsewhere)
    with pytest.raises(SetupError, match=f"cannot read the backdoor key {key}"):
        backdoorkey.read(plan)
    key.unlink()
    key.write_bytes(bytes(32))
    key.chmod(0o644)
    with pytest.raises(SetupError, match="readable by others"):
        backdoorkey.read(plan)


def test_plans_without_a_key_file() -> None:
    assert backdoorkey.read({"backdoor": {"transport": "vsock"}}) is None
    backdoorkey.write({"backdoor": {"transport": "vsock"}})  # nothing to do


def test_stale_state_reaping_ignores_a_folder_its_runner_removes_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runners start and end side by side (`ntng test -j`, CI): a folder listed by one runner's
    reaping can be removed by its own runner before it is looked at. That is no error, and no
    folder of a live or young runner is removed (seen in CI: a node-less test failed with
    FileNotFoundError from reap_stale_state)."""
    monkeypatch.setattr(runner.tempfile, "gettempdir", lambda: str(tmp_path))
    going = tmp_path / "ntng-run-going"  # its runner cleans up while we look
    young = tmp_path / "ntng-run-young"  # no pid file yet: a runner starting
    live = tmp_path / "ntng-run-live"
    dead = tmp_path / "ntng-run-dead"
    for d in (going, young, live, dead):
        d.mkdir()
    (live / "runner.pid").write_text(str(os.getpid()))
    gone_pid = subprocess.Popen(["true"])
    gone_pid.wait()
    (dead / "runner.pid").write_text(str(gone_pid.pid))
    read_text = Path.read_text

    def racing_read(self: Path, *a: object, **kw: object) -> str:
        if self.parent == going:
            (going / "runner.pid").unlink(missing_ok=True)
            going.rmdir()
        return read_text(self, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", racing_read)
    assert runner.reap_stale_state() == [dead]
    assert young.is_dir() and live.is_dir() and not going.exists() and not dead.exists()
