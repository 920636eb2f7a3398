"""Snapshots and clones: a running machine frozen into a directory, and the launch plans of
clones restored from it.

Pure: nothing here starts or touches a VM (the backends' snapshot_save/snapshot_restore do).
Where a snapshot goes and which calls save and load it, and a clone's plan (its origin's with
its own name, state directory, NICs, kernel parameters and `restore`), are nixlib's
(nixlib/clone.nix): Python computes no name, address or path of its own.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from pathlib import Path

from . import nixeval
from . import plan as plan_types
from .errors import TestScriptError
from .plan import Interface, NetworkPlan, NodePlan, SnapshotLayout

# The files of a QEMU snapshot directory, as nixlib/qemu.nix's `snapshot` names them (a nix test
# checks they agree): backends/qemu_migrate.py writes and reads them by these names.
MEMORY = "memory"  # QEMU's migration stream: device state, and RAM unless RAM is a file
RAM = "ram"  # guest RAM (where the origin's RAM was a memfd): clones map it copy-on-write
DISK = "disk.qcow2"  # the origin's overlay as it was, read-only: the clones' backing file
NOTE = "ntng-snapshot.json"

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,30}")


class SnapshotError(TestScriptError):
    """A snapshot or clone the script asked for cannot be made (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What `machine.snapshot(name)` returns and `start_from_snapshot` takes."""

    name: str
    origin: str  # the machine it was taken of
    layout: SnapshotLayout = dataclasses.field(repr=False)  # nixlib's clone.snapshot: directory, files, calls
    plan: NodePlan = dataclasses.field(repr=False)  # the origin's launch plan
    save_seconds: float = 0.0  # the origin was paused this long
    memory_bytes: int = 0  # the migration stream (QEMU), the VMM's state files (Firecracker, CH)
    ram_bytes: int = 0  # guest RAM written to a file of its own (0: the RAM is in the stream)

    @property
    def directory(self) -> Path:
        return Path(self.layout["directory"])

    @property
    def memory(self) -> Path:
        """The file whose presence says the snapshot still exists."""
        files = self.layout["files"]
        return Path(files.get("memory") or files["note"])

    @property
    def ram(self) -> Path | None:
        ram = self.layout["files"].get("ram")
        return Path(ram) if ram and self.ram_bytes else None

    @property
    def disk(self) -> Path:
        return Path(self.layout["files"]["disk"])


def check_name(what: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise SnapshotError(f"{what} {name!r} is invalid: use a letter then letters, digits, - or _ "
                            "(at most 31 characters)")


def layout(plan: NodePlan, name: str, resume: bool = True) -> SnapshotLayout:
    """nixlib's snapshot layout for snapshot `name` of the node whose launch plan is `plan`."""
    if "launchSpec" not in plan:
        raise SnapshotError(f"{plan.get('name', '?')}: the plan has no launchSpec (made by an older nixlib?)")
    result = nixeval.call("clone.snapshot", {"spec": plan["launchSpec"], "name": name, "resume": resume})
    return plan_types.snapshot_layout(result, f"{plan['name']}: nixlib's clone.snapshot {name!r}")


def clone_plan(snap: Snapshot, clone: str, network: NetworkPlan | None = None) -> NodePlan:
    """The launch plan of clone `clone` of `snap` (nixlib's clone.plan; `network`: the run's
    network plan, with earlier clones), with a fresh clone id.  Its NICs: plan["interfaces"]."""
    check_name("clone name", clone)
    if "launchSpec" not in snap.plan:
        raise SnapshotError(f"{clone}: the plan of {snap.origin} has no launchSpec (made by an older nixlib?)")
    made = plan_types.clone_plan(nixeval.call("clone.plan", {
        "spec": snap.plan["launchSpec"], "clone": clone, "snapshot": snap.layout, "ram": snap.ram is not None,
        "nodes": network["nodes"] if network else {}, "hosts": network["hosts"] if network else [],
    }), f"{clone}: nixlib's clone.plan of {snap.origin}")
    plan = made["plan"]
    plan["clone"] = {"snapshot": snap.name, "origin": snap.origin, "id": f"{clone}-{uuid.uuid4().hex[:12]}"}
    return plan


def identity_script(hostname: str, clone_id: str, epoch: float,
                     nics: list[tuple[str, Interface]] | None = None,
                     hosts: list[tuple[str, str]] | None = None) -> str:
    """Shell run in a clone right after its restore: its own hostname, clone id, addresses and
    MACs (virtio-net migrates the origin's MAC, so the guest keeps it unless told), and the
    host's time (the guest clock stood still from the snapshot on).
    `nics`: (guest device name, new interface plan); `hosts`: (address, name) to add."""
    # Few processes: each exec is slow in a freshly restored TCG guest (its translation cache
    # is empty), so builtins where possible and one `ip -batch` for all the NICs.
    lines = [
        f"date -s @{epoch:.6f} >/dev/null",
        f"echo {hostname} > /proc/sys/kernel/hostname",
        f"echo {hostname} > /etc/hostname",  # /run/ntng: made in the origin before the snapshot
        f"echo {clone_id} > /run/ntng/clone-id",
    ]
    lines += nics_script(nics)
    for address, name in hosts or []:
        lines.append(f"echo '{address} {name}' >> /etc/hosts")
    return "\n".join(lines)


def nics_script(nics: list[tuple[str, Interface]] | None) -> list[str]:
    """Shell lines giving a clone's NICs their own MACs and addresses (one `ip -batch`)."""
    batch = []
    for dev, nic in nics or []:
        batch += [
            f"link set dev {dev} down",
            f"link set dev {dev} address {nic['mac']}",
            f"addr flush dev {dev}",
            f"addr add {nic['ipv4']}/{nic['prefixLength4']} dev {dev}",
            f"addr add {nic['ipv6']}/{nic['prefixLength6']} dev {dev} nodad",
            f"link set dev {dev} up",
        ]
    return ["ip -batch - <<'EOF'", *batch, "EOF"] if batch else []
