"""One real Debian guest under QEMU, driven through the backdoor: what it did, checked.  What
needs no VM (commands, output, copies, units: the agent's side) runs on a container (issue 17),
which boots in a second; QEMU's own paths (keys, monitor, fw_cfg key, crash, reboot, the
serial transport's reconnects and backpressure) stay on the VM, and tests/e2e/test_transports.py
runs commands and copies on a VM over each transport."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import make_driver
from ntng.errors import AgentRestarted, NtngError, OutputLimitExceeded, UnsafePath, WaitTimeout
from ntng.machine import Machine, RequestedAssertionFailed

MB = 1024 * 1024


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory, guest_image: object) -> Iterator[Machine]:
    driver = make_driver(tmp_path_factory.mktemp("vm"))
    m = driver.machines[0]
    try:
        m.start()
        m.connect()
        yield m
    finally:
        driver.release()
    assert not m.backend.alive(), "QEMU must be gone after release()"


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory, guest_image: object) -> Iterator[Machine]:
    driver = make_driver(tmp_path_factory.mktemp("box"), '#: nodes.machine = { backend = "nspawn"; };\n')
    m = driver.machines[0]
    try:
        m.start()
        m.connect()
        yield m
    finally:
        driver.release()
    assert not m.backend.alive(), "the container must be gone after release()"


def test_exit_codes_and_stderr(box: Machine) -> None:
    r = box.run("echo out; echo err >&2; exit 7")
    assert (r.status, r.stdout, r.stderr) == (7, b"out\n", b"err\n")
    assert box.execute("echo hi; exit 3") == (3, "hi\n")
    assert box.succeed("echo a", "echo b") == "a\nb\n"
    with pytest.raises(RequestedAssertionFailed, match=r"command `exit 5` failed \(exit code 5\)"):
        box.succeed("exit 5")
    assert box.fail("false") == ""
    with pytest.raises(RequestedAssertionFailed, match="unexpectedly succeeded"):
        box.fail("true")
    # NixOS semantics: set -euo pipefail, so a failing pipeline stage fails the command.
    assert box.execute("false | true")[0] == 1
    # argv without a shell, env, cwd and user.
    r = box.run(["env"], env={"NTNG_X": "42"}, cwd="/tmp")
    assert b"NTNG_X=42" in r.stdout
    assert box.run("pwd", cwd="/etc").stdout == b"/etc\n"
    box.succeed("id nobody")
    assert box.run("id -un", user="nobody").stdout == b"nobody\n"


def test_50mb_of_stdout_streams_intact(box: Machine) -> None:
    want = box.succeed("head -c 52428800 /dev/urandom > /tmp/big && sha256sum /tmp/big").split()[0]
    h = hashlib.sha256()
    sizes: list[int] = []

    def sink(chunk: bytes) -> None:
        h.update(chunk)
        sizes.append(len(chunk))

    t0 = time.monotonic()
    r = box.run("cat /tmp/big", on_stdout=sink)
    dt = time.monotonic() - t0
    assert r.status == 0 and r.stdout == b""  # streamed to the callback, not buffered
    assert sum(sizes) == 50 * MB
    assert h.hexdigest() == want
    print(f"50 MB stdout in {dt:.1f}s ({50 / dt:.1f} MB/s)")
    # Collected: the NixOS-compatible path returns it all as a string.
    out = box.succeed("head -c 5000000 /tmp/big | base64 -w0")
    assert len(out) == (5000000 + 2) // 3 * 4


def test_stdin(box: Machine) -> None:
    data = os.urandom(3 * MB)
    r = box.run("sha256sum", stdin=data)
    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    r = box.run("wc -l", stdin=(b"line\n" for _ in range(1000)))
    assert r.stdout.strip() == b"1000"
    # Without stdin a command reads end-of-file at once instead of hanging.
    assert box.run("cat").stdout == b""


def test_timeout_kills_the_whole_command(box: Machine) -> None:
    t0 = time.monotonic()
    r = box.run("sleep 1000 & echo $! > /tmp/bgpid; sleep 1000", timeout=3)
    assert r.timed_out and time.monotonic() - t0 < 30
    assert box.execute("sleep 100", timeout=2)[0] == 124  # like coreutils timeout
    # The background child was in the same process group: it is gone too.
    box.wait_until_fails("kill -0 $(cat /tmp/bgpid)", timeout=10)


def test_copy_100mb_each_way(box: Machine, tmp_path: Path) -> None:
    src = tmp_path / "up.bin"
    with open(src, "wb") as f:
        for _ in range(100):
            f.write(os.urandom(MB))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    t0 = time.monotonic()
    box.copy_from_host(str(src), "/root/up.bin")
    up = time.monotonic() - t0
    assert box.succeed("sha256sum /root/up.bin").split()[0] == digest
    want = box.succeed("head -c 104857600 /dev/urandom > /root/down.bin; sha256sum /root/down.bin").split()[0]
    t0 = time.monotonic()
    box.copy_from_machine("/root/down.bin", "copied")
    down = time.monotonic() - t0
    got = box.out_dir / "copied" / "down.bin"
    assert hashlib.sha256(got.read_bytes()).hexdigest() == want
    print(f"copy 100 MB: host->guest {100 / up:.1f} MB/s, guest->host {100 / down:.1f} MB/s")
    box.succeed("rm /root/up.bin /root/down.bin /tmp/big || true")


def test_copy_directories_and_modes(box: Machine, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("alpha")
    (tree / "sub" / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (tree / "sub" / "run.sh").chmod(0o755)
    box.copy_from_host(str(tree), "/opt/tree")
    assert box.succeed("/opt/tree/sub/run.sh") == "ran\n"
    assert box.succeed("cat /opt/tree/a.txt") == "alpha"
    box.copy_from_machine("/opt/tree", "back")
    assert (box.out_dir / "back" / "tree" / "sub" / "run.sh").read_text() == "#!/bin/sh\necho ran\n"
    with pytest.raises(RequestedAssertionFailed, match="does not exist"):
        box.copy_from_machine("/nonexistent")


def test_wait_for_unit_ssh_and_failed_units(box: Machine) -> None:
    box.wait_for_unit("ssh.service")
    box.wait_for_open_port(22)
    box.wait_for_closed_port(2222, timeout=5)
    assert box.get_unit_info("ssh.service")["ActiveState"] == "active"
    assert box.get_unit_property("ssh.service", "ActiveState") == "active"
    box.require_unit_state("ssh.service", "active")
    # Broken on purpose: the default "failed unit" rule would fail the test at once.
    box.unwatch("failed unit")
    # A oneshot: systemd-run returns once it has failed (a simple service would be "active"
    # for a moment, which wait_for_unit rightly accepts).
    box.execute("systemd-run --unit=ntng-broken.service --property=Type=oneshot false")
    with pytest.raises(RequestedAssertionFailed, match='unit "ntng-broken.service" reached state "failed"'):
        box.wait_for_unit("ntng-broken.service", timeout=60)
    box.succeed("touch /tmp/flag")
    box.wait_for_file("/tmp/flag", timeout=10)
    status, _ = box.systemctl("is-active ssh.service")
    assert status == 0


def test_host_disconnects_and_reconnects(vm: Machine) -> None:
    """The agent survives the runner going away: a new connection gets a new session."""
    assert vm.client is not None
    vm.client.close()
    vm.client = None
    assert vm.succeed("echo again") == "again\n"
    assert vm.reboots_seen == 0


def test_agent_restarted_while_the_host_waits(vm: Machine) -> None:
    boot = vm.boot_id
    vm.succeed("setsid sh -c 'sleep 2; systemctl restart ntng-backdoor' </dev/null >/dev/null 2>&1 &")
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            vm.run("sleep 60")
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    t.join(120)
    assert not t.is_alive()
    assert errors and isinstance(errors[0], AgentRestarted), errors
    assert vm.succeed("echo back") == "back\n"
    assert vm.boot_id == boot and vm.reboots_seen == 0  # same boot: not mistaken for a reboot


def test_reboot_is_detected_through_the_boot_id(vm: Machine) -> None:
    old = vm.boot_id
    assert old == vm.succeed("cat /proc/sys/kernel/random/boot_id").strip()
    vm.succeed("echo survives > /root/persist; sync")
    vm.reboot()
    assert vm.boot_id != old and vm.reboots_seen == 1
    assert vm.succeed("cat /proc/sys/kernel/random/boot_id").strip() == vm.boot_id
    assert vm.succeed("cat /root/persist") == "survives\n"


def test_crash_then_start_again(vm: Machine) -> None:
    old = vm.boot_id
    vm.succeed("echo survived > /root/on-disk && sync")
    vm.crash()
    assert not vm.backend.alive() and not vm.booted
    vm.start()
    assert vm.succeed("echo up") == "up\n"
    assert vm.boot_id != old
    # A power loss does not wipe the disk: the next boot sees what was synced.
    assert vm.succeed("cat /root/on-disk") == "survived\n"


def test_keys_reach_a_tty_and_its_text_is_read(vm: Machine) -> None:
    # A shell reading from tty1 (the foreground terminal); keys come in through the emulated
    # keyboard, the terminal echoes them, /dev/vcs1 shows them.
    vm.succeed("setsid sh -c 'exec </dev/tty1 >/dev/tty1 2>&1; read line; echo \"got:$line\" > /tmp/typed'"
               " </dev/null >/dev/null 2>&1 &")
    # Keys reaching a VT nobody has open are dropped: send them once the shell reads tty1 (a
    # fixed sleep lost them on a loaded host).
    vm.wait_until_succeeds("for p in $(pgrep -f 'read line'); do "
                           "[ \"$(readlink /proc/$p/fd/0)\" = /dev/tty1 ] && exit 0; done; exit 1", timeout=60)
    vm.send_chars("Hello, World! 42\n")
    vm.wait_for_file("/tmp/typed", timeout=60)
    assert vm.succeed("cat /tmp/typed").strip() == "got:Hello, World! 42"
    vm.wait_until_tty_matches("1", r"Hello, World! 42", timeout=60)
    assert "Hello, World! 42" in vm.get_tty_text("1")
    with pytest.raises(RequestedAssertionFailed, match="needs a display"):
        vm.screenshot("screen")
    with pytest.raises(ValueError, match="no key for character"):
        vm.send_chars("\x01")


def test_copy_from_machine_follows_no_guest_symlink_and_keeps_no_setuid(box: Machine) -> None:
    # A guest folder with a symlink to /etc and a 6777 file: nothing outside the run folder, the
    # symlink skipped (never made on the host), no setuid/setgid bits on the host.
    box.succeed("rm -rf /root/evil && mkdir -p /root/evil/sub && ln -s /etc /root/evil/etc"
               " && echo x > /root/evil/sub/suid && chmod 6777 /root/evil/sub/suid")
    box.copy_from_machine("/root/evil", "hostile")
    root = box.out_dir / "hostile" / "evil"
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == ["sub", "sub/suid"]
    assert not (root / "etc").is_symlink()
    assert os.stat(root / "sub" / "suid").st_mode & 0o7002 == 0, oct(os.stat(root / "sub" / "suid").st_mode)
    with pytest.raises(UnsafePath, match="no usable name"):
        box.copy_from_machine("/root/evil/..")


def test_the_backdoor_is_authenticated_with_the_run_key(vm: Machine) -> None:
    """The agent proved it has the run's key (HELLO_ACK says "auth"; the client checked its
    proof): QEMU handed the guest the runner's 0600 key file through fw_cfg, readable there by
    root only.  After test_crash_then_start_again this is the second start's key."""
    assert vm.client is not None and vm.client.agent is not None
    assert "auth" in vm.client.agent.capabilities
    key_file = Path(vm.plan["backdoor"]["keyFile"])
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    raw = "/sys/firmware/qemu_fw_cfg/by_name/opt/org.ntng/backdoor-key/raw"
    assert vm.succeed(f"sha256sum {raw}").split()[0] == hashlib.sha256(key_file.read_bytes()).hexdigest()
    assert vm.succeed(f"stat -c %a {raw}").strip() == "400"
    assert vm.run(f"cat {raw}", user="nobody").status != 0


def test_2gb_of_stdout_stops_at_max_output_and_the_command_is_killed(box: Machine) -> None:
    t0 = time.monotonic()
    with pytest.raises(OutputLimitExceeded, match=r"8388608 bytes.*on_stdout="):
        box.run("head -c 2G /dev/zero", max_output=8 * MB, timeout=300)
    took = time.monotonic() - t0
    print(f"measured: 2 GB of stdout with max_output=8 MiB: stopped after {took:.2f}s")
    box.max_output = 4 * MB  # the NixOS-style calls go through the machine's limit
    try:
        with pytest.raises(OutputLimitExceeded, match="4194304 bytes"):
            box.succeed("head -c 2G /dev/zero")
    finally:
        box.max_output = MB * 128
    assert took < 60, f"{took:.1f}s to stop a 2 GB flood at 8 MiB"
    box.wait_until_fails("pgrep -x head", timeout=10)  # killed in the guest, not left writing


def test_monitor_command_and_qmp_events(vm: Machine) -> None:
    """The NixOS driver's human monitor and QMP event wait: stop/cont through HMP, the RESUME
    event that cont gives (sent before the wait, still found), HMP errors as text, and a wait
    for an event that never comes ending at its timeout with the filter named."""
    vm.connect()
    assert "running" in vm.send_monitor_command("info status")
    vm.send_monitor_command("stop")
    assert "paused" in vm.send_monitor_command("info status")
    vm.send_monitor_command("cont")
    event = vm.wait_for_qmp_event(lambda e: e["event"] == "RESUME", timeout=30)
    assert event["event"] == "RESUME" and "timestamp" in event
    assert vm.succeed("echo alive") == "alive\n"  # the guest runs on after stop/cont
    assert "unknown command" in vm.send_monitor_command("no_such_command").lower()
    t0 = time.monotonic()
    with pytest.raises(WaitTimeout) as info:
        vm.wait_for_qmp_event(lambda e: e["event"] == "DEVICE_DELETED", timeout=2)
    took = time.monotonic() - t0
    print(f"measured: wait_for_qmp_event(timeout=2) with no such event: {took:.2f}s")
    assert 2 <= took < 5
    assert str(info.value).startswith(f"{vm.name}: no QMP event matching <lambda> at test_machine.py:")
    assert 'e["event"] == "DEVICE_DELETED"' in str(info.value)


def test_a_guest_that_stops_reading_does_not_hang_put_file(vm: Machine, tmp_path: Path) -> None:
    """The agent is SIGSTOPped while the host sends a big file: put_file returns within its
    timeout plus the client's grace with a project error.  Last in the module: the backdoor
    connection is closed afterwards, so the VM is crashed."""
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(512 * MB)
    # The command's parent is the agent; stop it a second from now, from a detached shell.
    vm.succeed("pid=$PPID; setsid sh -c \"sleep 1; kill -STOP $pid\" </dev/null >/dev/null 2>&1 &")
    timeout, grace = 6.0, 2.0
    t0 = time.monotonic()
    with pytest.raises(NtngError) as info:
        vm.connect().put_file(big, "/tmp/big", timeout=timeout)
    took = time.monotonic() - t0
    print(f"measured: put_file(timeout={timeout}) into a stopped agent: {type(info.value).__name__} after {took:.2f}s")
    assert took <= timeout + grace, f"{took:.1f}s: {info.value}"
    vm.crash()
