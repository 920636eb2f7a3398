"""What nixlib/clone.nix tells a clone right after its restore (clone.identity, clone.plan's
`identity`): hostname, hosts entry, and the shell that gives its NICs their own MACs and
addresses.  The script for an older agent is run here by a real shell against a fake `ip`, so
its quoting and its use of the run-time values ($NTNG_EPOCH, $NTNG_CLONE_ID) are checked."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from ntng import nixeval

NIC = {"guestName": "eth0", "mac": "52:54:00:aa:bb:cc", "ipv4": "192.168.1.3", "prefixLength4": 24,
       "ipv6": "2001:db8:1::3", "prefixLength6": 64}


def identity(interfaces: list[dict[str, Any]], clone: str = "c1") -> dict[str, Any]:
    result: dict[str, Any] = nixeval.call("clone.identity", {"clone": clone, "interfaces": interfaces})
    return result


def test_identity_names_the_clone_its_hosts_entry_and_one_ip_batch_for_all_nics() -> None:
    second = {**NIC, "guestName": "eth1", "mac": "52:54:00:aa:bb:cd", "ipv4": "192.168.2.3", "ipv6": "2001:db8:2::3"}
    ident = identity([NIC, second])
    assert ident["hostname"] == "c1"
    assert ident["hosts"] == ["192.168.1.3 c1"]  # the first NIC's address, as ntng.hosts= says
    lines = ident["nics"].splitlines()
    assert lines[0] == "ip -batch - <<'EOF'" and lines[-1] == "EOF"  # one process for all NICs
    batch = lines[1:-1]
    assert batch[:2] == ["link set dev eth0 down", "link set dev eth0 address 52:54:00:aa:bb:cc"]
    assert "addr add 192.168.1.3/24 dev eth0" in batch and "addr add 2001:db8:1::3/64 dev eth0 nodad" in batch
    assert batch[5] == "link set dev eth0 up" and batch[-1] == "link set dev eth1 up"
    assert "link set dev eth1 address 52:54:00:aa:bb:cd" in batch


def test_identity_without_nics_has_no_commands_for_them() -> None:
    ident = identity([])
    assert ident["nics"] == "" and ident["hosts"] == []
    assert "ip " not in ident["script"] and "/etc/hosts" not in ident["script"]


def test_the_older_agents_script_runs_and_takes_the_clock_and_id_from_its_environment(tmp_path: Path) -> None:
    script = identity([NIC])["script"]
    assert script.splitlines()[0] == 'date -s "@$NTNG_EPOCH" >/dev/null'  # first: the clock matters most
    # Run it with the guest's paths moved under tmp_path and `date`/`ip` recording their input.
    root = tmp_path / "root"
    for d in ("proc/sys/kernel", "etc", "run/ntng"):
        (root / d).mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("date", "ip"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/{tool}.args\ncat >> {tmp_path}/{tool}.stdin\n')
        (bin_dir / tool).chmod(0o755)
    moved = script.replace(" /proc/", f" {root}/proc/").replace(" /etc/", f" {root}/etc/").replace(" /run/", f" {root}/run/")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "NTNG_EPOCH": "1700000000.250000",
           "NTNG_CLONE_ID": "c1-1234"}
    subprocess.run(["sh", "-euc", moved], env=env, check=True, stdin=subprocess.DEVNULL, timeout=30)
    assert (tmp_path / "date.args").read_text() == "-s @1700000000.250000\n"
    assert (root / "proc/sys/kernel/hostname").read_text() == "c1\n"
    assert (root / "etc/hostname").read_text() == "c1\n"
    assert (root / "run/ntng/clone-id").read_text() == "c1-1234\n"
    assert (root / "etc/hosts").read_text() == "192.168.1.3 c1\n"
    assert (tmp_path / "ip.args").read_text() == "-batch -\n"
    assert "link set dev eth0 address 52:54:00:aa:bb:cc\n" in (tmp_path / "ip.stdin").read_text()


def test_clone_plan_carries_the_identity_of_its_own_interfaces() -> None:
    defaults = {"kernel": "/k", "image": "/img.raw", "imageFormat": "raw", "stateRoot": "/s"}
    spec = nixeval.call("testSpec", {"header": {"nodes": {"a": {"vlans": [1]}, "b": {"vlans": [1]}}},
                                     "defaults": defaults})
    origin = spec["nodes"]["b"]
    snap = nixeval.call("clone.snapshot", {"spec": origin["launchSpec"], "name": "s"})
    made = nixeval.call("clone.plan", {"spec": origin["launchSpec"], "clone": "c1", "snapshot": snap,
                                       "nodes": spec["network"]["nodes"], "hosts": spec["network"]["hosts"]})
    assert made["identity"] == identity(made["interfaces"])
    assert made["identity"]["hosts"] == [f"{made['interfaces'][0]['ipv4']} c1"] == ["192.168.1.3 c1"]
    assert f"address {made['interfaces'][0]['mac']}" in made["identity"]["nics"]
    # Its own files: state directory and artifacts are the clone's, not the origin's.
    assert made["plan"]["stateDir"] == "/s/c1" and origin["stateDir"] == "/s/b"
    assert made["plan"]["artifacts"]["consoleLog"] == "@artifacts@/c1/console.log"


def test_a_snapshot_of_a_node_that_can_clone_makes_the_folder_the_identity_writes_to() -> None:
    defaults = {"kernel": "/k", "image": "/img.raw", "imageFormat": "raw", "stateRoot": "/s"}
    nodes = nixeval.call("testSpec", {"header": {"nodes": {"q": {}, "f": {"backend": "firecracker"}}},
                                      "defaults": defaults})["nodes"]
    q = nixeval.call("clone.snapshot", {"spec": nodes["q"]["launchSpec"], "name": "s"})
    f = nixeval.call("clone.snapshot", {"spec": nodes["f"]["launchSpec"], "name": "s"})
    assert q["guestPrepare"] == [["mkdir", "-p", "/run/ntng"]]
    assert "> /run/ntng/clone-id" in identity([])["script"]  # the folder made before the snapshot
    assert f["guestPrepare"] == []  # Firecracker cannot clone: nothing to prepare


def test_snapshot_layouts_copy_the_plans_disk_with_nixlibs_command() -> None:
    """The runner copies no disk by an argv of its own: save (and, where drives are restored at
    their old paths, restore) are the layout's copyDisk, between the plan's disk and the layout's."""
    defaults = {"kernel": "/k", "image": "/img.raw", "imageFormat": "raw", "stateRoot": "/s"}
    nodes = nixeval.call("testSpec", {"header": {"nodes": {"q": {}, "f": {"backend": "firecracker"},
                                                           "c": {"backend": "cloud-hypervisor"}}},
                                      "defaults": defaults})["nodes"]
    cp = ["cp", "--sparse=always", "--reflink=auto"]
    for name, plan in nodes.items():
        layout = nixeval.call("clone.snapshot", {"spec": plan["launchSpec"], "name": "s"})
        disk, saved = plan["files"]["disk"], layout["files"]["disk"]
        assert layout["copyDisk"]["save"] == [*cp, disk, saved], name
        # QEMU clones boot an overlay on the saved disk; FC and CH load drives at their old paths.
        assert layout["copyDisk"]["restore"] == (None if name == "q" else [*cp, saved, disk]), name
        assert [*cp, plan["launchSpec"]["image"], disk] in plan["prepare"] or name == "q"
