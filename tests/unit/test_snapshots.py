"""Snapshots and clones, the pure parts: a clone's plan from its origin's (real nixlib plans,
nixlib/clone.nix), its NICs, the QEMU snapshot files, and the errors for what cannot be snapshotted."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ntng import caps, nixeval, snapshots
from ntng.backends import qemu_migrate
from ntng.errors import MissingCapability, NixEvalError, SetupError
from ntng.snapshots import Snapshot, SnapshotError

ROOT = "/tmp/ntng-test-state"


def spec(nodes: dict[str, Any]) -> Any:
    defaults = {"kernel": "/k", "image": "/img.raw", "imageFormat": "raw", "stateRoot": ROOT}
    return nixeval.call("testSpec", {"header": {"nodes": nodes}, "defaults": defaults})


@pytest.fixture(scope="module")
def net_spec() -> Any:
    return spec({"a": {"vlans": [1, 2]}, "b": {"vlans": [1]}})


def snap_of(plan: dict[str, Any]) -> Snapshot:
    return Snapshot("ready", plan["name"], snapshots.layout(plan, "ready"), plan)


def test_clone_plan_moves_every_path_and_keeps_the_device_list(net_spec: Any) -> None:
    origin = net_spec["nodes"]["b"]
    plan = snapshots.clone_plan(snap_of(origin), "c1", net_spec["network"])
    ifaces = plan["interfaces"]
    text = repr(plan["argv"]) + repr(plan["sockets"]) + repr(plan["files"])
    assert f"{ROOT}/b/" not in text and f"{ROOT}/c1/qmp.sock" in text
    assert plan["files"]["disk"] == f"{ROOT}/c1/disk.qcow2" and plan["stateDir"] == f"{ROOT}/c1"
    # Same devices in the same order: QEMU loads device state only into the same shape.
    devices = [a.split(",")[0] for a in plan["argv"] if a.startswith(("virtio", "virtserialport"))]
    assert devices == [a.split(",")[0] for a in origin["argv"] if a.startswith(("virtio", "virtserialport"))]
    assert len(plan["argv"]) == len(origin["argv"])
    assert plan["argv"][plan["argv"].index("-name") + 1] == "c1,process=ntng-c1"
    # The disk: an overlay on the frozen one.
    assert plan["prepare"] == [["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                                f"{ROOT}/snapshots/ready/disk.qcow2", f"{ROOT}/c1/disk.qcow2"]]
    # Its own tap and MAC; a later cold boot gets its own hostname and MAC too.
    nic = origin["interfaces"][0]
    assert not any(nic["tap"] in a or nic["mac"] in a for a in plan["argv"])
    assert any(f"ifname={ifaces[0]['tap']}," in a for a in plan["argv"])
    assert any(f"mac={ifaces[0]['mac']}" in a for a in plan["argv"])
    append = plan["argv"][plan["argv"].index("-append") + 1].split()
    assert "systemd.hostname=c1" in append and not any(w.startswith("systemd.hostname=b") for w in append)
    assert f"ntng.if={ifaces[0]['mac']},eth0,192.168.1.3/24,2001:db8:1::3/64" in append
    assert next(w for w in append if w.startswith("ntng.hosts=")).endswith(",c1=192.168.1.3")
    assert plan["clone"]["origin"] == "b" and plan["clone"]["id"].startswith("c1-")
    assert origin["files"]["disk"] == f"{ROOT}/b/disk.qcow2"  # the origin's plan is untouched
    # nixlib made it: the restore waits for the saved state, a later cold boot does not.
    assert plan["restoreArgv"] == [*plan["argv"], "-incoming", "defer"] and "-incoming" not in plan["argv"]
    assert origin["restoreArgv"] is None
    # Guest RAM: a memfd on every cold boot; this snapshot's RAM stayed in the stream (no file).
    assert origin["ram"] == plan["ram"] == plan["restoreRam"] == {"kind": "memfd"}
    assert "memory-backend-memfd,id=mem0,size=1024M,share=on" in origin["argv"]


def test_a_clone_maps_the_snapshots_ram_file_copy_on_write(net_spec: Any) -> None:
    origin = net_spec["nodes"]["b"]
    snap = dataclasses.replace(snap_of(origin), ram_bytes=1)
    plan = snapshots.clone_plan(snap, "c1", net_spec["network"])
    ram_file = f"{ROOT}/snapshots/ready/ram"
    assert plan["restoreRam"] == {"kind": "file", "path": ram_file}
    backing = f"memory-backend-file,id=mem0,size=1024M,mem-path={ram_file},share=off"
    assert backing in plan["restoreArgv"] and backing not in plan["argv"]  # a later cold boot: a memfd
    assert plan["ram"] == {"kind": "memfd"}
    # The same device list otherwise: only mem0's backing differs.
    assert len(plan["restoreArgv"]) == len(plan["argv"]) + 2


def test_ram_copy_keeps_holes_and_finds_the_memfd(tmp_path: Path) -> None:
    """The save side's two helpers on real files: a memfd named as QEMU names its RAM, with
    data at both ends and a hole between, copied sparse; /proc finds it by name."""
    fd = os.memfd_create(qemu_migrate.MEMFD_NAME)
    try:
        size = 64 << 20
        os.ftruncate(fd, size)
        os.pwrite(fd, b"head" * 1024, 0)
        os.pwrite(fd, b"tail" * 1024, size - 4096)
        found = qemu_migrate.find_memfd(os.getpid())
        copied = qemu_migrate.copy_sparse(found, tmp_path / "ram")
        data = (tmp_path / "ram").read_bytes()
        assert len(data) == size and data[:4096] == b"head" * 1024 and data[-4096:] == b"tail" * 1024
        assert data[4096:-4096] == bytes(size - 8192)
        assert copied < 1 << 20  # only the data extents (tmpfs pages) were copied
        assert os.stat(tmp_path / "ram").st_blocks * 512 < 1 << 20  # and the copy is sparse too
    finally:
        os.close(fd)
    with pytest.raises(SetupError, match="holds 0 guest RAM memfds, expected one"):
        qemu_migrate.find_memfd(os.getpid())


def test_clone_ids_differ() -> None:
    origin = spec({"a": {}})["nodes"]["a"]
    ids = {snapshots.clone_plan(snap_of(origin), "c", None)["clone"]["id"] for _ in range(5)}
    assert len(ids) == 5


def clone_interfaces(nodes: dict[str, Any], origin: str, clone: str) -> list[dict[str, Any]]:
    ifaces: list[dict[str, Any]] = nixeval.call("clone.interfaces", {"nodes": nodes, "origin": origin, "clone": clone})
    return ifaces


def test_clone_interfaces_take_the_next_free_address(net_spec: Any) -> None:
    nodes = dict(net_spec["network"]["nodes"])
    c1 = clone_interfaces(nodes, "a", "c1")
    assert [i["vlan"] for i in c1] == [1, 2]
    assert [i["ipv4"] for i in c1] == ["192.168.1.3", "192.168.2.3"]  # a is .1, b is .2
    assert c1[0]["ipv6"] == "2001:db8:1::3" and c1[0]["guestName"] == "eth0"
    nodes["c1"] = c1
    c2 = clone_interfaces(nodes, "a", "c2")
    assert c2[0]["ipv4"] == "192.168.1.4"
    macs = [i["mac"] for ifs in nodes.values() for i in ifs] + [i["mac"] for i in c2]
    taps = [i["tap"] for ifs in nodes.values() for i in ifs] + [i["tap"] for i in c2]
    assert len(set(macs)) == len(macs) and len(set(taps)) == len(taps)
    assert all(len(t) <= 15 for t in taps)


def test_clones_follow_the_network_plans_scheme_and_never_collide(net_spec: Any) -> None:
    """A clone's tap and MAC are network.nix's for a node of its name on the same vlans, its
    address the next node number; a chain of clones keeps every tap, MAC and address apart."""
    nodes = dict(net_spec["network"]["nodes"])
    for k, name in enumerate(f"c{k}" for k in range(1, 9)):
        nodes[name] = clone_interfaces(nodes, "a", name)
        alone = nixeval.call("network.plan", {name: {"vlans": [1, 2]}})["nodes"][name]
        for mine, planned in zip(nodes[name], alone, strict=True):
            assert [mine[k] for k in ("tap", "ifb", "mac", "bridge")] == [planned[k] for k in ("tap", "ifb", "mac", "bridge")]
            vlan, number = mine["vlan"], k + 3
            assert (mine["ipv4"], mine["ipv6"]) == (f"192.168.{vlan}.{number}", f"2001:db8:{vlan}::{number}")
            assert mine["impairment"] is None
    every = [i for ifs in nodes.values() for i in ifs]
    for key in ("tap", "ifb", "mac", "ipv4", "ipv6"):
        values = [i[key] for i in every]
        assert len(set(values)) == len(values), key
    assert all(len(i["tap"]) <= 15 and len(i["ifb"]) == 15 for i in every)  # Linux's IFNAMSIZ


def test_a_clone_of_a_networked_node_needs_the_network_plan(net_spec: Any) -> None:
    with pytest.raises(NixEvalError, match='clone "c1": no node called "b"'):
        snapshots.clone_plan(snap_of(net_spec["nodes"]["b"]), "c1", None)


def test_the_qemu_snapshot_layout_names_the_files_and_the_migration_uris() -> None:
    """qemu_migrate writes and reads the layout's files; QEMU runs the URIs with sh -c."""
    plan = spec({"a": {}})["nodes"]["a"]
    where = snapshots.layout(plan, "s")
    assert where["directory"] == f"{ROOT}/snapshots/s" and where["save"] == where["restore"] == []
    d = where["directory"]
    assert where["files"] == {"memory": f"{d}/memory", "ram": f"{d}/ram", "disk": f"{d}/disk.qcow2",
                              "note": f"{d}/ntng-snapshot.json"}
    assert where["migrate"] == {"save": f"exec:cat > '{d}/memory'", "restore": f"exec:cat '{d}/memory'"}


class RecordingQMP:
    """Runs migrate's exec: URI as QEMU does (sh -c, the stream on its stdin); records the rest."""

    name = "m"

    def __init__(self) -> None:
        self.commands: list[tuple[str, dict[str, Any]]] = []

    def command(self, execute: str, **args: Any) -> Any:
        self.commands.append((execute, args))
        if execute == "migrate":
            subprocess.run(["sh", "-c", args["uri"].removeprefix("exec:")], input=b"STREAM", check=True, timeout=30)
        return {"status": "completed"} if execute == "query-migrate" else {}


def test_qemu_migrate_saves_into_the_layouts_files(tmp_path: Path) -> None:
    """Paths with a quote and a space: the URI is nixlib's, quoted for the shell QEMU runs."""
    from ntng.backends import qemu_migrate

    origin = spec({"a": {}})["nodes"]["a"]
    launch_spec = {**origin["launchSpec"], "stateDir": str(tmp_path / "it's here" / "a")}
    where = nixeval.call("clone.snapshot", {"spec": launch_spec, "name": "s"})
    disk = tmp_path / "it's here" / "a" / "disk.qcow2"  # the plan's disk, copied by nixlib's copyDisk
    disk.parent.mkdir(parents=True)
    disk.write_bytes(b"DISK")
    assert where["copyDisk"] == {"save": ["cp", "--sparse=always", "--reflink=auto", str(disk), where["files"]["disk"]],
                                 "restore": None}
    qmp = RecordingQMP()
    size, ram = qemu_migrate.save(qmp, where, disk, "a")  # type: ignore[arg-type]
    assert (size, ram) == (6, 0) and Path(where["files"]["memory"]).read_bytes() == b"STREAM"
    assert Path(where["files"]["disk"]).read_bytes() == b"DISK"
    assert json.loads(Path(where["files"]["note"]).read_text())["disk"] == str(disk)
    assert ("migrate", {"uri": where["migrate"]["save"]}) in qmp.commands and qmp.commands[-1][0] == "cont"


@pytest.mark.parametrize("name", ["", "1abc", "has space", "x" * 40, "a/b"])
def test_bad_names(name: str) -> None:
    origin = spec({"a": {}})["nodes"]["a"]
    with pytest.raises(SnapshotError, match="clone name"):
        snapshots.clone_plan(snap_of(origin), name, None)
    with pytest.raises(SnapshotError, match="snapshot name"):
        snapshots.check_name("snapshot name", name)


def test_vsock_nodes_cannot_be_snapshotted() -> None:
    """nixlib's effective features: no snapshot (nor clone) with a vhost-user vsock device."""
    plan = spec({"v": {"backdoor": {"transport": "vsock"}}})["nodes"]["v"]
    assert not {"snapshot", "clone"} & set(plan["capabilities"]["features"])
    assert "vhost-user-vsock" in plan["capabilities"]["why"]["snapshot"]
    assert {"snapshot", "clone"} <= set(spec({"a": {}})["nodes"]["a"]["capabilities"]["features"])  # the default


@pytest.mark.parametrize("backend", ["firecracker", "cloud-hypervisor"])
def test_other_backends_snapshot_but_cannot_clone(backend: str) -> None:
    plan = nixeval.call("testSpec", {"header": {"nodes": {"f": {"backend": backend}}},
                                     "defaults": {"kernel": "/k", "image": "/i", "stateRoot": ROOT}})["nodes"]["f"]
    assert "snapshot" in plan["capabilities"]["features"]
    with pytest.raises(MissingCapability, match=f'backend {backend} lacks capability "clone" .*paths they had'):
        caps.require(plan, "clone", "start_from_snapshot")


def test_driver_refuses_bad_clone_requests_before_starting_anything(tmp_path: Path) -> None:
    from ntng.driver import Driver
    from ntng.testspec import TestSpec

    data = spec({"a": {}, "v": {"backdoor": {"transport": "vsock"}}})
    ts = TestSpec(tmp_path / "t.py", "", "t", 60, data["nodeNames"], data["nodes"], data["network"])
    with Driver(ts, tmp_path / "out", 10, log=lambda _m: None) as d:
        a, v = d.machines
        with pytest.raises(MissingCapability, match=r'v: snapshot\(\): backend qemu lacks capability "snapshot".*vhost-user-vsock'):
            v.snapshot("s")
        with pytest.raises(SnapshotError, match="snapshot name"):
            a.snapshot("no spaces")
        snap = snap_of(a.plan)
        with pytest.raises(SnapshotError, match="machine called 'a' already"):
            d.start_from_snapshot(snap, ["a"])
        with pytest.raises(SnapshotError, match="machine called 'c1' already"):
            d.start_from_snapshot(snap, ["c1", "c1"])
        with pytest.raises(SnapshotError, match="must be a list"):
            d.start_from_snapshot(snap, "c1")  # type: ignore[arg-type]
        with pytest.raises(SnapshotError, match="is gone"):
            d.start_from_snapshot(snap, ["c1"])
        assert [m.name for m in d.machines] == ["a", "v"] and not any(m.booted for m in d.machines)


class FakeQMP:
    """query-migrate answers in turn (the last one repeats)."""

    name = "m"

    def __init__(self, *answers: dict[str, Any]) -> None:
        self.answers = list(answers)

    def command(self, execute: str, **_args: Any) -> Any:
        assert execute == "query-migrate"
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def test_wait_migration() -> None:
    from ntng.backends import qemu_migrate
    from ntng.errors import SetupError

    done = qemu_migrate.wait_migration(FakeQMP({"status": "setup"}, {"status": "active"},  # type: ignore[arg-type]
                                               {"status": "completed", "total-time": 5}), "saving")
    assert done["total-time"] == 5
    with pytest.raises(SetupError, match="m: saving failed: Unable to write to command: Broken pipe"):
        qemu_migrate.wait_migration(FakeQMP({"status": "active"},  # type: ignore[arg-type]
                                            {"status": "failed", "error-desc": "Unable to write to command: Broken pipe"}),
                                    "saving")
    with pytest.raises(SetupError, match=r"restoring not completed within 0s \(status active\)"):
        qemu_migrate.wait_migration(FakeQMP({"status": "active"}), "restoring", timeout=0.05)  # type: ignore[arg-type]
