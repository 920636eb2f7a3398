"""Snapshots and clones: one origin boots once, two clones are restored from its snapshot.

One boot, two restores: the clones see the origin's files and processes, get their own
hostnames, ids, MACs and addresses, the host's time, and diverge from then on."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from helpers import make_driver
from ntng.errors import MissingCapability

pytestmark = pytest.mark.e2e

HEADER = """\
#: nodes.a = { vlans = [ 1 ]; };
#: nodes.v = { backdoor.transport = "vsock"; };
"""


def test_snapshot_and_two_clones(tmp_path: Path, guest_image: object,
                                 record_property: Callable[[str, Any], None]) -> None:
    with make_driver(tmp_path, HEADER) as d:
        a, v = d.machines
        with pytest.raises(MissingCapability, match=r"lacks capability \"snapshot\".*vhost-user-vsock"):
            v.snapshot("never")  # refused before anything boots
        assert not v.booted
        t0 = time.monotonic()
        a.succeed("echo from-origin > /root/f && sync")
        cold = time.monotonic() - t0
        a.succeed("setsid sleep 100000 >/dev/null 2>&1 </dev/null &")
        snap = a.snapshot("ready")
        assert (snap.directory / "memory").stat().st_size == snap.memory_bytes > 0
        # The RAM went to its own file (a copy of the memfd, holes kept), not into the stream.
        assert snap.ram is not None and snap.ram.stat().st_size == 1024 << 20
        assert snap.memory_bytes < 20e6 < snap.ram_bytes < 1024 << 20
        # The origin runs on after the snapshot: what it does now reaches no clone's memory.
        a.succeed("pkill -x sleep")

        c1, c2 = d.start_from_snapshot(snap, ["c1", "c2"])
        assert c1 in d.machines and c2 in d.machines
        for c in (c1, c2):
            assert c.restore_seconds is not None
            record_property(f"restore_to_first_command_{c.name}", round(c.restore_seconds, 2))
        record_property("cold_boot_to_first_command", round(cold, 2))
        print(f"cold boot → first command {cold:.1f}s; restore → first command "
              f"{c1.restore_seconds:.2f}s, {c2.restore_seconds:.2f}s; origin paused {snap.save_seconds:.2f}s")

        seen = {}
        for m in (a, c1, c2):
            before = time.time()
            out = m.succeed("cat /root/f; hostname; cat /run/ntng/clone-id 2>/dev/null || echo none; "
                            "cat /sys/class/net/eth0/address; pgrep -x sleep >/dev/null && echo sleeping; "
                            "date +%s.%N").split()
            # The clock was stepped: the guest's time is the host's, give or take a few seconds.
            assert before - 3 < float(out[-1]) < time.time() + 3, (m.name, before, out)
            seen[m.name] = out[:-1]
        assert seen["a"][:3] == ["from-origin", "a", "none"]
        for c in (c1, c2):
            f, hostname, clone_id, mac, sleeping = seen[c.name]
            assert (f, hostname, clone_id, sleeping) == ("from-origin", c.name, c.clone_id, "sleeping")
            assert mac == c.plan["interfaces"][0]["mac"]
        assert len({seen[n][2] for n in ("c1", "c2")}) == 2 and len({seen[n][3] for n in seen}) == 3

        # Their own addresses on the origin's vlan: all three reach each other.
        ips = {m.name: m.plan["interfaces"][0]["ipv4"] for m in (c1, c2)}
        assert len(set(ips.values())) == 2
        c1.succeed(f"ping -c 1 -W 10 {ips['c2']}", "ping -c 1 -W 10 a")
        c2.succeed(f"ping -c 1 -W 10 {ips['c1']}", "getent hosts c2")

        # From now on they diverge: disks and processes are their own.
        c1.succeed("echo only-c1 > /root/g && sync")
        c2.fail("test -e /root/g")
        a.fail("test -e /root/g")
        c2.succeed("pkill -x sleep")
        c1.succeed("pgrep -x sleep")

        # crash() and release leave no QEMU behind.
        c1.crash()
        assert not c1.booted and c1.backend.proc is not None and c1.backend.proc.poll() is not None
        procs = [m.backend.proc for m in (a, c2)]
    assert all(p is not None and p.poll() is not None for p in procs)
    events = [json.loads(line) for line in (d.out_dir / "events.jsonl").read_text().splitlines()]
    assert {e["machine"] for e in events if e["action"] == "restore"} == {"c1", "c2"}
    assert [e["machine"] for e in events if e["action"] == "snapshot"] == ["a"]
