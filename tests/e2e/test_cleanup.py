"""Nothing leaks: VMs and state dirs go away on failure, Ctrl-C and kill -9 of the runner."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ntng import errors


def qemu_pids(tag: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"qemu-system.*{tag}"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def start_runner(tmp_path: Path, tmpdir: Path) -> subprocess.Popen[str]:
    script = tmp_path / "slow.py"
    # On a vlan: the runner also owns a network namespace with a bridge and a tap.
    script.write_text("#: nodes.machine = { vlans = [ 1 ]; };\n"
                      "machine.succeed('true')\nmachine.succeed('sleep 600')\n")
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    return subprocess.Popen([sys.executable, "-m", "ntng.cli", "run", str(script), "--accel", "tcg"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def netns_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def netns_holders(ns: str) -> list[str]:
    """Processes in network namespace `ns` or holding a descriptor on it."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.readlink(proc / "ns/net") == ns:
                found.append(f"pid {proc.name}")
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) == ns:
                    found.append(f"pid {proc.name} fd {fd.name}")
        except OSError:
            continue  # gone meanwhile
    return found


def describe(holders: list[str]) -> list[str]:
    """Each holder with its command and state, for a failure message."""
    out = []
    for h in holders:
        pid = h.split()[1]
        try:
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
            state = next((line for line in status if line.startswith("State:")), "")
            out.append(f"{h}: {Path(f'/proc/{pid}/comm').read_text().strip()} ({state})")
        except OSError:
            out.append(f"{h}: gone")
    return out


def wait_for_vm(tmpdir: Path, timeout: float = 300) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # The first command has run once the agent answered: the VM is fully up.
        pids = qemu_pids(str(tmpdir))
        logs = list(tmpdir.glob("ntng-run-*/machine/console.log"))
        if pids and logs and "serving on" in logs[0].read_text(errors="replace"):
            return pids
        time.sleep(1)
    raise AssertionError("the VM never came up")


@pytest.mark.parametrize("how", ["ctrl-c", "kill-9"])
def test_runner_death_takes_the_vm_along(tmp_path: Path, guest_image: object, how: str) -> None:
    # The runner's TMPDIR, short: its VMs' unix sockets live under it (108-byte limit).
    tmpdir = Path(tempfile.mkdtemp(prefix="ntng-cl-", dir="/tmp"))
    proc = start_runner(tmp_path, tmpdir)
    try:
        pids = wait_for_vm(tmpdir)
        time.sleep(3)  # inside `sleep 600` now
        ns = netns_of(pids[0])
        assert ns != os.readlink("/proc/self/ns/net"), "QEMU runs in the host's network namespace"
        proc.send_signal(signal.SIGINT if how == "ctrl-c" else signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
        deadline = time.monotonic() + 20
        while qemu_pids(str(tmpdir)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert qemu_pids(str(tmpdir)) == [], f"QEMU {pids} outlived the runner"
        # Nothing refers to the namespace any more (no process in it, no descriptor on it), so
        # the kernel has freed it with its bridge and tap; nothing is left to reap.  Waited for:
        # a QEMU that pgrep no longer sees may still be exiting (its memory is released before
        # its namespaces; CI once saw the namespace held right after pgrep came back empty).
        while netns_holders(ns) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert netns_holders(ns) == [], f"{ns} outlived the runner: {describe(netns_holders(ns))}"
        if how == "ctrl-c":
            assert proc.returncode == 130, out
            assert list(tmpdir.glob("ntng-run-*")) == [], "state dir left behind"
        else:
            # kill -9 leaves the state dir; the next run reaps it.
            assert list(tmpdir.glob("ntng-run-*"))
            bad = tmp_path / "bad.py"
            bad.write_text("if\n")
            env = {**os.environ, "TMPDIR": str(tmpdir)}
            r = subprocess.run([sys.executable, "-m", "ntng.cli", "run", str(bad)], env=env,
                               capture_output=True, text=True, cwd=tmp_path)
            assert r.returncode == errors.EXIT_USAGE
            assert list(tmpdir.glob("ntng-run-*")) == [], "a dead runner's state dir was not reaped"
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(tmpdir, ignore_errors=True)
