"""The test spec (nixlib/test.nix): a test's header + the runner's defaults -> per-node launch
plans and the network plan, through nixeval (fn "testSpec") and through testspec.load with a
script's `#:` lines, as the runner does it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from ntng import nixeval, testspec
from ntng.errors import NixEvalError

# What the runner passes (python/ntng/runner.py), with KVM so that Firecracker nodes are allowed.
DEFAULTS = {"kernel": "/img/bzImage", "vmlinux": "/img/vmlinux", "initrd": "/img/initrd",
            "image": "/img/rootfs.ext4", "imageFormat": "raw", "accel": "kvm",
            "stateRoot": "/run/ntng-state", "tscKhz": 2500000}

Spec = dict[str, Any]
Plan = dict[str, Any]


def spec(header: dict[str, Any], without: tuple[str, ...] = (), **defaults: Any) -> Spec:
    """testSpec of `header` with the runner's DEFAULTS, changed by `defaults`, less `without`."""
    d = {k: v for k, v in {**DEFAULTS, **defaults}.items() if k not in without}
    s: Spec = nixeval.call("testSpec", {"header": header, "defaults": d})
    return s


def argv_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def fc_config(plan: Plan) -> dict[str, Any]:
    argv = plan["argv"]
    config: dict[str, Any] = plan["writeFiles"][argv[argv.index("--config-file") + 1]]
    return config


def guest_cid(plan: Plan) -> int | None:
    """The vsock CID a plan gives its guest (None: the node's backdoor is not on vsock)."""
    if plan["backend"] == "qemu":
        helpers = [h for h in plan["helpers"] if h["name"] == "vhost-device-vsock"]
        if not helpers:
            return None
        [arg] = [a for a in helpers[0]["argv"] if a.startswith("--guest-cid=")]
        assert int(arg.removeprefix("--guest-cid=")) == plan["backdoor"]["guestCid"]
        return int(arg.removeprefix("--guest-cid="))
    if plan["backend"] == "firecracker":
        cid: int = fc_config(plan)["vsock"]["guest_cid"]
        return cid
    body = plan["api"][0]["body"]
    return int(body["vsock"]["cid"]) if "vsock" in body else None


def kernel_of(plan: Plan) -> str:
    if plan["backend"] == "qemu":
        [k] = argv_values(plan["argv"], "-kernel")
        return k
    if plan["backend"] == "firecracker":
        k_fc: str = fc_config(plan)["boot-source"]["kernel_image_path"]
        return k_fc
    k_ch: str = plan["api"][0]["body"]["payload"]["kernel"]
    return k_ch


def kernel_params(plan: Plan) -> list[str]:
    if plan["backend"] == "qemu":
        [cmdline] = argv_values(plan["argv"], "-append")
    elif plan["backend"] == "firecracker":
        cmdline = fc_config(plan)["boot-source"]["boot_args"]
    else:
        cmdline = plan["api"][0]["body"]["payload"]["cmdline"]
    return cmdline.split()


def nics(plan: Plan) -> list[tuple[str, str]]:
    """(tap, mac) of every NIC the plan gives its VMM, in order."""
    if plan["backend"] == "qemu":
        argv = plan["argv"]
        netdevs = argv_values(argv, "-netdev")
        devices = [d for d in argv_values(argv, "-device") if d.startswith("virtio-net")]
        assert len(netdevs) == len(devices)
        out = []
        for k, (netdev, device) in enumerate(zip(netdevs, devices, strict=True)):
            m = re.fullmatch(rf"tap,id=net{k},ifname=([^,]+),script=no,downscript=no", netdev)
            assert m, netdev
            micro = "microvm" in argv[argv.index("-machine") + 1]
            m2 = re.fullmatch(rf"virtio-net-{'device' if micro else 'pci'},netdev=net{k},mac=([0-9a-f:]+)", device)
            assert m2, device
            out.append((m.group(1), m2.group(1)))
        assert (out == []) == ("-nic" in argv and argv[argv.index("-nic") + 1] == "none")
        return out
    if plan["backend"] == "firecracker":
        return [(n["host_dev_name"], n["guest_mac"]) for n in fc_config(plan)["network-interfaces"]]
    return [(n["tap"], n["mac"]) for n in plan["api"][0]["body"].get("net", [])]


# --- a spec with every kind of node -------------------------------------------------------------

NODES: dict[str, dict[str, Any]] = {
    "server": {"vlans": [1, 2], "memory": 512},
    "client": {"vlans": [2]},
    "lonely": {},
    "fc": {"backend": "firecracker", "vlans": [1]},
    "micro": {"machineType": "microvm", "vlans": [3], "backdoor": {"transport": "vsock"}},
    "qvsock": {"backdoor": {"transport": "vsock"}},
    "ch": {"backend": "cloud-hypervisor", "vlans": [1, 3], "backdoor": {"transport": "vsock"}},
    "own": {"kernel": "/own/bzImage", "kernelParams": ["loglevel=7"]},
}
HEADER = {
    "name": "mixed",
    "globalTimeout": 600,
    "nodes": NODES,
}


@pytest.fixture(scope="module")
def mixed() -> Spec:
    return spec(HEADER)


def test_spec_top_level(mixed: Spec) -> None:
    assert mixed["name"] == "mixed" and mixed["globalTimeout"] == 600
    assert mixed["skipLint"] is False and mixed["skipTypeCheck"] is False
    assert mixed["nodeNames"] == sorted(NODES)
    assert sorted(mixed["nodes"]) == sorted(NODES)
    # The test's network is the network plan of the nodes' vlans.
    plan = nixeval.call("network.plan", NODES)
    net = mixed["network"]
    assert net["mode"] == "tap"
    assert net["hosts"] == plan["hosts"] and net["hostsFile"] == plan["hostsFile"]
    assert {v: {k: x for k, x in p.items() if k not in ("vdeSocket", "vdeSwitch", "vdeReady")} for v, p in net["vlans"].items()} == plan["vlans"]
    assert {n: [{k: x for k, x in i.items() if k != "vdeSocket"} for i in ifs] for n, ifs in net["nodes"].items()} == plan["nodes"]


def test_guests_get_their_network_on_the_kernel_command_line(mixed: Spec) -> None:
    # The Debian image's ntng-net reads these; every NIC and every node's hosts entry is there.
    params = " ".join(mixed["nodes"]["server"]["argv"])
    assert len(mixed["network"]["nodes"]["server"]) == 2
    for i in mixed["network"]["nodes"]["server"]:
        assert f"ntng.if={i['mac']},{i['guestName']},{i['ipv4']}/24,{i['ipv6']}/64" in params
    hosts = ",".join(f"{h['names'][0]}={h['address']}" for h in mixed["network"]["hosts"])
    assert f"ntng.hosts={hosts}" in params and "net.ifnames=0" in params


def test_vde_mode_puts_nics_on_switch_sockets() -> None:
    qemu_nodes = {k: v for k, v in NODES.items() if v.get("backend", "qemu") == "qemu"}
    s = spec({**HEADER, "nodes": qemu_nodes}, networkMode="vde")
    argv = " ".join(s["nodes"]["server"]["argv"])
    assert s["network"]["mode"] == "vde" and "-netdev tap" not in argv
    for i in s["network"]["nodes"]["server"]:
        sock = f"{DEFAULTS['stateRoot']}/vde{i['vlan']}"
        assert i["vdeSocket"] == sock and s["network"]["vlans"][str(i["vlan"])]["vdeSocket"] == sock
        assert s["network"]["vlans"][str(i["vlan"])]["vdeReady"] == f"{sock}/ctl"  # vde_switch's control socket
        assert f"sock={sock}" in argv


def test_nodes_get_distinct_cids_and_state_dirs(mixed: Spec) -> None:
    cids = {name: guest_cid(p) for name, p in mixed["nodes"].items()}
    on_vsock = [c for c in cids.values() if c is not None]
    assert {n for n, c in cids.items() if c is not None} == {"fc", "micro", "qvsock", "ch"}
    assert len(on_vsock) == len(set(on_vsock)) and min(on_vsock) >= 3, cids
    # Every node's backdoor record has a CID of its own, vsock or not (QEMU keeps it there).
    qemu_cids = [p["backdoor"]["guestCid"] for p in mixed["nodes"].values() if p["backend"] == "qemu"]
    assert len(qemu_cids) == len(set(qemu_cids))

    owned: dict[str, set[str]] = {}
    for name, p in mixed["nodes"].items():
        paths = [*p["sockets"].values(), *p["files"].values(), *p.get("writeFiles", {})]  # QEMU: none
        assert p["stateDir"] == f"{DEFAULTS['stateRoot']}/{name}"  # backends/vmm.py makes it private
        # The runner's artifacts, in the run's folder (the driver replaces the marker).
        assert p["artifacts"] == {"consoleLog": f"@artifacts@/{name}/console.log", "journal": f"@artifacts@/{name}/journal.log"}
        assert all(path.startswith(p["stateDir"] + "/") for path in paths), (name, paths)
        owned[name] = set(paths)
        assert p["files"]["disk"] in {a for cmd in p["prepare"] for a in cmd}
    names = list(owned)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not owned[a] & owned[b], (a, b)


def test_interfaces_reach_the_vmm(mixed: Spec) -> None:
    net = mixed["network"]["nodes"]
    for name, p in mixed["nodes"].items():
        # The node's plan adds who switches each link (block/unblock) and QEMU's netdev id.
        assert [{k: x for k, x in i.items() if k not in ("link", "netdev")} for i in p["interfaces"]] == net[name], name
        assert [i["link"] for i in p["interfaces"]] == ["vmm" if p["backend"] == "qemu" else "host"] * len(net[name])
        assert nics(p) == [(i["tap"], i["mac"]) for i in net[name]], name
    assert len(nics(mixed["nodes"]["server"])) == 2
    assert argv_values(mixed["nodes"]["lonely"]["argv"], "-nic") == ["none"]
    assert argv_values(mixed["nodes"]["lonely"]["argv"], "-netdev") == []
    assert "-nic" not in mixed["nodes"]["server"]["argv"]


def test_backends_and_kernels(mixed: Spec) -> None:
    nodes = mixed["nodes"]
    assert {n: p["backend"] for n, p in nodes.items()} == {
        "server": "qemu", "client": "qemu", "lonely": "qemu", "fc": "firecracker", "micro": "qemu",
        "qvsock": "qemu", "ch": "cloud-hypervisor", "own": "qemu"}
    # Firecracker and QEMU's microvm boot the ELF vmlinux; the others the bzImage; a node's own wins.
    assert {n: kernel_of(p) for n, p in nodes.items()} == {
        "server": "/img/bzImage", "client": "/img/bzImage", "lonely": "/img/bzImage", "fc": "/img/vmlinux",
        "micro": "/img/vmlinux", "qvsock": "/img/bzImage", "ch": "/img/bzImage", "own": "/own/bzImage"}
    assert "microvm" in argv_values(nodes["micro"]["argv"], "-machine")[0]
    assert fc_config(nodes["fc"])["boot-source"]["initrd_path"] == "/img/initrd"
    assert argv_values(nodes["server"]["argv"], "-m") == ["512"]
    for name, p in nodes.items():
        params = kernel_params(p)
        assert params.count(f"systemd.hostname={name}") == 1, name
    assert "loglevel=7" in kernel_params(nodes["own"])
    # The runner's TSC rate reaches the TCG microvm only; under KVM it is not wanted.
    assert not any(a.startswith("tsc_early_khz=") for a in kernel_params(nodes["micro"]))
    micro_tcg = spec({"nodes": {"m": {"machineType": "microvm"}}}, accel="tcg")["nodes"]["m"]
    assert "tsc_early_khz=2500000" in kernel_params(micro_tcg)


def test_test_level_backend_is_the_default() -> None:
    s = spec({"backend": "firecracker", "nodes": {"a": {"vlans": [1]}, "b": {"backend": "qemu", "vlans": [1]}}})
    a, b = s["nodes"]["a"], s["nodes"]["b"]
    assert (a["backend"], b["backend"]) == ("firecracker", "qemu")
    assert (kernel_of(a), kernel_of(b)) == ("/img/vmlinux", "/img/bzImage")
    assert nics(a) == [(i["tap"], i["mac"]) for i in s["network"]["nodes"]["a"]]
    # Without an accelerator from the runner, Firecracker defaults to KVM, QEMU to TCG.
    s = spec({"backend": "firecracker", "nodes": {"a": {}, "b": {"backend": "qemu"}}}, without=("accel",))
    assert (s["nodes"]["a"]["accel"], s["nodes"]["b"]["accel"]) == ("kvm", "tcg")
    # No vmlinux from the runner: the kernel is all there is.
    s = spec({"backend": "firecracker", "nodes": {"a": {}}}, without=("vmlinux",))
    assert kernel_of(s["nodes"]["a"]) == "/img/bzImage"


def test_firecracker_on_tcg_names_the_node() -> None:
    with pytest.raises(NixEvalError, match=r"node 'fc': accel: backend firecracker needs KVM"):
        spec({"nodes": {"q": {}, "fc": {"backend": "firecracker"}}}, accel="tcg")


def test_no_nodes_is_a_test_without_vms() -> None:
    s = spec({"nodes": {}})
    assert (s["nodeNames"], s["nodes"], s["network"]["nodes"]) == ([], {}, {})


def test_header_defaults() -> None:
    s = spec({})
    assert s["nodeNames"] == ["machine"] and s["name"] == "test"
    assert (s["globalTimeout"], s["skipLint"], s["skipTypeCheck"]) == (3600, False, False)
    assert s["network"]["nodes"] == {"machine": []}
    s = spec({"nodes": {"a": {}}, "name": "n", "skipLint": True, "skipTypeCheck": True, "globalTimeout": 5})
    assert (s["name"], s["globalTimeout"], s["skipLint"], s["skipTypeCheck"]) == ("n", 5, True, True)
    long = "a" + "b" * 30  # 31 characters: the longest valid name
    assert spec({"nodes": {long: {}}})["nodeNames"] == [long]


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"nodes": {"a": {}}, "colour": "red"}, "unknown test option(s) colour (known: nodes, name, globalTimeout"),
        ({"nodes": {"a": {}}, "node": {}, "Nodes": {}}, "unknown test option(s) Nodes, node (known:"),
        ({"nodes": ["a"]}, 'nodes must be an attribute set (node name = options), got ["a"]'),
        ({"nodes": {"1a": {}}}, "node name '1a' is invalid: use a letter then letters, digits, - or _"),
        ({"nodes": {"a b": {}}}, "node name 'a b' is invalid"),
        ({"nodes": {"a.b": {}}}, "node name 'a.b' is invalid"),
        ({"nodes": {"a" * 32: {}}}, f"node name '{'a' * 32}' is invalid"),
        ({"nodes": {"a": 1}}, "node 'a': expected an attribute set of options, got 1"),
        ({"nodes": {"a": ["memory"]}}, "node 'a': expected an attribute set of options, got [\"memory\"]"),
        ({"nodes": {"a": {}}, "globalTimeout": 0}, "globalTimeout must be a positive number of seconds, got 0"),
        ({"nodes": {"a": {}}, "globalTimeout": -5}, "globalTimeout must be a positive number of seconds"),
        ({"nodes": {"a": {}}, "globalTimeout": "600"}, "globalTimeout must be a positive number of seconds, got \"600\""),
        ({"nodes": {"a": {}}, "skipLint": "yes"}, "skipLint must be a boolean"),
        ({"nodes": {"a": {}}, "skipTypeCheck": 1}, "skipTypeCheck must be a boolean"),
        ({"nodes": {"a": {}}, "name": 1}, "name must be a string"),
        ({"nodes": {"a": {"backend": "bochs"}}}, "node 'a': unknown backend \"bochs\" (known: cloud-hypervisor, firecracker, nspawn, qemu)"),
        ({"nodes": {"a": {}}, "backend": "bochs"}, "node 'a': unknown backend \"bochs\""),
        ({"nodes": {"a": {}}, "backend": 1}, "node 'a': unknown backend 1"),
        ({"nodes": {"a": {"kernelParams": "quiet"}}}, "node 'a': kernelParams must be a list of strings"),
        ({"nodes": {"a": {"vlans": [1, 1]}}}, "node 'a': vlans: vlan 1 is listed twice"),
        ({"nodes": {"a": {"memory": 64}}}, "node 'a': memory must be between 128 and 65536 MiB"),
        ({"nodes": {"a": {"backdoor": "vsock"}}}, "node 'a': backdoor must be an attribute set"),
    ],
)
def test_rejected_headers(header: dict[str, Any], message: str) -> None:
    with pytest.raises(NixEvalError) as e:
        spec(header)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


# --- through a script's header, as the runner loads it ------------------------------------------

RUNNER_DEFAULTS = DEFAULTS | {"accel": "tcg"}


def load(tmp_path: Path, *lines: str) -> testspec.TestSpec:
    script = tmp_path / "t.py"
    script.write_text("\n".join(lines) + "\n")
    return testspec.load(script, RUNNER_DEFAULTS)


def test_script_header(tmp_path: Path) -> None:
    s = load(tmp_path, "#: nodes.a = { vlans = [ 1 ]; };", "start_all()", "#: nodes.b = { vlans = [ 1 ]; };",
             "#: globalTimeout = 60;")
    assert s.node_names == ["a", "b"] and s.global_timeout == 60 and s.name == "t"
    assert len(argv_values(s.plans["a"]["argv"], "-netdev")) == 1
    assert load(tmp_path, "start_all()").node_names == ["machine"]


def test_script_errors_point_at_the_line(tmp_path: Path) -> None:
    with pytest.raises(NixEvalError) as e:
        load(tmp_path, "#: nodes.a = { };", "start_all()", "#: nodes.b = { vlans = [ 0 ]; };")
    assert str(e.value).startswith(f"{tmp_path / 't.py'}:3: node declaration rejected: node 'b': vlans: 0 is out of range")
    with pytest.raises(NixEvalError) as e:
        load(tmp_path, "#: nodes.a = { };", "#: colour = 1;")
    assert str(e.value).startswith(f"{tmp_path / 't.py'}: node declaration rejected: unknown test option(s) colour")


def test_duplicate_node_declarations(tmp_path: Path) -> None:
    """Nix merges two attribute-set literals given for one attribute (`nodes.a = { };` twice, or
    `nodes.a = { memory = 512; }; nodes.a = { cores = 2; };`): not an error, one node.  A real
    redefinition (the same option twice, or a node declared with a non-literal) is Nix's
    "already defined" error; it names the script and one of the two lines."""
    s = load(tmp_path, "#: nodes.a = { };", "start_all()", "#: nodes.a = { };")
    assert s.node_names == ["a"]
    s = load(tmp_path, "#: nodes.a = { memory = 512; };", "#: nodes.a = { cores = 2; };")
    assert argv_values(s.plans["a"]["argv"], "-m") == ["512"] and argv_values(s.plans["a"]["argv"], "-smp") == ["2"]

    script = tmp_path / "t.py"
    for lines in (["#: nodes.a = { memory = 512; };", "start_all()", "#: nodes.a = { memory = 1024; };"],
                  ["#: nodes.a = { memory = 512; };", "start_all()", "#: nodes.a.memory = 1024;"],
                  ["#: nodes.a = let m = 512; in { memory = m; };", "start_all()", "#: nodes.a = { };"]):
        with pytest.raises(NixEvalError) as e:
            load(tmp_path, *lines)
        msg = str(e.value)
        assert re.match(rf"{re.escape(str(script))}:[13]: node declaration rejected: attribute '[\w.]+' already defined",
                        msg), msg


def test_duplicate_node_error_names_only_the_script(tmp_path: Path) -> None:
    with pytest.raises(NixEvalError) as e:
        load(tmp_path, "#: nodes.a = let m = 512; in { memory = m; };", "start_all()", "#: nodes.a = { };")
    msg = str(e.value)
    assert "ntng-header-" not in msg and msg.startswith(f"{tmp_path / 't.py'}:3:"), msg
