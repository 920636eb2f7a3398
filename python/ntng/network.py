"""The test's network, made from nixlib's network plan (nixlib/network.nix).

Two modes, chosen before nixlib computes the VM command lines (the NICs differ):
  tap  bridges and TAP devices made with pyroute2 inside the runner's own network namespace
       (python/ntng/netns.py); QEMU runs inside it.  Link counters, impairment with tc on the
       taps, forward_port.  Needs CAP_NET_ADMIN (and CAP_SYS_ADMIN for the namespace).
  vde  rootless: one vde_switch per vlan, as the NixOS driver does.  No counters, no
       forward_port; they raise MissingCapability saying so.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import netem, pdeathsig
from .errors import MissingCapability, PlanError, SetupError, TestScriptError
from .netns import CAP_NET_ADMIN, CAP_SYS_ADMIN, NetNamespace, has_capability
from .plan import Interface, NetworkPlan

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class LinkCounters:
    """Bytes and packets on one link, from the guest's point of view (tx = sent by the guest)."""

    rx_bytes: int
    rx_packets: int
    tx_bytes: int
    tx_packets: int

    def __sub__(self, other: LinkCounters) -> LinkCounters:
        return LinkCounters(*(a - b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other),
                                                   strict=True)))

    @property
    def total_bytes(self) -> int:
        return self.rx_bytes + self.tx_bytes


def choose_mode(requested: str, log: Log) -> str:
    """"tap" when the runner may make devices and namespaces, else "vde" (said loudly)."""
    if requested not in ("auto", "tap", "vde"):
        raise SetupError(f"--network must be auto, tap or vde, got {requested!r}")
    missing = [name for cap, name in ((CAP_NET_ADMIN, "CAP_NET_ADMIN"), (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"))
               if not has_capability(cap)]
    if not os.path.exists("/dev/net/tun"):
        missing.append("/dev/net/tun")
    if requested == "tap" and missing:
        raise SetupError(f"--network tap needs {', '.join(missing)}; run as root or use --network vde")
    if requested == "auto" and missing:
        log(f"ntng: WARNING: no {', '.join(missing)}: rootless VDE networking "
            "(no link counters, no forward_port; impairment runs inside the guests)")
        return "vde"
    return "tap" if requested == "auto" else requested


class Network:
    """What machines and test scripts ask of the network, whatever the mode."""

    mode = "none"

    def __init__(self, plan: NetworkPlan, log: Log) -> None:
        self.plan = plan
        self.log = log

    def interfaces(self, node: str) -> list[Interface]:
        return list(self.plan["nodes"].get(node, []))

    def interface(self, node: str, vlan: int | None) -> Interface:
        ifaces = self.interfaces(node)
        if node not in self.plan["nodes"]:
            raise TestScriptError(f"no node called {node!r} (nodes: {', '.join(sorted(self.plan['nodes']))})")
        if not ifaces:
            raise TestScriptError(f"{node}: has no network interfaces (declare vlans = [ … ] for it)")
        if vlan is None:
            return ifaces[0]
        for i in ifaces:
            if i["vlan"] == vlan:
                return i
        raise TestScriptError(f"{node}: is not on vlan {vlan} (its vlans: {', '.join(str(i['vlan']) for i in ifaces)})")

    def start(self) -> None:
        pass

    def add_clone(self, clone: str, ifaces: list[Interface]) -> None:
        """A clone's NICs (nixlib's clone.plan: the origin's vlans, its own taps, MACs and
        addresses), made and known to interface()/counters() like a declared node's."""
        self._add_links(ifaces)
        self.plan["nodes"][clone] = ifaces

    def _add_links(self, ifaces: list[Interface]) -> None:
        pass  # VDE: the clone's NICs plug into the vlans' switches themselves

    def preexec(self) -> Callable[[], None] | None:
        """Run in a VMM's child process before exec (tap mode: enter the namespace)."""
        return None

    def counters(self, node: str, vlan: int | None = None) -> LinkCounters:
        raise MissingCapability(f"{node}: link counters need TAP networking (CAP_NET_ADMIN); "
                                f"this run uses {self.mode} networking")

    def host_impairment(self) -> bool:
        """Whether impairment is applied on the host side (else machines apply it in the guest)."""
        return False

    def impair(self, node: str, vlan: int | None, imp: netem.Impairment | None, direction: str) -> None:
        raise MissingCapability(f"{node}: host-side impairment needs TAP networking and sch_netem")

    def set_link(self, node: str, vlan: int | None, up: bool) -> None:
        raise MissingCapability(f"{node}: link up/down needs TAP networking (CAP_NET_ADMIN)")

    def check_forwarding(self, node: str) -> None:
        """Raise now, not at the first connection, if forward_port cannot reach `node`."""
        self.connect(node, 0)

    def connect(self, node: str, port: int, timeout: float = 10.0) -> socket.socket:
        raise MissingCapability(f"{node}: forward_port needs TAP networking (CAP_NET_ADMIN); "
                                f"this run uses {self.mode} networking")

    def release(self) -> None:
        pass


class TapNetwork(Network):
    mode = "tap"

    def __init__(self, plan: NetworkPlan, log: Log) -> None:
        super().__init__(plan, log)
        self.ns: NetNamespace | None = None
        self.ipr: Any = None
        self._host_netem: bool | None = None

    def start(self) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        self.ns = NetNamespace()
        self.ipr = self.ns.iproute()
        ipr = self.ipr
        step = "bring up lo"
        try:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            for vlan in self.plan["vlans"].values():
                br = vlan["bridge"]
                step = f"create bridge {br}"
                # No STP and no forwarding delay: a link is usable the moment a guest's NIC is.
                ipr.link("add", ifname=br, kind="bridge", br_stp_state=0, br_forward_delay=0)
                idx = ipr.link_lookup(ifname=br)[0]
                step = f"address bridge {br}"
                ipr.addr("add", index=idx, address=vlan["hostAddress4"], prefixlen=24)
                ipr.addr("add", index=idx, address=vlan["hostAddress6"], prefixlen=64,
                         flags=0x02)  # IFA_F_NODAD: usable at once
                ipr.link("set", index=idx, state="up")
            for node, ifaces in self.plan["nodes"].items():
                for i in ifaces:
                    step = f"create tap {i['tap']} for {node}"
                    self._add_tap(i["tap"])
                    idx = ipr.link_lookup(ifname=i["tap"])[0]
                    master = ipr.link_lookup(ifname=i["bridge"])[0]
                    ipr.link("set", index=idx, master=master, state="up")
        except NetlinkError as e:
            raise SetupError(f"network: cannot {step}: {e}") from None
        self.log(f"ntng: network: {len(self.plan['vlans'])} bridge(s), "
                 f"{sum(len(v) for v in self.plan['nodes'].values())} tap(s) in namespace net:[{self.ns.inode}]")

    def _add_tap(self, name: str) -> None:
        self.ipr.link("add", ifname=name, kind="tuntap", mode="tap")

    def _add_links(self, ifaces: list[Interface]) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        for i in ifaces:
            try:
                self._add_tap(i["tap"])
                self.ipr.link("set", index=self._index(i["tap"]),
                              master=self._index(i["bridge"]), state="up")
            except NetlinkError as e:
                raise SetupError(f"network: cannot create tap {i['tap']}: {e}") from None

    def preexec(self) -> Callable[[], None] | None:
        ns = self.ns
        return ns.enter if ns is not None else None

    def _index(self, tap: str) -> int:
        found = self.ipr.link_lookup(ifname=tap)
        if not found:
            raise SetupError(f"network: tap {tap} is gone")
        return int(found[0])

    def counters(self, node: str, vlan: int | None = None) -> LinkCounters:
        tap = self.interface(node, vlan)["tap"]
        link = self.ipr.get_links(self._index(tap))[0]
        s = link.get_attr("IFLA_STATS64")
        # The tap's rx is what the guest sent.
        return LinkCounters(rx_bytes=s["tx_bytes"], rx_packets=s["tx_packets"],
                            tx_bytes=s["rx_bytes"], tx_packets=s["rx_packets"])

    def host_impairment(self) -> bool:
        if self._host_netem is None:
            self._host_netem = netem.host_netem_supported(self.ipr)
            if not self._host_netem:
                self.log("ntng: the host kernel has no sch_netem: impairment is applied inside the guests with tc")
        return self._host_netem

    def impair(self, node: str, vlan: int | None, imp: netem.Impairment | None, direction: str) -> None:
        i = self.interface(node, vlan)
        netem.apply_host(self.ipr, i["tap"], imp, direction, ifb_name=i["ifb"])

    def set_link(self, node: str, vlan: int | None, up: bool) -> None:
        tap = self.interface(node, vlan)["tap"]
        self.ipr.link("set", index=self._index(tap), state="up" if up else "down")

    def check_forwarding(self, node: str) -> None:
        self.interface(node, None)

    def connect(self, node: str, port: int, timeout: float = 10.0) -> socket.socket:
        if self.ns is None:
            raise SetupError("network: not started")
        addr = self.interface(node, None)["ipv4"]
        sock = self.ns.socket()
        sock.settimeout(timeout)
        try:
            sock.connect((addr, port))
        except OSError as e:
            sock.close()
            raise ConnectionError(f"{node}: cannot connect to {addr}:{port}: {e}") from None
        sock.settimeout(None)
        return sock

    def release(self) -> None:
        # The namespace and every bridge and tap in it go away with the last reference; the
        # VMMs holding taps were killed before this.
        if self.ipr is not None:
            self.ipr.close()
            self.ipr = None
        if self.ns is not None:
            self.ns.close()
            self.ns = None


class VdeNetwork(Network):
    mode = "vde"

    def __init__(self, plan: NetworkPlan, log: Log) -> None:
        super().__init__(plan, log)
        self.switches: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        for vlan in self.plan["vlans"].values():
            # nixlib's: network.nix vdeSwitchArgv, and the control socket the switch makes when ready
            argv, ready_path = vlan["vdeSwitch"], vlan["vdeReady"]
            if argv is None or ready_path is None:
                raise PlanError(f"vlan {vlan['vlan']}: the network plan names no vde_switch (not a VDE plan)")
            exe = shutil.which(argv[0])
            if exe is None:
                raise SetupError(f"rootless networking needs {argv[0]}: apt-get install vde2 (or run ./setup.sh)")
            ready = Path(ready_path)
            # stdin stays open: vde_switch reads commands from it and quits at EOF.
            proc = pdeathsig.spawn([exe, *argv[1:]],
                                   stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, start_new_session=True)
            self.switches.append(proc)
            deadline = time.monotonic() + 10
            while not ready.exists():
                if proc.poll() is not None:
                    err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
                    raise SetupError(f"network: vde_switch for vlan {vlan['vlan']} exited: {err or '(no output)'}")
                if time.monotonic() > deadline:
                    raise SetupError(f"network: vde_switch for vlan {vlan['vlan']} made no {ready} in 10s")
                time.sleep(0.02)
        self.log(f"ntng: network: rootless, {len(self.switches)} vde_switch(es)")

    def release(self) -> None:
        for proc in self.switches:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for f in (proc.stdin, proc.stderr):
                if f is not None:
                    f.close()
        self.switches = []


def declared_impairments(plan: NetworkPlan, where: str) -> dict[tuple[str, int], tuple[netem.Impairment, str]]:
    """The impairments a test declares on its nodes' links (nodes.<n>.impairments), checked:
    a bad value is the script's error before any VM starts."""
    out = {}
    for node, ifaces in plan["nodes"].items():
        for i in ifaces:
            decl = i.get("impairment")
            if decl is None:
                continue
            ctx = f"{where}: nodes.{node}.impairments (vlan {i['vlan']})"
            params = {k: v for k, v in decl.items() if k != "direction"}
            direction = decl.get("direction", "both")
            try:
                netem.check_direction(direction)
            except netem.ImpairmentError as e:
                raise netem.ImpairmentError(f"{ctx}: {e}") from None
            out[(node, i["vlan"])] = (netem.Impairment.from_mapping(params, where=ctx), direction)
    return out


def make(plan: NetworkPlan, log: Log) -> Network:
    """The network for a test spec's plan (a test without vlans gets a Network that has none)."""
    if not plan.get("vlans"):
        return Network(plan, log)
    return VdeNetwork(plan, log) if plan.get("mode") == "vde" else TapNetwork(plan, log)
