"""Snapshots and clones (QEMU): a running machine frozen into a directory (device state + a
frozen qcow2 of its disk), and the launch plans of clones restored from it.

Pure: nothing here starts or touches a VM (backends/qemu_migrate.py does).  A clone's plan is
its origin's plan with the paths moved to the clone's state directory, the disk an overlay
on the frozen one, its own name and MACs: the device list must stay identical, since QEMU
loads the saved device state only into the same machine shape.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import re
import uuid
from pathlib import Path
from typing import Any

from .errors import TestScriptError

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
    directory: Path
    plan: dict[str, Any] = dataclasses.field(repr=False)  # the origin's launch plan
    save_seconds: float = 0.0  # the origin was paused this long
    memory_bytes: int = 0  # the migration stream
    ram_bytes: int = 0  # guest RAM copied to the RAM file (0: the RAM is in the stream)

    @property
    def memory(self) -> Path:
        return self.directory / MEMORY

    @property
    def ram(self) -> Path | None:
        return self.directory / RAM if self.ram_bytes else None

    @property
    def disk(self) -> Path:
        return self.directory / DISK


def check_name(what: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise SnapshotError(f"{what} {name!r} is invalid: use a letter then letters, digits, - or _ "
                            "(at most 31 characters)")


def check_snapshottable(machine: str, plan: dict[str, Any]) -> None:
    """Only QEMU nodes on the virtio-serial backdoor can be migrated to a file.

    vhost-user devices keep their state in the helper process (vhost-device-vsock), which QEMU
    cannot save: QEMU 7.2 refuses ("State blocked by non-migratable device …/vhost-user-vsock"), so a
    snapshotted node uses the virtio-serial backdoor."""
    backend = plan.get("backend", "qemu")
    if backend != "qemu":
        raise SnapshotError(
            f"{machine}: snapshot/clone is implemented for backend qemu only (this node runs {backend}; "
            "Firecracker and Cloud Hypervisor restore drives at their old paths, so they cannot clone)")
    transport = plan.get("backdoor", {}).get("transport")
    if transport != "virtio-serial":
        raise SnapshotError(
            f"{machine}: cannot snapshot a node whose backdoor is {transport}: QEMU cannot migrate the "
            "vhost-user-vsock device (its state lives in vhost-device-vsock). Declare it with "
            f'backdoor.transport = "virtio-serial" (the default), e.g. `#: nodes.{machine} = {{ }};`')


def state_dir(plan: dict[str, Any]) -> Path:
    """Everything of a node lives in its state directory: the one holding its disk."""
    return Path(plan["files"]["disk"]).parent


def clone_mac(clone: str, vlan: int) -> str:
    """As nixlib/network.nix hashes a node's MAC, from the clone's name (52:54:00 prefix)."""
    h = hashlib.sha256(f"ntng-mac/{clone}/{vlan}".encode()).hexdigest()
    return f"52:54:00:{h[0:2]}:{h[2:4]}:{h[4:6]}"


def _move(value: Any, old: str, new: str) -> Any:
    """Every path under the origin's state directory, moved under the clone's."""
    if isinstance(value, str):
        return new + value[len(old):] if value == old or value.startswith(old + "/") else \
            value.replace(f"={old}/", f"={new}/").replace(f",{old}/", f",{new}/")
    if isinstance(value, list):
        return [_move(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: _move(v, old, new) for k, v in value.items()}
    return value


def clone_spec(snap: Snapshot, clone: str, interfaces: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """nixlib's launch spec of clone `clone` of `snap`: the origin's spec with the clone's name,
    state directory, NICs (same vlans and order, its own taps and MACs; None for an unnetworked
    origin) and `restore`; nixlib (qemu.launch) turns it into the plan, so the device list is
    the origin's and Python builds no command line."""
    check_name("clone name", clone)
    origin = snap.plan
    if "launchSpec" not in origin:
        raise SnapshotError(f"{clone}: the plan of {snap.origin} has no launchSpec (made by an older nixlib?)")
    spec: dict[str, Any] = copy.deepcopy(origin["launchSpec"])
    old_nics = origin.get("interfaces", [])
    new_nics = interfaces or []
    if len(old_nics) != len(new_nics):
        raise SnapshotError(f"{clone}: the clone needs {len(old_nics)} network interface(s) like "
                            f"{snap.origin}, got {len(new_nics)}")
    spec.update(name=clone, stateDir=str(state_dir(origin).parent / clone), interfaces=new_nics,
                restore={"disk": str(snap.disk), "ram": None if snap.ram is None else str(snap.ram)})
    # A later cold boot of the clone (after crash()) comes up under its own name, MACs and
    # addresses; the restore itself ignores the kernel command line (the kernel already runs).
    params = spec.get("kernelParams")
    if isinstance(params, list):
        params = [f"systemd.hostname={clone}" if w.startswith("systemd.hostname=") else w for w in params]
        for old, new in zip(old_nics, new_nics, strict=True):
            nic = (f"ntng.if={new['mac']},{new['guestName']},{new['ipv4']}/{new['prefixLength4']},"
                   f"{new['ipv6']}/{new['prefixLength6']}")
            params = [nic if w.startswith(f"ntng.if={old['mac']},") else w for w in params]
        if new_nics:
            params = [f"{w},{clone}={new_nics[0]['ipv4']}" if w.startswith("ntng.hosts=") else w for w in params]
        spec["kernelParams"] = params
    return spec


def clone_plan(snap: Snapshot, clone: str, interfaces: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The launch plan of clone `clone` of `snap`, from nixlib (see clone_spec)."""
    from . import nixeval

    plan: dict[str, Any] = nixeval.call("qemu.launch", clone_spec(snap, clone, interfaces))
    plan["clone"] = {"snapshot": snap.name, "origin": snap.origin, "id": f"{clone}-{uuid.uuid4().hex[:12]}"}
    return plan


def identity_script(hostname: str, clone_id: str, epoch: float,
                     nics: list[tuple[str, dict[str, Any]]] | None = None,
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


def nics_script(nics: list[tuple[str, dict[str, Any]]] | None) -> list[str]:
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


def clone_interfaces(nodes: dict[str, list[dict[str, Any]]], origin: str, clone: str) -> list[dict[str, Any]]:
    """The clone's NICs: the origin's vlans in the same order, its own tap, MAC and address.
    Addresses follow every node's and earlier clone's (nodes hold .1 to .N; .254 is the
    runner's), so the NixOS-style numbering of the declared nodes never changes."""
    used = {int(i["ipv4"].rsplit(".", 1)[1]) for ifaces in nodes.values() for i in ifaces}
    number = max(used, default=0) + 1
    if number > 253:
        raise SnapshotError(f"{clone}: no address left on the vlans (.1-.253 are taken)")
    out = []
    for i in nodes.get(origin, []):
        vlan = i["vlan"]
        tap = f"ntc{hashlib.sha256(f'{clone}/{vlan}'.encode()).hexdigest()[:8]}v{vlan}"[:15]
        out.append(dict(i, tap=tap, mac=clone_mac(clone, vlan), impairment=None,
                        ipv4=re.sub(r"\.\d+$", f".{number}", i["ipv4"]),
                        ipv6=re.sub(r"::[0-9a-f]+$", f"::{number:x}", i["ipv6"])))
    return out
