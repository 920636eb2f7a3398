"""systemd-nspawn backend: runs nixlib's container plan (nixlib/nspawn.nix); it builds no argv.

The container boots the image's configured tree under an overlay whose upper layer is the
node's "disk" (files.disk): made fresh at a run's first start, kept across crash()/start() and
reboots, and with -K across runs; the cache is never written.  nspawn runs as PID 1 of its own
PID namespace (the plan's `unshare --pid --kill-child`), so its container dies with it, and it
with the runner (PDEATHSIG).  The console is nspawn's stdout (--console=read-only: the
container's /dev/console); the backdoor is the agent's unix socket in the bind-mounted
backdoor folder, where the run's key is too.

A guest reboot ends nspawn (exit status 133, plan["rebootExitStatus"]) and the Machine starts
it again on the same upper layer; ctrl-alt-delete is SIGINT to the container's init, a
poweroff SIGRTMIN+4 (systemd's signals for them).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import backdoorkey, cgroups, netem, paths
from ..client import connect_unix
from ..errors import MissingCapability, SetupError
from ..plan import NodePlan, SnapshotLayout
from .vmm import KILL_REAP_TIMEOUT, VmmProcess

# systemd (PID 1) runs ctrl-alt-del.target on SIGINT and powers off on SIGRTMIN+4.
CTRL_ALT_DEL = signal.SIGINT
POWEROFF = signal.SIGRTMIN + 4
CONSOLE_JOIN_TIMEOUT = 2.0
NETNS_TIMEOUT = 10.0  # making a node's veths takes milliseconds


class NspawnBackend(VmmProcess):
    name = "nspawn"
    # The socket's connection ends with the agent (a reboot, a restart): the next one is new.
    reconnects = True

    def __init__(self, machine_name: str, plan: NodePlan,
                 preexec: Callable[[], None] | None = None, keep_disk: bool = False) -> None:
        super().__init__(machine_name, plan, preexec, keep_disk)
        self.layer = Path(plan["files"]["layer"])
        self.upper = Path(plan["files"]["disk"])
        self._cgroups: list[Path] = []  # this start's own cgroups (cgroups.make)

    # -- starting -----------------------------------------------------------------------------

    def start(self) -> None:
        if os.geteuid() != 0:
            raise SetupError(f"{self.machine_name}: container nodes (backend nspawn) need root: "
                             "systemd-nspawn makes namespaces and mounts; run as root or use a VM node")
        for tool in self.plan["checkBinaries"]:
            self._check_binary(tool["path"], tool["missing"])
        self._check_root()
        self._prepare_folders()
        self._make_root_skeleton()
        self._make_share_folders()  # a bind mount's source must exist
        if self.plan["interfaces"]:
            if any(i.get("impairment") for i in self.plan["interfaces"]):
                self._in_test_netns(self._check_netem)
            self._in_test_netns(self._make_veths)
        self._spawn_in_own_cgroup()
        self._pump_stdout_console()
        if self.plan["interfaces"]:
            self._in_test_netns(self._move_peers)

    def _spawn_in_own_cgroup(self) -> None:
        """nspawn in fresh cgroups (ntng/cgroups.py says why), entered before exec."""
        cgroups.remove(self._cgroups)
        self._cgroups = cgroups.make(self.plan.get("machine") or self.machine_name)
        outer, own = self.preexec, self._cgroups

        def preexec() -> None:
            cgroups.enter(own)
            if outer is not None:
                outer()

        self.preexec = preexec
        try:
            self._spawn(self.plan["argv"], self.plan["missing"], stdout=subprocess.PIPE)
        finally:
            self.preexec = outer

    def _check_root(self) -> None:
        """What the container boots exists: a NixOS system's init (mkTest), or the image's tree."""
        init = self.plan.get("init")
        if init:
            if not Path(init).exists():
                raise SetupError(f"{self.machine_name}: no NixOS init at {init}: "
                                 "the system is not in this host's /nix/store (build the test's driver)")
            return
        tree = Path(self.plan.get("tree") or "")
        if not (tree / "sbin" / "init").exists() and not (tree / "usr" / "sbin" / "init").exists():
            raise SetupError(f"{self.machine_name}: no root tree with an init at {tree}: rebuild the "
                             "guest image (`ntng image build`), which keeps the tree for containers")

    def _make_root_skeleton(self) -> None:
        """A NixOS container's root folder (nixlib's rootSkeleton; kept ones are left as
        they are): readable by the container's users, its root's home private."""
        skeleton = self.plan.get("rootSkeleton")
        if not skeleton:
            return
        self.upper.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.upper.chmod(0o755)
        for rel in skeleton["folders"]:
            (self.upper / rel).mkdir(mode=0o755, parents=True, exist_ok=True)
        for rel in skeleton["private"]:
            (self.upper / rel).mkdir(mode=0o700, parents=True, exist_ok=True)
        for rel in skeleton["files"]:
            (self.upper / rel).touch(exist_ok=True)

    def _prepare_folders(self) -> None:
        """Private state and backdoor folders, the upper layer fresh unless kept (-K, or a
        restart within the run), no work folder of an earlier nspawn, a fresh key."""
        paths.private_dir(self.state_dir)
        if not (self.keep_disk and self.upper.is_dir()):
            shutil.rmtree(self.layer, ignore_errors=True)
        for folder in self.plan["folders"]:
            paths.private_dir(Path(folder))
        self._remove_work_folders()
        self._remove_sockets()
        backdoorkey.write(self.plan)  # in the bind-mounted folder: root-only in the container

    def _remove_work_folders(self) -> None:
        """overlayfs's work folders (nspawn names them .#<upper><random>) are of no use once
        the container is gone, and a new one is made at every start."""
        if self.layer.is_dir():
            for work in self.layer.glob(".#*"):
                shutil.rmtree(work, ignore_errors=True)

    # -- NICs: a veth pair per interface, in the test's network namespace ------------------------

    def _in_test_netns(self, fn: Callable[[], None]) -> None:
        """Run `fn` on a thread of its own inside the test's network namespace (the Machine's
        preexec enters it; setns moves only the calling thread), where the bridges are."""
        errors: list[BaseException] = []

        def inside() -> None:
            try:
                if self.preexec is not None:
                    self.preexec()
                fn()
            except BaseException as e:  # handed to the caller
                errors.append(e)

        t = threading.Thread(target=inside, name=f"netns-{self.machine_name}", daemon=True)
        t.start()
        t.join(NETNS_TIMEOUT)
        if t.is_alive():
            raise SetupError(f"{self.machine_name}: making its veths took over {NETNS_TIMEOUT:.0f}s")
        if errors:
            raise errors[0]

    def _make_veths(self) -> None:
        """Host end named as a VM's tap (what counters, block and impairment act on), on the
        vlan's bridge; the container's end (the plan's MAC) is moved in by nspawn.  The network
        made a TAP by that name, and a previous start's pair may still be going away: both are
        replaced."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        with IPRoute() as ipr:
            for i in self.plan["interfaces"]:
                host, peer = i["tap"], i["peer"]
                try:
                    for name in (host, peer):
                        for index in ipr.link_lookup(ifname=name):
                            ipr.link("del", index=index)
                    self._add_veth(ipr, host, peer, i["mac"])
                    bridge = ipr.link_lookup(ifname=i["bridge"])
                    if not bridge:
                        raise SetupError(f"{self.machine_name}: no bridge {i['bridge']} for vlan {i['vlan']}: "
                                         "is the test's network up?")
                    ipr.link("set", index=ipr.link_lookup(ifname=host)[0], master=bridge[0], state="up")
                except NetlinkError as e:
                    raise SetupError(f"{self.machine_name}: cannot make veth {host}/{peer} on "
                                     f"{i['bridge']}: {e}") from None

    def _move_peers(self) -> None:
        """Hand the container its ends once its init runs in a network namespace of its own
        (nspawn's first child is still in ours: it is not the container yet)."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        ours = os.stat("/proc/thread-self/ns/net").st_ino
        deadline = time.monotonic() + NETNS_TIMEOUT
        while True:
            init = self.container_init()
            if init is not None and _netns_inode(init) not in (None, ours):
                break
            if not self.alive():
                raise SetupError(f"{self.machine_name}: nspawn exited before its container ran: "
                                 f"{self.stderr_tail()}")
            if time.monotonic() > deadline:
                raise SetupError(f"{self.machine_name}: no container init in a network namespace of "
                                 f"its own within {NETNS_TIMEOUT:.0f}s")
            time.sleep(0.005)
        with IPRoute() as ipr:
            for i in self.plan["interfaces"]:
                try:
                    ipr.link("set", index=ipr.link_lookup(ifname=i["peer"])[0], net_ns_pid=init)
                except (NetlinkError, IndexError) as e:
                    raise SetupError(f"{self.machine_name}: cannot move {i['peer']} into the container: "
                                     f"{e}") from None

    def _check_netem(self) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            if not netem.host_netem_supported(ipr):
                self.check_guest_impairment()

    def check_guest_impairment(self) -> None:
        """The Machine asks before it impairs a link inside the guest (the host has no
        sch_netem): a container shares the host's kernel, so its tc has none either."""
        raise MissingCapability(
            f"{self.machine_name}: impairment needs sch_netem in the host's kernel, which a container "
            "shares, and this host has none (modprobe sch_netem; or make the node a VM: "
            'backend = "qemu")')

    @staticmethod
    def _add_veth(ipr: Any, host: str, peer: str, mac: str) -> None:
        """A dying network namespace frees its veths asynchronously: retry a name still taken."""
        from pyroute2.netlink.exceptions import NetlinkError

        deadline = time.monotonic() + NETNS_TIMEOUT
        while True:
            try:
                ipr.link("add", ifname=host, kind="veth", peer={"ifname": peer, "address": mac})
                return
            except NetlinkError as e:
                if e.code != errno.EEXIST or time.monotonic() > deadline:
                    raise
                for name in (host, peer):
                    for index in ipr.link_lookup(ifname=name):
                        ipr.link("del", index=index)
                time.sleep(0.05)

    # -- the running container ----------------------------------------------------------------

    def connect_backdoor(self, timeout: float) -> socket.socket:
        return connect_unix(self.plan["backdoor"]["socket"], timeout=timeout, alive=self.alive)

    def exited_for_reboot(self) -> bool:
        return self.proc is not None and self.proc.poll() == self.plan["rebootExitStatus"]

    def container_init(self) -> int | None:
        """The host pid of the container's init: unshare's child is nspawn, nspawn's is init."""
        if not self.alive():
            return None
        assert self.proc is not None
        nspawn = _children(self.proc.pid)
        init = _children(nspawn[0]) if nspawn else []
        return init[0] if init else None

    def _signal_init(self, sig: int, what: str) -> None:
        pid = self.container_init()
        if pid is None:
            raise SetupError(f"{self.machine_name}: {what}: the container is not running")
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            raise SetupError(f"{self.machine_name}: {what}: the container is not running") from None

    def send_key(self, key: str) -> None:
        """Only ctrl-alt-delete, which a container's init gets as SIGINT (Machine.reboot)."""
        if key not in ("ctrl-alt-delete", "ctrl-alt-del"):
            raise self._lacks("keys", f"send_key({key!r})")
        self._signal_init(CTRL_ALT_DEL, "ctrl-alt-delete")

    def powerdown(self) -> None:
        self._signal_init(POWEROFF, "powerdown")

    def quit(self) -> None:
        """Like pulling the plug: the whole PID namespace goes at once."""
        self.kill()

    def kill(self) -> None:
        """SIGKILL unshare and nspawn (their session): the end of nspawn's PID namespace kills
        the container.  Waits (bounded) until its processes are gone, so that its mounts are
        gone too when this returns."""
        init = self.container_init()
        super().kill()
        if init is not None:
            deadline = time.monotonic() + KILL_REAP_TIMEOUT
            while _running(init) and time.monotonic() < deadline:
                time.sleep(0.01)
        self._remove_sockets()

    def release(self) -> None:
        """Stop the container and clean up (processes, sockets, console, overlay work folder);
        the upper layer stays for a restart (the run's state folder goes at the run's end, or
        stays with -K).  Safe to call twice."""
        self.kill()
        self._end_stdout_console(CONSOLE_JOIN_TIMEOUT)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self._remove_work_folders()
        self._remove_sockets()
        cgroups.remove(self._cgroups)  # after kill(): no process is left in them
        self._cgroups = []

    # -- what a container has not got ---------------------------------------------------------

    def pause(self) -> None:
        raise self._lacks("snapshot", "pause()")

    def resume(self) -> None:
        raise self._lacks("snapshot", "resume()")

    def send_console(self, chars: str) -> None:
        raise self._lacks("consoleInput", "send_console()")

    def screendump(self, path: Path, fmt: str = "ppm") -> None:
        raise self._lacks("screenshot", "a screenshot")

    def snapshot_save(self, layout: SnapshotLayout, resume: bool = True) -> tuple[int, int]:
        raise self._lacks("snapshot", "snapshot()")

    def snapshot_restore(self, layout: SnapshotLayout) -> None:
        raise self._lacks("snapshot", "a restore")

    def set_link(self, netdev: str, up: bool) -> None:
        """block()/unblock(): the host end of NIC net<n> down or up (the container's end loses
        its carrier, as a VM's NIC does with QEMU's set_link)."""
        from pyroute2 import IPRoute

        ifaces = self.plan["interfaces"]
        n = int(netdev.removeprefix("net")) if netdev.removeprefix("net").isdigit() else -1
        if not 0 <= n < len(ifaces):
            raise SetupError(f"{self.machine_name}: no NIC {netdev} (it has {len(ifaces)})")
        host = ifaces[n]["tap"]

        def flip() -> None:
            with IPRoute() as ipr:
                found = ipr.link_lookup(ifname=host)
                if not found:
                    raise SetupError(f"{self.machine_name}: veth {host} is gone (is the container running?)")
                ipr.link("set", index=found[0], state="up" if up else "down")

        self._in_test_netns(flip)


def _running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (a dead init waiting for its reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    """A process's children, oldest first (/proc/<pid>/task/<pid>/children)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(w) for w in text.split()]
