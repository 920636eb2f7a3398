"""Plans are validated once, where the runner gets them (python/ntng/plan.py): a spec file or a
nixlib result of the wrong shape is an error naming its source, the field's path and what was
expected, before anything starts (not a KeyError deep inside a run)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from ntng import nixeval, plan, snapshots, testspec
from ntng.errors import PlanError, TestScriptError

DEFAULTS = {"kernel": "/k", "vmlinux": "/v", "initrd": "/i", "image": "/img", "imageFormat": "raw",
            "accel": "kvm", "stateRoot": "@stateRoot@"}
HEADER = "#: nodes.a = { vlans = [ 1 ]; };\n#: nodes.b = { backend = \"firecracker\"; vlans = [ 1 ]; };\npass\n"


@pytest.fixture(scope="module")
def spec_json(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """nixlib's spec of HEADER, as mkTest writes it (the state root still a marker)."""
    script = tmp_path_factory.mktemp("s") / "t.py"
    script.write_text(HEADER)
    s = testspec.load(script, DEFAULTS)
    return {"name": s.name, "globalTimeout": int(s.global_timeout), "nodeNames": s.node_names,
            "nodes": s.plans, "network": s.network}


def write_spec(tmp_path: Path, data: dict[str, Any]) -> tuple[Path, Path]:
    script = tmp_path / "t.py"
    script.write_text("pass\n")
    spec = tmp_path / "spec-kvm.json"
    spec.write_text(json.dumps(data))
    return script, spec


def test_a_prebuilt_spec_loads_typed_with_the_state_root_filled_in(tmp_path: Path, spec_json: dict[str, Any]) -> None:
    script, spec = write_spec(tmp_path, spec_json)
    s = testspec.load_prebuilt(script, spec, tmp_path / "state")
    assert s.plans["b"]["files"]["disk"].startswith(str(tmp_path / "state") + "/b/")
    assert s.network["nodes"]["a"][0]["vlan"] == 1


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["nodes"]["b"]["files"].pop("disk"), "nodes.b.files: missing field(s) disk (Files)"),
    (lambda d: d["nodes"]["a"]["interfaces"][0].update(mac=5), "nodes.a.interfaces[0].mac: expected str, got int 5"),
    (lambda d: d["nodes"]["a"].update(backend="xen"),
     "nodes.a.backend: expected one of 'qemu', 'firecracker', 'cloud-hypervisor', 'nspawn', got str 'xen'"),
    (lambda d: d["network"]["vlans"]["1"].update(members="a"), "network.vlans['1'].members: expected a list"),
    (lambda d: d["nodes"]["b"]["backdoor"].update(port="1234"), "nodes.b.backdoor.port: expected int or null"),
])
def test_a_bad_prebuilt_spec_names_the_file_and_the_field(tmp_path: Path, spec_json: dict[str, Any],
                                                          change: Any, message: str) -> None:
    data = copy.deepcopy(spec_json)
    change(data)
    script, spec = write_spec(tmp_path, data)
    with pytest.raises(TestScriptError) as e:
        testspec.load_prebuilt(script, spec, tmp_path / "state")
    assert str(e.value).startswith(f"{spec}: not a test spec: {message}"), str(e.value)


def test_nixlib_output_of_the_wrong_shape_is_a_plan_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          spec_json: dict[str, Any]) -> None:
    """What a nixlib newer or older than the runner gives is caught where it is loaded."""
    script = tmp_path / "t.py"
    script.write_text(HEADER)
    data = copy.deepcopy(spec_json)
    del data["nodes"]["a"]["sockets"]
    monkeypatch.setattr(nixeval, "evaluate", lambda *a, **k: (data, None))
    with pytest.raises(PlanError, match=rf"^{script}: nixlib's test spec: nodes.a: missing field\(s\) sockets"):
        testspec.load(script, DEFAULTS)


def test_a_snapshot_layout_and_a_clone_plan_are_validated(monkeypatch: pytest.MonkeyPatch,
                                                          spec_json: dict[str, Any]) -> None:
    node = spec_json["nodes"]["a"]
    copy = {"save": ["cp", "/d", "/s/d"], "restore": None}
    monkeypatch.setattr(nixeval, "call", lambda fn, arg: {"directory": "/s", "files": {"disk": "/s/d"},
                                                          "save": [], "restore": [], "copyDisk": copy,
                                                          "guestPrepare": []})
    with pytest.raises(PlanError, match=r"^a: nixlib's clone.snapshot 's1': files: missing field\(s\) note"):
        snapshots.layout(node, "s1")
    layout = plan.SnapshotLayout(directory="/s", files={"disk": "/s/d", "note": "/s/n"}, save=[], restore=[],
                                 copyDisk={"save": ["cp", "/d", "/s/d"], "restore": None}, guestPrepare=[])
    snap = snapshots.Snapshot("s1", "a", layout, node)
    monkeypatch.setattr(nixeval, "call", lambda fn, arg: {"interfaces": [], "plan": {**node, "memory": "1G"},
                                                          "identity": {"hostname": "c", "hosts": [], "nics": "",
                                                                       "script": ""}})
    with pytest.raises(PlanError, match=r"^c: nixlib's clone.plan of a: plan.memory: expected int, got str '1G'"):
        snapshots.clone_plan(snap, "c")


def test_extra_keys_pass_at_run_time_and_fail_when_strict(spec_json: dict[str, Any]) -> None:
    node = {**spec_json["nodes"]["a"], "future": True}
    assert plan.validate(node, plan.NodePlan, "a") is node  # the same dict: nothing converted
    with pytest.raises(PlanError, match=r"^a: field\(s\) future not in NodePlan"):
        plan.validate(node, plan.NodePlan, "a", strict=True)


def test_the_kvm_probe_kernel_comes_from_the_typed_spec(tmp_path: Path, spec_json: dict[str, Any]) -> None:
    data = copy.deepcopy(spec_json)
    data["nodes"]["a"]["kernel"] = None  # a disk boot: no kernel to probe with
    write_spec(tmp_path, data)
    assert testspec.first_kernel(tmp_path) == Path(data["nodes"]["b"]["kernel"])
    data["nodes"]["b"]["kernel"] = 7
    write_spec(tmp_path, data)
    with pytest.raises(TestScriptError, match=r"not a test spec: nodes.b.kernel: expected str or null, got int 7"):
        testspec.first_kernel(tmp_path)
