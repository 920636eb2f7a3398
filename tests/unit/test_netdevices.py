"""The test network without VMs: the real namespace, bridges, taps and vde_switches made from a
nixlib network plan, and the forward_port relay."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from ntng import errors, network, nixeval
from ntng.errors import SetupError
from ntng.portforward import PortForward

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="makes network devices: needs root")


def plan(tmp: Path | None = None, mode: str = "tap") -> dict[str, Any]:
    header = {"nodes": {"a": {"vlans": [1]}, "b": {"vlans": [1, 2]}, "solo": {}}}
    defaults = {"kernel": "/k", "image": "/i", "stateRoot": str(tmp or "/s"), "networkMode": mode}
    spec: dict[str, Any] = nixeval.call("testSpec", {"header": header, "defaults": defaults})
    return spec["network"]


def holders(ns: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.readlink(proc / "ns/net") == ns:
                    found.append(proc.name)
                found += [f"{proc.name}/{fd.name}" for fd in (proc / "fd").iterdir() if os.readlink(fd) == ns]
            except OSError:
                pass
    return found


@root_only
def test_tap_network_lives_in_its_own_namespace_and_vanishes() -> None:
    p = plan()
    net = network.make(p, log=lambda _m: None)
    assert isinstance(net, network.TapNetwork)
    net.start()
    try:
        assert net.ns is not None
        ns = f"net:[{net.ns.inode}]"
        assert ns != os.readlink("/proc/self/ns/net")
        names = {link.get_attr("IFLA_IFNAME") for link in net.ipr.get_links()}
        taps = {i["tap"] for ifaces in p["nodes"].values() for i in ifaces}
        assert names == {"lo", "ntng-br1", "ntng-br2"} | taps
        host = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
        assert not any(t in host for t in taps | {"ntng-br1"}), "devices leaked into the host namespace"
        # The runner's address on each bridge, for forward_port.
        addrs = {a.get_attr("IFA_ADDRESS") for a in net.ipr.get_addr()}
        assert {"192.168.1.254", "192.168.2.254", "2001:db8:1::fffe"} <= addrs
        # Taps hang off their vlan's bridge.
        br2 = net.ipr.link_lookup(ifname="ntng-br2")[0]
        tap_b2 = net.interface("b", 2)["tap"]
        assert net.ipr.get_links(net.ipr.link_lookup(ifname=tap_b2)[0])[0].get_attr("IFLA_MASTER") == br2
        assert net.counters("b", 2) == network.LinkCounters(0, 0, 0, 0)  # no VM attached: nothing moved
        net.set_link("a", 1, up=False)
        state = net.ipr.get_links(net.ipr.link_lookup(ifname=net.interface("a", 1)["tap"])[0])[0]
        assert not state["flags"] & 1  # IFF_UP cleared
        # A socket made in the namespace sees the bridge's address.
        s = net.ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("192.168.1.254", 0))
        s.close()
    finally:
        net.release()
    assert holders(ns) == [], "the namespace is still referenced after release"


def test_plan_lookups_name_node_and_vlan() -> None:
    net = network.Network(plan(), log=lambda _m: None)
    assert net.interface("b", 2)["ipv4"] == "192.168.2.2"
    with pytest.raises(errors.TestScriptError, match=r"b: is not on vlan 3 \(its vlans: 1, 2\)"):
        net.interface("b", 3)
    with pytest.raises(errors.TestScriptError, match=r"solo: has no network interfaces"):
        net.interface("solo", None)
    with pytest.raises(errors.TestScriptError, match=r"no node called 'zz' \(nodes: a, b, solo\)"):
        net.interface("zz", 1)


def test_no_vlans_no_network_work() -> None:
    net = network.make({"nodes": {"m": []}, "vlans": {}, "mode": "tap"}, log=lambda _m: None)
    assert type(net) is network.Network and net.preexec() is None
    with pytest.raises(errors.MissingCapability, match="link counters need TAP networking"):
        net.counters("m")


def test_vde_network_runs_one_switch_per_vlan(tmp_path: Path) -> None:
    if shutil.which("vde_switch") is None:
        pytest.fail("vde_switch (apt-get install vde2) is part of the setup")
    p = plan(tmp_path, mode="vde")
    net = network.make(p, log=lambda _m: None)
    assert isinstance(net, network.VdeNetwork)
    net.start()
    try:
        assert len(net.switches) == 2 and all(proc.poll() is None for proc in net.switches)
        for v in ("1", "2"):
            assert Path(p["vlans"][v]["vdeReady"]).is_socket() and p["vlans"][v]["vdeReady"].startswith(p["vlans"][v]["vdeSocket"] + "/")
        with pytest.raises(errors.MissingCapability, match=r"a: forward_port needs TAP networking"):
            net.check_forwarding("a")
    finally:
        net.release()
    assert net.switches == []
    out = subprocess.run(["pgrep", "-f", f"vde_switch --sock {tmp_path}"], capture_output=True)
    assert out.returncode == 1, "a vde_switch outlived release()"


def test_vde_switch_missing_is_a_setup_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    p = plan(tmp_path, mode="vde")
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    with pytest.raises(SetupError, match="apt-get install vde2"):
        network.VdeNetwork(p, log=lambda _m: None).start()


def test_choose_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[str] = []
    monkeypatch.setattr(network, "has_capability", lambda cap: cap != network.CAP_NET_ADMIN)
    assert network.choose_mode("auto", said.append) == "vde"
    assert "no CAP_NET_ADMIN: rootless VDE networking" in said[0]
    with pytest.raises(SetupError, match="--network tap needs CAP_NET_ADMIN"):
        network.choose_mode("tap", said.append)
    assert network.choose_mode("vde", said.append) == "vde"
    with pytest.raises(SetupError, match="--network must be auto, tap or vde"):
        network.choose_mode("slirp", said.append)


def test_port_forward_relays_both_ways_and_closes() -> None:
    upstream = socket.create_server(("127.0.0.1", 0))

    def echo_upper() -> None:
        conn, _ = upstream.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data.upper())

    threading.Thread(target=echo_upper, daemon=True).start()
    fwd = PortForward(0, lambda: socket.create_connection(upstream.getsockname()), "test", lambda _m: None)
    try:
        with socket.create_connection(("127.0.0.1", fwd.port), timeout=10) as c:
            payload = os.urandom(300_000).hex().encode()[:400_000].lower()
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := c.recv(65536):
                got += chunk
        assert got == payload.upper()
    finally:
        fwd.close()
        upstream.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", fwd.port), timeout=2)


def test_port_forward_busy_port_says_which() -> None:
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        with pytest.raises(OSError, match=rf"cannot listen on 127.0.0.1:{busy.getsockname()[1]}"):
            PortForward(busy.getsockname()[1], lambda: busy, "x", lambda _m: None)
    finally:
        busy.close()


def test_declared_impairments_are_checked_before_anything_starts(tmp_path: Path) -> None:
    from ntng import check, testspec

    script = tmp_path / "t.py"
    script.write_text('#: nodes.a = { vlans = [ 1 2 ]; impairments = [ { vlan = 2; delay = 50; loss = 5; direction = "in"; } ]; };\n'
                      '#: nodes.b = { vlans = [ 1 ]; };\nstart_all()\n')
    spec = testspec.load(script, {"kernel": "/k", "image": "/i", "stateRoot": str(tmp_path)})
    got = network.declared_impairments(spec.network, str(script))
    assert list(got) == [("a", 2)]
    imp, direction = got[("a", 2)]
    assert (imp.delay_ms, imp.loss, direction) == (50, 5, "in")
    # Out of range: `ntng check` (and the runner, before any VM) names script, node and vlan.
    script.write_text('#: nodes.a = { vlans = [ 1 ]; impairments = [ { vlan = 1; loss = 150; } ]; };\nstart_all()\n')
    with pytest.raises(errors.TestScriptError,
                       match=r"t.py: nodes.a.impairments \(vlan 1\): loss must be a percentage from 0 to 100, got 150"):
        check.check(script)
    script.write_text('#: nodes.a = { vlans = [ 1 ]; impairments = [ { vlan = 1; direction = "up"; } ]; };\nstart_all()\n')
    with pytest.raises(errors.TestScriptError, match=r"nodes.a.impairments \(vlan 1\): .*direction"):
        check.check(script)
    # A link the node does not have: nixlib says so with the script line.
    script.write_text('#: nodes.a = { vlans = [ 1 ]; impairments = [ { vlan = 4; loss = 1; } ]; };\nstart_all()\n')
    with pytest.raises(errors.NixEvalError, match=r"t.py:1: .*node 'a': impairments: vlan 4 is not one of the node's vlans \(1\)"):
        check.check(script)
