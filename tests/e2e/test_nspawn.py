"""Containers as machines (backend nspawn, issue 17): the image's tree booted by systemd-nspawn
on a throwaway overlay layer, the same agent and Machine API over a unix socket in a
bind-mounted folder.  Real containers here; no VM boots in this module."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import ROOT, make_driver, ntng_run, run_cli
from ntng import runner
from ntng.driver import Driver
from ntng.errors import AgentRestarted, MissingCapability
from ntng.image import GuestImage
from ntng.machine import Machine

pytestmark = [
    pytest.mark.skipif(shutil.which("systemd-nspawn") is None, reason="systemd-nspawn not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="containers need root"),
    pytest.mark.timeout(300),
]

SCRIPT = '#: nodes.box = { backend = "nspawn"; };\n'
FIRST_COMMAND_WITHIN = 10.0  # seconds; measured ~0.8 s here (a TCG VM: ~20 s)


@pytest.fixture(scope="module")
def module_start() -> float:
    return time.time()


@pytest.fixture(scope="module")
def driver(module_start: float, tmp_path_factory: pytest.TempPathFactory, guest_image: GuestImage) -> Iterator[Driver]:
    d = make_driver(tmp_path_factory.mktemp("nspawn"), SCRIPT)
    yield d
    d.release()


@pytest.fixture(scope="module")
def box(driver: Driver) -> Machine:
    m = driver.machines[0]
    t0 = time.monotonic()
    m.start()
    assert m.succeed("echo up") == "up\n"
    first = time.monotonic() - t0
    print(f"measured: nspawn container start → first command {first:.2f}s")
    assert first < FIRST_COMMAND_WITHIN
    m.wait_for_unit("multi-user.target")
    print(f"measured: an idle Debian container's RSS (all its processes): {container_rss_kib(m) / 1024:.0f} MiB")
    return m


def container_processes(m: Machine) -> list[int]:
    """Host pids of the backend's process tree: unshare, nspawn, the container's init."""
    backend = m.backend
    if backend.proc is None or backend.proc.poll() is not None:
        return []
    pids = [backend.proc.pid]
    init = backend.container_init()  # type: ignore[attr-defined]
    return pids + ([init] if init else [])


def container_rss_kib(m: Machine) -> int:
    """VmRSS summed over the processes in the container's PID namespace (shared pages count
    once per process: an upper bound)."""
    init = m.backend.container_init()  # type: ignore[attr-defined]
    ns = os.readlink(f"/proc/{init}/ns/pid")
    total = 0
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.readlink(proc / "ns/pid") != ns:
                continue
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def gone(pids: list[int], within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not [p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)]:
            return True
        time.sleep(0.05)
    return False


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def by_name(d: Driver) -> dict[str, Machine]:
    return {m.name: m for m in d.machines}


def mounts_under(path: Path) -> list[str]:
    """Mount points under `path` in this and every process's mount namespace we can see."""
    found = []
    for info in Path("/proc").glob("[0-9]*/mountinfo"):
        try:
            found += [ln for ln in info.read_text().splitlines() if str(path) in ln]
        except OSError:
            continue
    return found


def test_a_container_boots_and_answers_with_the_run_key(box: Machine, guest_image: GuestImage) -> None:
    assert box.succeed("systemd-detect-virt").strip() == "systemd-nspawn"
    assert box.succeed("hostname").strip() == "box"
    assert box.client is not None and box.client.agent is not None
    assert "auth" in box.client.agent.capabilities  # the key came through the bind-mounted folder
    assert box.succeed("stat -c %a /run/ntng-host/backdoor-key").strip() == "600"
    box.wait_for_unit("multi-user.target")
    r = box.run(["sh", "-c", "echo out; echo err >&2; exit 3"], strict=False)
    assert (r.status, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
    # The plan's tree is the cache's; the container writes to its own upper layer only.
    assert box.plan["tree"] == str(guest_image.tree)
    box.succeed("echo mine > /etc/written-by-the-container")
    assert not (guest_image.tree / "etc/written-by-the-container").exists()
    assert (Path(box.plan["files"]["disk"]) / "etc/written-by-the-container").exists()


def test_the_console_log_is_the_containers_output(box: Machine) -> None:
    box.succeed("echo console-marker-17 > /dev/console")
    box.wait_for_console_text("console-marker-17", timeout=20)
    assert "systemd-nspawn" in box.get_console_log() or "Debian" in box.get_console_log()


def test_copy_files_both_ways(box: Machine, tmp_path: Path) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(300_000))
    done = box.copy_to_machine(src, "/root/in.bin")
    assert done.size == 300_000
    assert box.succeed("sha256sum /root/in.bin").split()[0] == done.sha256.hex()
    box.get_file("/root/in.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    box.succeed("mkdir -p /root/tree/sub && echo a > /root/tree/sub/a")
    box.copy_from_machine("/root/tree", "copied")
    assert (box.out_dir / "copied/tree/sub/a").read_text() == "a\n"


def test_the_agent_restarting_is_reconnected(box: Machine) -> None:
    boot = box.boot_id
    box.succeed("setsid sh -c 'sleep 1; systemctl restart ntng-backdoor' </dev/null >/dev/null 2>&1 &")
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            box.run("sleep 60")
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    t.join(60)
    assert not t.is_alive()
    assert errors and isinstance(errors[0], AgentRestarted), errors
    assert box.succeed("echo back") == "back\n"
    assert box.boot_id == boot and box.reboots_seen == 0


def test_reboot_starts_the_container_again_on_the_same_layer(box: Machine) -> None:
    old, seen = box.boot_id, box.reboots_seen
    box.succeed("echo survives > /root/persist")
    box.reboot()
    assert box.boot_id != old and box.reboots_seen == seen + 1
    assert box.succeed("cat /root/persist") == "survives\n"
    assert box.succeed("echo after") == "after\n"


def test_crash_kills_it_and_start_boots_the_same_layer(box: Machine) -> None:
    box.succeed("echo kept > /root/crash-kept")
    pids = container_processes(box)
    assert len(pids) == 2
    box.crash()
    assert gone(pids), "the container outlived crash()"
    assert box.succeed("cat /root/crash-kept") == "kept\n"  # started again by the command


def test_what_a_container_lacks_is_a_capability_error(box: Machine, tmp_path: Path) -> None:
    with pytest.raises(MissingCapability, match="screenshot"):
        box.screenshot(str(tmp_path / "s.png"))
    with pytest.raises(MissingCapability, match="keys"):
        box.send_key("a")
    with pytest.raises(MissingCapability, match="consoleInput"):
        box.send_console("root\n")


def test_shutdown_powers_it_off_and_nothing_is_left(box: Machine, driver: Driver) -> None:
    pids = container_processes(box)
    state = Path(box.plan["files"]["consoleLog"]).parent
    box.shutdown()
    assert box.backend.proc is not None and box.backend.proc.returncode == 0
    assert gone(pids)
    assert not mounts_under(state)
    assert not list(Path(box.plan["files"]["layer"]).glob(".#*")), "overlay work folder left"
    assert not Path(box.plan["backdoor"]["socket"]).exists()
    # started again by the next command, after a clean poweroff
    assert box.succeed("echo again") == "again\n"


def test_release_leaves_no_process_mount_or_folder(tmp_path: Path, guest_image: GuestImage) -> None:
    d = make_driver(tmp_path, SCRIPT)
    m = d.machines[0]
    m.succeed("true")
    pids = container_processes(m)
    state = Path(m.plan["files"]["consoleLog"]).parent
    own_cgroups = list(m.backend._cgroups)  # type: ignore[attr-defined]
    assert own_cgroups and all(c.is_dir() for c in own_cgroups)
    d.release()
    assert gone(pids)
    assert not mounts_under(state)
    assert not list(Path(m.plan["files"]["layer"]).glob(".#*"))
    assert not any(c.exists() for c in own_cgroups), "the container's cgroups are left"


CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {e2e!r})
    from pathlib import Path
    from helpers import make_driver
    d = make_driver(Path({tmp!r}), {script!r})
    m = d.machines[0]
    m.succeed("true")
    print(m.backend.proc.pid, m.backend.container_init(), flush=True)
    time.sleep(600)
""")


def test_containers_die_with_a_killed_runner(tmp_path: Path, guest_image: GuestImage) -> None:
    code = CHILD.format(e2e=str(ROOT / "tests/e2e"), tmp=str(tmp_path), script=SCRIPT)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT / "python")})
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        pids = [int(w) for w in line.split()]
        assert len(pids) == 2, line
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        assert gone(pids), "the container outlived its runner's SIGKILL"
        assert not mounts_under(tmp_path / "state")
    finally:
        child.kill()
        child.wait()


# --- networks --------------------------------------------------------------------------------

TWO = ('#: nodes.a = { backend = "nspawn"; vlans = [ 1 ]; };\n'
       '#: nodes.b = { backend = "nspawn"; vlans = [ 1 ]; };\n')


def test_containers_on_a_vlan_reach_each_other_by_name_and_the_host_sees_the_link(
        tmp_path: Path, guest_image: GuestImage) -> None:
    d = make_driver(tmp_path, TWO)
    a, b = (by_name(d)[n] for n in ("a", "b"))
    try:
        d.start_all()
        assert a.succeed("cat /sys/class/net/eth0/address").strip() == a.plan["interfaces"][0]["mac"]
        a.succeed("ping -c 1 -W 5 b")
        b.succeed("ping -c 1 -W 5 a")
        # The host ends are the plan's tap names, on the vlan's bridge: counters there.
        b.succeed("nc -lk -p 5000 >/dev/null 2>&1 </dev/null &")
        b.wait_for_open_port(5000)
        before = a.link_counters()
        a.succeed("head -c 1000000 /dev/urandom | nc -N b 5000")
        assert 1_000_000 <= (a.link_counters() - before).tx_bytes < 1_200_000
        a.block()
        a.fail("ping -c 1 -W 2 b")
        a.unblock()
        a.wait_until_succeeds("ping -c 1 -W 2 b", timeout=30)
        b.succeed("mkdir -p /srv/www && echo hello-from-b > /srv/www/index.html",
                  "python3 -m http.server 8000 -d /srv/www >/dev/null 2>&1 </dev/null &")
        b.wait_for_open_port(8000)
        b.forward_port(18125, 8000)
        body = urllib.request.urlopen("http://127.0.0.1:18125/index.html", timeout=30).read()
        assert body == b"hello-from-b\n"
        a.reboot()  # a new pair for the new container, on the same bridge
        b.succeed("ping -c 1 -W 5 a")
        if not a.network.host_impairment():
            with pytest.raises(MissingCapability, match="sch_netem"):
                a.impair(delay=50)
    finally:
        d.release()


def test_a_declared_impairment_without_sch_netem_is_refused_at_start(
        tmp_path: Path, guest_image: GuestImage) -> None:
    d = make_driver(tmp_path, '#: nodes.a = { backend = "nspawn"; vlans = [ 1 ]; '
                              'impairments = [ { vlan = 1; delay = 20; } ]; };\n')
    try:
        if d.network.host_impairment():
            pytest.skip("this host has sch_netem: the impairment is applied on the host end")
        with pytest.raises(MissingCapability, match="sch_netem"):
            d.machines[0].start()
    finally:
        d.release()


MIXED = ('#: nodes.vm = { vlans = [ 1 ]; memory = 512; };\n'
         '#: nodes.box = { backend = "nspawn"; vlans = [ 1 ]; };\n')


def test_a_vm_and_a_container_on_one_vlan_ping_ssh_and_copy(
        tmp_path: Path, guest_image: GuestImage) -> None:
    d = make_driver(tmp_path, MIXED)
    box, vm = (by_name(d)[n] for n in ("box", "vm"))
    assert (box.plan["backend"], vm.plan["backend"]) == ("nspawn", "qemu")
    try:
        t0 = time.monotonic()
        box.start()
        vm.start()
        box.succeed("true")
        t_box = time.monotonic() - t0
        vm.succeed("true")
        t_vm = time.monotonic() - t0
        print(f"measured: start → first command, side by side in one run: container {t_box:.1f}s, "
              f"{vm.plan['accel'].upper()} VM {t_vm:.1f}s")
        vm.succeed("ping -c 1 -W 5 box")
        box.succeed("ping -c 1 -W 5 vm")
        data = tmp_path / "blob"
        data.write_bytes(os.urandom(200_000))
        box.copy_to_machine(data, "/root/blob")
        # -k: wait_for_open_port's probe is a connection of its own
        vm.succeed("nc -lk -p 6000 > /root/blob </dev/null 2>/dev/null &")
        vm.wait_for_open_port(6000)
        box.succeed("nc -N vm 6000 < /root/blob")
        vm.wait_until_succeeds(f"test $(stat -c %s /root/blob) = {len(data.read_bytes())}", timeout=30)
        assert vm.succeed("sha256sum /root/blob").split()[0] == box.succeed("sha256sum /root/blob").split()[0]
        # ssh with keys, the container logging in to the VM with a fresh key pair, the VM's
        # host key checked; then a checksummed copy back over ssh.
        vm.wait_for_unit("ssh.service")
        box.succeed("ssh-keygen -q -t ed25519 -N '' -f /root/.ssh/id_ed25519")
        pub = box.succeed("cat /root/.ssh/id_ed25519.pub").strip()
        vm.succeed(f"install -d -m 700 /root/.ssh && echo '{pub}' >> /root/.ssh/authorized_keys")
        host_key = " ".join(vm.succeed("cat /etc/ssh/ssh_host_ed25519_key.pub").split()[:2])
        box.succeed(f"echo 'vm {host_key}' >> /root/.ssh/known_hosts")
        ssh = "ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -o ConnectTimeout=20"
        assert box.succeed(f"{ssh} vm hostname").strip() == "vm"
        vm.succeed("head -c 300000 /dev/urandom > /root/back")
        box.succeed("scp -o BatchMode=yes -o StrictHostKeyChecking=yes vm:/root/back /root/back")
        assert box.succeed("sha256sum < /root/back") == vm.succeed("sha256sum < /root/back")
        out = box.fail(f"{ssh} -i /dev/null -o IdentitiesOnly=yes vm true 2>&1")
        assert "Permission denied (publickey" in out, out
    finally:
        d.release()


# --- shared directories ----------------------------------------------------------------------

def test_shared_dirs_are_bind_mounts_read_only_where_asked(tmp_path: Path, guest_image: GuestImage) -> None:
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    (ro / "given").write_text("from the host\n")
    d = make_driver(tmp_path, '#: nodes.box = { backend = "nspawn"; shareArtifacts = true; sharedDirs = {\n'
                              f'#:   ro = {{ source = "{ro}"; target = "/mnt/ro"; readOnly = true; }};\n'
                              f'#:   rw = {{ source = "{rw}"; target = "/mnt/rw"; }};\n'
                              '#: }; };\n')
    m = d.machines[0]
    try:
        assert m.succeed("cat /mnt/ro/given") == "from the host\n"
        m.fail("touch /mnt/ro/nope")
        m.succeed("echo from the container > /mnt/rw/made")
        assert (rw / "made").read_text() == "from the container\n"
        m.succeed("mkdir -p /root/res && echo r > /root/res/f")
        m.copy_from_machine("/root/res", "via-share", via="share")
        assert (m.out_dir / "via-share/res/f").read_text() == "r\n"
    finally:
        d.release()
    assert not mounts_under(ro) and not mounts_under(rw)  # release() waits for the container's end


# --- -K: the writable layer is kept like a VM's disk -----------------------------------------

KEEP = """\
#: nodes.machine = { backend = "nspawn"; };
import os
if os.environ.get("NTNG_TEST_PHASE") == "write":
    machine.succeed("echo from-the-last-run > /root/kept")
else:
    print("KEPT:", machine.execute("cat /root/kept")[1].strip() or "nothing")
machine.shutdown()
"""


def test_keep_state_keeps_the_upper_layer_across_runs(tmp_path: Path, guest_image: GuestImage,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "kept.py"
    script.write_text(KEEP)
    state = runner.kept_state_dir(script)
    try:
        monkeypatch.setenv("NTNG_TEST_PHASE", "write")
        r = run_cli("run", str(script), "-K", cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        assert (state / "machine/layer/upper/root/kept").exists()
        monkeypatch.setenv("NTNG_TEST_PHASE", "read")
        r = run_cli("run", str(script), "-K", cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "KEPT: from-the-last-run" in r.stdout + r.stderr
        r = run_cli("run", str(script), cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "KEPT: nothing" in r.stdout + r.stderr
        assert not (guest_image.tree / "root/kept").exists()
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_the_two_node_demo_runs_unchanged_with_both_nodes_as_containers(
        tmp_path: Path, guest_image: GuestImage) -> None:
    demo = (ROOT / "examples/two_nodes.py").read_text()
    script = tmp_path / "two_nodes.py"
    script.write_text(demo.replace("#: nodes.server = {", '#: nodes.server = { backend = "nspawn";')
                      .replace("#: nodes.client = {", '#: nodes.client = { backend = "nspawn";'))
    assert script.read_text().count('backend = "nspawn"') == 2
    t0 = time.monotonic()
    r = ntng_run(script)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    assert "5 MB travel server -> client" in r.stderr + r.stdout
    print(f"measured: examples/two_nodes.py with both nodes as containers: {took:.1f}s (ntng run, wall)")


def test_no_container_of_this_module_wrote_to_the_cache(module_start: float, guest_image: GuestImage) -> None:
    """Last here: every container above booted the cache's tree; none changed a file of it."""
    r = subprocess.run(["find", str(guest_image.tree), "-xdev", "-newermt", f"@{module_start - 1:.0f}",
                        "-print", "-quit"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr
