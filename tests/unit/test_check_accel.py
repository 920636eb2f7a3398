"""`ntng check` plans each node for the accelerator it would get: Firecracker and Cloud
Hypervisor nodes (no TCG) as KVM nodes, with a note when this machine cannot run them."""

from __future__ import annotations

from pathlib import Path

import pytest

from ntng import check


def test_plain_firecracker_and_cloud_hypervisor_nodes_pass(tmp_path: Path) -> None:
    p = tmp_path / "t.py"
    p.write_text('#: nodes.fc = { backend = "firecracker"; };\n#: nodes.ch = { backend = "cloud-hypervisor"; };\n'
                 "#: nodes.q = { };\nstart_all()\nfc.succeed('true')\nch.succeed('true')\n")
    errors = [f for f in check.check(p, type_check=False) if f.error]
    assert errors == []
    plans = check.node_plans_of(p, None)
    assert {n: plans[n]["accel"] for n in plans} == {"fc": "kvm", "ch": "kvm", "q": "tcg"}


def test_a_node_declared_for_tcg_on_firecracker_is_still_rejected(tmp_path: Path) -> None:
    from ntng.errors import NixEvalError

    p = tmp_path / "t.py"
    p.write_text('#: nodes.fc = { backend = "firecracker"; accel = "tcg"; };\nstart_all()\n')
    with pytest.raises(NixEvalError, match="needs KVM, it has no TCG"):
        check.check(p, type_check=False)


def test_kvm_only_nodes_get_a_note_when_kvm_is_unusable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ntng import accel

    p = tmp_path / "t.py"
    p.write_text('#: nodes.a = { };\n#: nodes.fc = { backend = "firecracker"; };\nstart_all()\n')
    monkeypatch.setattr(accel, "kvm_device_problem", lambda: "/dev/kvm does not exist")
    notes = [f for f in check.check(p, type_check=False) if f.kind == "note"]
    assert [(f.line, f.message) for f in notes] == [
        (2, "node fc (backend firecracker) needs KVM, which is not usable here (/dev/kvm does not exist): "
            "this machine cannot run it")]
    monkeypatch.setattr(accel, "kvm_device_problem", lambda: None)
    monkeypatch.setattr(accel, "cached_kvm_verdict", lambda: None)
    assert [f for f in check.check(p, type_check=False) if f.kind == "note"] == []


def test_notes_for_a_prebuilt_spec_leave_out_qemu_nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mkTest's spec-kvm.json plans QEMU nodes for KVM too, but they also have spec-tcg.json."""
    import json

    from ntng import accel, testspec

    p = tmp_path / "t.py"
    p.write_text('#: nodes.q = { };\n#: nodes.fc = { backend = "firecracker"; };\nstart_all()\n')
    spec = testspec.load(p, dict(testspec.PLACEHOLDER_DEFAULTS, accel="kvm"))
    (tmp_path / "spec-kvm.json").write_text(json.dumps(
        {"name": "t", "globalTimeout": 60, "nodeNames": spec.node_names, "nodes": spec.plans, "network": spec.network}))
    monkeypatch.setattr(accel, "kvm_device_problem", lambda: "/dev/kvm does not exist")
    notes = [f.message for f in check.check(p, tmp_path, type_check=False) if f.kind == "note"]
    assert notes == ["node fc (backend firecracker) needs KVM, which is not usable here (/dev/kvm does not exist): "
                     "this machine cannot run it"]
    # Declared in `#:` lines, a QEMU node that asks for KVM itself needs it.
    p.write_text('#: nodes.q = { accel = "kvm"; };\nstart_all()\n')
    assert [f.line for f in check.check(p, type_check=False) if f.kind == "note"] == [1]
