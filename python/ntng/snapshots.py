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
from .plan import NetworkPlan, NodePlan, SnapshotLayout

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
    network plan, with earlier clones), with a fresh clone id.  Its NICs: plan["interfaces"];
    what it is told after the restore: plan["clone"]["identity"] (nixlib's clone.identity)."""
    check_name("clone name", clone)
    if "launchSpec" not in snap.plan:
        raise SnapshotError(f"{clone}: the plan of {snap.origin} has no launchSpec (made by an older nixlib?)")
    made = plan_types.clone_plan(nixeval.call("clone.plan", {
        "spec": snap.plan["launchSpec"], "clone": clone, "snapshot": snap.layout, "ram": snap.ram is not None,
        "nodes": network["nodes"] if network else {}, "hosts": network["hosts"] if network else [],
    }), f"{clone}: nixlib's clone.plan of {snap.origin}")
    plan = made["plan"]
    # The id is random (one per start_from_snapshot); the identity (hostname, hosts entry, the
    # NICs' `ip` commands) is nixlib's.
    plan["clone"] = {"snapshot": snap.name, "origin": snap.origin, "id": f"{clone}-{uuid.uuid4().hex[:12]}",
                     "identity": made["identity"]}
    return plan
