"""The network plan (nixlib/network.nix): vlans -> bridges, TAP devices, MACs, addresses, hosts.

Properties are checked with hypothesis over sets of node names and vlan lists; every example is a
batch of plans evaluated in one nix-instantiate run (a plan that throws is caught inside Nix with
builtins.tryEval, so one rejected plan does not hide the others).
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import tempfile
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ntng import nixeval, paths
from ntng.errors import NixEvalError

NETWORK = paths.nixlib_dir() / "network.nix"  # NTNG_DATA can point the tests at another copy

Nodes = dict[str, dict[str, Any]]
Plan = dict[str, Any]

# Linux dev_valid_name(): 1 to 15 bytes (IFNAMSIZ 16 with the NUL), not "." or "..", no '/',
# ':' or white space.  The plan's names stay within the portable subset below.
IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
MAC = re.compile(r"52:54:00(:[0-9a-f]{2}){3}")


def nix_map(function: str, args: list[Any]) -> list[Any]:
    """Apply the Nix function `function` (with `network` = nixlib/network.nix in scope) to every
    element of `args` in one evaluation.  The arguments go through a file: a batch of plans can
    exceed the kernel's limit on the length of one command-line argument."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(args, f)
        f.flush()
        expr = (f"{{ argsFile }}: let network = import {json.dumps(str(NETWORK))}; f = {function}; in "
                "map f (builtins.fromJSON (builtins.readFile argsFile))")
        cmd = [nixeval.nix_instantiate(), "--eval", "--strict", "--json", "--option", "build-users-group", "",
               "--expr", expr, "--argstr", "argsFile", f.name]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if r.returncode != 0:
        raise NixEvalError(nixeval.nix_message(r.stderr))
    out = json.loads(r.stdout)
    assert isinstance(out, list) and len(out) == len(args)
    return out


def plans(networks: list[Nodes]) -> list[Plan | None]:
    """network.plan of each input; None where the plan threw."""
    return nix_map("x: let r = builtins.tryEval (let p = network.plan x; in builtins.deepSeq p p); "
                   "in if r.success then r.value else null", networks)


def plan(nodes: Nodes) -> Plan:
    p: Plan = nixeval.call("network.plan", nodes)
    return p


def vlans_of(nodes: Nodes, name: str) -> list[int]:
    vs: list[int] = nodes[name].get("vlans", [])
    return vs


def check_plan(nodes: Nodes, p: Plan) -> None:
    """Everything a plan must satisfy, from its input alone."""
    names = sorted(nodes)
    assert sorted(p["nodes"]) == names
    interfaces = [i for n in names for i in p["nodes"][n]]
    bridges = {f"ntng-br{v}" for n in names for v in vlans_of(nodes, n)}

    for name in names:
        ifs = p["nodes"][name]
        vs = vlans_of(nodes, name)
        number = names.index(name) + 1  # NixOS: node i of the sorted names
        assert [i["vlan"] for i in ifs] == vs, name  # one interface per vlan, in the node's order
        for k, (i, v) in enumerate(zip(ifs, vs, strict=True)):
            assert i["guestName"] == f"eth{k}" and i["bridge"] == f"ntng-br{v}"
            assert i["guestIfb"] == f"ifb-eth{k}" and IFNAME.fullmatch(i["guestIfb"])  # in-guest impairment
            assert i["ipv4"] == f"192.168.{v}.{number}" and i["prefixLength4"] == 24
            assert i["ipv6"] == f"2001:db8:{v}::{number}" and i["prefixLength6"] == 64
            assert ipaddress.ip_address(i["ipv4"]) in ipaddress.ip_network(p["vlans"][str(v)]["subnet4"])
            assert ipaddress.ip_address(i["ipv6"]) in ipaddress.ip_network(p["vlans"][str(v)]["subnet6"])
            tap = i["tap"]
            assert IFNAME.fullmatch(tap) and tap not in (".", "..") and len(tap.encode()) <= 15, tap
            assert tap.startswith(name[:6]), (name, tap)  # readable: the node's name comes first
            assert tap not in bridges
            assert MAC.fullmatch(i["mac"]), i["mac"]
            first = int(i["mac"][:2], 16)
            assert first & 1 == 0 and first & 2 == 2  # unicast, locally administered

    # Unique within the plan: MACs and taps over all nodes, addresses within each vlan.
    for key in ("mac", "tap"):
        values = [i[key] for i in interfaces]
        assert len(values) == len(set(values)), key
    for v in {i["vlan"] for i in interfaces}:
        on_v = [i for i in interfaces if i["vlan"] == v]
        for key in ("ipv4", "ipv6"):
            assert len({i[key] for i in on_v}) == len(on_v), (v, key)

    # The vlans and their members.
    all_vlans = sorted({v for n in names for v in vlans_of(nodes, n)})
    assert sorted(p["vlans"], key=int) == [str(v) for v in all_vlans]
    for v in all_vlans:
        assert p["vlans"][str(v)] == {
            "vlan": v,
            "bridge": f"ntng-br{v}",
            "subnet4": f"192.168.{v}.0/24",
            "subnet6": f"2001:db8:{v}::/64",
            "members": [n for n in names if v in vlans_of(nodes, n)],
            "hostAddress4": f"192.168.{v}.254",
            "hostAddress6": f"2001:db8:{v}::fffe",
        }

    # Hosts: every node with a vlan, at its address on its first vlan; nodes without none.
    hosts = []
    for name in names:
        if p["nodes"][name]:
            first_if = p["nodes"][name][0]
            hosts += [{"address": first_if["ipv4"], "names": [name]}, {"address": first_if["ipv6"], "names": [name]}]
    assert p["hosts"] == hosts
    assert p["hostsFile"] == ("".join(f"{h['address']} {h['names'][0]}\n" for h in hosts) if hosts else "\n")


# --- generated plans ----------------------------------------------------------------------------

# Node names as test.nix accepts them (a letter, then letters, digits, - or _; at most 31), with
# many sharing a 6-character prefix, the part of the name a tap keeps.
shared_prefix_names = st.builds(lambda p, s: p + s, st.sampled_from(["server", "client", "node_a"]),
                                st.from_regex(r"[0-9]{0,2}|[A-Za-z0-9_-]{0,25}", fullmatch=True))
names = st.one_of(shared_prefix_names, st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,30}", fullmatch=True))
vlan_lists = st.lists(st.one_of(st.integers(1, 3), st.integers(1, 254)), unique=True, max_size=4)
# A node without vlans either says vlans = [] or leaves it out.
node_specs = st.one_of(st.builds(lambda vs: {"vlans": vs}, vlan_lists), st.just({}))
# Crowded networks: many names sharing a prefix on the same few vlans.
crowded = st.dictionaries(shared_prefix_names, st.builds(lambda vs: {"vlans": vs},
                          st.lists(st.integers(1, 2), unique=True, min_size=1)), min_size=2, max_size=10)
networks = st.one_of(st.dictionaries(names, node_specs, min_size=1, max_size=10), crowded)


@st.composite
def network_and_newcomer(draw: st.DrawFn) -> tuple[Nodes, str, Nodes]:
    nodes = draw(networks)
    extra = draw(names.filter(lambda n: n not in nodes))
    return nodes, extra, {**nodes, extra: draw(node_specs)}


def shares_a_tap_prefix(nodes: Nodes) -> bool:
    """Whether two nodes on one vlan share the 6 characters of the name a tap keeps: the only
    case where a tap collision (1 in 65536, a documented error) can happen."""
    seen = [(n[:6], v) for n in nodes for v in vlans_of(nodes, n)]
    return len(seen) != len(set(seen))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(network_and_newcomer(), min_size=1, max_size=4))
def test_plan_properties(batch: list[tuple[Nodes, str, Nodes]]) -> None:
    inputs = [x for nodes, _, grown in batch for x in (nodes, grown)]
    results = plans(inputs)
    for nodes, p in zip(inputs, results, strict=True):
        event("names share a tap prefix" if shares_a_tap_prefix(nodes) else "no shared tap prefix")
        if p is None:
            # A plan is only ever refused for a tap or MAC collision, which needs a shared prefix
            # (or a 1 in 16 million MAC clash); the refusal says so and asks for a rename.
            with pytest.raises(NixEvalError, match=r"network: (tap name|MAC) \S+ collides between two nodes") as e:
                plan(nodes)
            assert "MAC" in str(e.value) or shares_a_tap_prefix(nodes), nodes
            continue
        check_plan(nodes, p)

    # The same node on the same vlan gets the same MAC and tap in every plan of the batch: they
    # depend on the node and vlan only, never on the other nodes.
    devices: dict[tuple[str, int], tuple[str, str]] = {}
    for p in results:
        for name, ifs in (p or {"nodes": {}})["nodes"].items():
            for i in ifs:
                assert devices.setdefault((name, i["vlan"]), (i["mac"], i["tap"])) == (i["mac"], i["tap"]), name

    # Adding a node does not touch the others' devices.
    for (nodes, extra, _), before, after in zip(batch, results[::2], results[1::2], strict=True):
        if before is None or after is None:
            continue
        for name in nodes:
            keep = ("vlan", "mac", "tap", "bridge", "guestName")
            assert [{k: i[k] for k in keep} for i in after["nodes"][name]] == \
                [{k: i[k] for k in keep} for i in before["nodes"][name]], (name, extra)


def test_generated_names_can_share_a_prefix() -> None:
    """The strategy above reaches the case it is there for (names sharing a tap prefix)."""
    assert shares_a_tap_prefix({"server1": {"vlans": [1]}, "server2": {"vlans": [1]}})
    assert not shares_a_tap_prefix({"server1": {"vlans": [1]}, "server2": {"vlans": [2]}})


# --- fixed cases --------------------------------------------------------------------------------

def test_plans_are_stable_across_evaluations() -> None:
    nodes: Nodes = {"server": {"vlans": [1, 2]}, "client": {"vlans": [2]}, "router": {"vlans": [2, 1]}, "off": {}}
    assert plan(nodes) == plan(nodes)  # two nix-instantiate runs


def test_two_node_plan() -> None:
    nodes: Nodes = {"server": {"vlans": [1, 2]}, "client": {"vlans": [2]}, "db": {}}
    p = plan(nodes)
    check_plan(nodes, p)
    # client=1, db=2, server=3 (sorted names), as the NixOS driver numbers them
    assert [i["ipv4"] for i in p["nodes"]["server"]] == ["192.168.1.3", "192.168.2.3"]
    assert [i["ipv6"] for i in p["nodes"]["client"]] == ["2001:db8:2::1"]
    assert p["nodes"]["db"] == []
    assert p["vlans"]["2"]["members"] == ["client", "server"]
    assert p["hostsFile"] == "192.168.2.1 client\n2001:db8:2::1 client\n192.168.1.3 server\n2001:db8:1::3 server\n"


def test_node_without_vlans_gets_nothing() -> None:
    cases: list[Nodes] = [{"alone": {}}, {"alone": {"vlans": []}}, {"alone": {"memory": 512}}]
    for nodes in cases:
        p = plan(nodes)
        assert p == {"nodes": {"alone": []}, "vlans": {}, "hosts": [], "hostsFile": "\n"}


def test_long_names_sharing_a_prefix() -> None:
    """31-character names (test.nix's limit) that agree on far more than the 6 characters a tap
    keeps, on 3-digit vlans: the longest tap names there are, still distinct and valid."""
    stem = "abcdef"
    nodes: Nodes = {stem + c * 25: {"vlans": [254, 100, 1]} for c in "xyzXYZ0_-"}
    nodes |= {stem: {"vlans": [254]}, stem + "g": {"vlans": [254, 1]}}
    assert all(len(n) <= 31 for n in nodes)
    p = plan(nodes)
    check_plan(nodes, p)
    taps = [i["tap"] for ifs in p["nodes"].values() for i in ifs]
    assert max(len(t) for t in taps) == 15
    assert all(t.startswith(stem) for t in taps)


def test_253_nodes_fill_a_vlan_and_leave_254_to_the_runner() -> None:
    nodes: Nodes = {f"n{i:03d}": {"vlans": [7]} for i in range(1, 254)}
    p = plan(nodes)
    check_plan(nodes, p)
    assert p["nodes"]["n253"][0]["ipv4"] == "192.168.7.253"
    assert p["vlans"]["7"]["hostAddress4"] == "192.168.7.254"
    assert len(p["hosts"]) == 2 * 253


@pytest.mark.parametrize("vlans", [[0], [255], ["1"], [-1], [1.5], [None], [1, 2, 1], 1, "1", {"a": 1}])
def test_bad_vlans_name_node_and_option(vlans: Any) -> None:
    with pytest.raises(NixEvalError) as e:
        plan({"web": {"vlans": vlans}, "other": {"vlans": [1]}})
    msg = str(e.value)
    assert "node 'web': vlans" in msg and "\n" not in msg, msg
    if vlans == [1, 2, 1]:
        assert "vlan 1 is listed twice" in msg
