"""nixlib's output and python/ntng/plan.py's types agree.

Every builder is evaluated through the real nixlib (a test spec with QEMU q35/pc/microvm,
Firecracker, Cloud Hypervisor and nspawn nodes on every transport, with vlans, impairments, 9p and
virtiofs shares, a display, extra serial ports and a disk boot; a VDE-mode spec; the snapshot
layout of each backend; a networked clone plan; the KVM probe) and validated with strict=True:
a missing field, a wrong type or a key nixlib adds that plan.py does not declare fails here.
The other way round, every field plan.py declares must show up in some evaluated plan (a type
for a field nixlib dropped is drift too).
"""

from __future__ import annotations

import types
import typing
from functools import cache
from typing import Any

import pytest

from ntng import nixeval, plan
from ntng.errors import PlanError

DEFAULTS = {"kernel": "/img/bzImage", "vmlinux": "/img/vmlinux", "initrd": "/img/initrd",
            "image": "/img/rootfs.ext4", "imageFormat": "raw", "accel": "kvm",
            "stateRoot": "/run/ntng-state", "tscKhz": 2500000}
SHARES = {"nine": {"source": "/srv/a", "target": "/mnt/a", "readOnly": True},
          "fast": {"source": "/srv/b", "target": "/mnt/b", "type": "virtiofs"}}

# One node per builder shape; every transport a backend offers (nixlib/capabilities.nix).
NODES: dict[str, Any] = {
    "q35": {"vlans": [1, 2], "display": True, "sharedDirs": SHARES, "extraSerialPorts": ["log.port"],
            "impairments": [{"vlan": 1, "delay": "10ms", "loss": 1}]},
    "pc": {"machineType": "pc", "backdoor": {"transport": "vsock"}, "vlans": [1]},
    "vhost": {"machineType": "pc", "backdoor": {"transport": "vsock", "vhost": True}},
    "micro": {"machineType": "microvm", "vlans": [2]},
    "microvsock": {"machineType": "microvm", "backdoor": {"transport": "vsock"}},
    "disk": {"kernel": None},
    "fc": {"backend": "firecracker", "vlans": [1]},
    "ch": {"backend": "cloud-hypervisor", "vlans": [2], "sharedDirs": {"fast": SHARES["fast"]}},
    "chvsock": {"backend": "cloud-hypervisor", "backdoor": {"transport": "vsock"}},
    "box": {"backend": "nspawn", "vlans": [1], "sharedDirs": {"nine": SHARES["nine"]}},
    "nixbox": {"backend": "nspawn", "init": "/nix/store/00000000000000000000000000000000-system/init"},
}


@cache
def kvm_spec() -> plan.Spec:
    data = nixeval.call("testSpec", {"header": {"nodes": NODES}, "defaults": DEFAULTS})
    return plan.validate(data, plan.Spec, "testSpec (kvm, tap)", strict=True)


@cache
def vde_spec() -> plan.Spec:
    header = {"nodes": {k: v for k, v in NODES.items() if k in ("q35", "pc", "micro")}}
    data = nixeval.call("testSpec", {"header": header,
                                     "defaults": {**DEFAULTS, "accel": "tcg", "networkMode": "vde"}})
    return plan.validate(data, plan.Spec, "testSpec (tcg, vde)", strict=True)


@cache
def layouts() -> dict[str, plan.SnapshotLayout]:
    nodes = kvm_spec()["nodes"]
    return {name: plan.validate(nixeval.call("clone.snapshot", {"spec": nodes[name]["launchSpec"], "name": "s"}),
                                plan.SnapshotLayout, f"clone.snapshot of {name}", strict=True)
            for name in ("q35", "fc", "ch")}


@cache
def clone() -> plan.ClonePlan:
    spec = kvm_spec()
    made = nixeval.call("clone.plan", {
        "spec": spec["nodes"]["q35"]["launchSpec"], "clone": "c1", "snapshot": layouts()["q35"], "ram": True,
        "nodes": spec["network"]["nodes"], "hosts": spec["network"]["hosts"]})
    return plan.validate(made, plan.ClonePlan, "clone.plan", strict=True)


def test_every_builder_gives_a_plan_of_the_typed_shape() -> None:
    spec = kvm_spec()
    assert {p["backend"] for p in spec["nodes"].values()} == {"qemu", "firecracker", "cloud-hypervisor", "nspawn"}
    assert {p["backdoor"]["transport"] for p in spec["nodes"].values()} == {"virtio-serial", "vsock", "virtconsole", "unix"}
    assert vde_spec()["network"]["mode"] == "vde"
    assert clone()["plan"]["restoreArgv"]


def test_the_snapshot_layouts_and_the_probe_are_typed() -> None:
    assert set(layouts()) == {"q35", "fc", "ch"}
    probe = nixeval.call("qemu.probe", {"kernel": "/img/bzImage", "accel": "kvm"})
    plan.validate(probe, plan.ProbePlan, "qemu.probe", strict=True)


def test_a_field_python_does_not_type_fails_the_strict_check() -> None:
    """What catches a field nixlib adds: the same plan with one more key is rejected, by path."""
    node = dict(kvm_spec()["nodes"]["fc"])
    node["backdoor"] = {**node["backdoor"], "newField": 1}  # type: ignore[typeddict-unknown-key]
    plan.validate(node, plan.NodePlan, "fc")  # at run time, extra keys pass
    with pytest.raises(PlanError, match=r"^fc: backdoor: field\(s\) newField not in Backdoor"):
        plan.validate(node, plan.NodePlan, "fc", strict=True)


# --- every typed field is one nixlib makes -------------------------------------------------------

RUNNERS_OWN = {"CloneInfo"}  # NodePlan.clone: added by snapshots.clone_plan, not by nixlib


def seen_fields(value: object, tp: Any, seen: set[tuple[str, str]]) -> None:
    """(TypedDict, key) for every key present in `value`, walked along `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            if plan._check(value, option, False) is None:
                seen_fields(value, option, seen)
                return
    elif origin is list and isinstance(value, list):
        for v in value:
            seen_fields(v, typing.get_args(tp)[0], seen)
    elif origin is dict and isinstance(value, dict):
        for v in value.values():
            seen_fields(v, typing.get_args(tp)[1], seen)
    elif plan._is_typeddict(tp) and isinstance(value, dict):
        for key, field in typing.get_type_hints(tp).items():
            if key in value:
                seen.add((tp.__name__, key))
                seen_fields(value[key], field, seen)


def declared_fields(tp: Any, out: set[tuple[str, str]]) -> None:
    if plan._is_typeddict(tp):
        if any(name == tp.__name__ for name, _ in out):
            return
        for key, field in typing.get_type_hints(tp).items():
            out.add((tp.__name__, key))
            declared_fields(field, out)
    for arg in typing.get_args(tp):
        declared_fields(arg, out)


def test_every_typed_field_occurs_in_some_evaluated_plan() -> None:
    seen: set[tuple[str, str]] = set()
    seen_fields(kvm_spec(), plan.Spec, seen)
    seen_fields(vde_spec(), plan.Spec, seen)
    seen_fields(clone(), plan.ClonePlan, seen)
    for layout in layouts().values():
        seen_fields(layout, plan.SnapshotLayout, seen)
    declared: set[tuple[str, str]] = set()
    for tp in (plan.Spec, plan.ClonePlan, plan.SnapshotLayout):
        declared_fields(tp, declared)
    never = sorted((name, key) for name, key in declared - seen
                   if name not in RUNNERS_OWN and (name, key) != ("NodePlan", "clone"))
    assert not never, f"typed in python/ntng/plan.py but in no plan nixlib made: {never}"
