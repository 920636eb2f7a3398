"""`ntng doctor`: every part of nixlib/tools.nix with ok / missing / degraded and what to install,
non-zero exit when a required one is missing, one line per reason KVM is not usable."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from doctor_host import stand_in_host

from ntng import accel, cli, doctor
from ntng.errors import EXIT_OK, EXIT_SETUP

pytestmark = pytest.mark.skipif(not shutil.which("nix-instantiate"), reason="nix-instantiate not found")

# What this machine's QEMU printed for the KVM probe (nested KVM on a Firecracker host).
QEMU_ABORT = ("qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\n"
              "qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: "
              "Assertion `ret == cpu->kvm_msr_buf->nmsrs' failed.\n")


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """PATH = a folder with this machine's copy of every listed tool but the ones a test drops;
    sbin and the list's off-PATH locations are ignored, so only PATH decides."""
    drop = stand_in_host(tmp_path, monkeypatch)
    drop("virtiofsd")
    return drop


def run_doctor(capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, str]]:
    rc = cli.main(["doctor"])
    lines = {}
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("["):
            status, rest = line[1:].split("]", 1)
            lines[rest.strip().split(":", 1)[0]] = f"{status.strip()}:{rest.split(':', 1)[1]}"
    return rc, lines


def test_every_listed_tool_gets_a_line(host: Any, capsys: pytest.CaptureFixture[str]) -> None:
    _, lines = run_doctor(capsys)
    for name in ("mypy", "tesseract", "virtiofsd", "vhost-device-vsock", "vde_switch", "qemu-img",
                 "nix-instantiate", "firecracker"):
        key = f"{name} (Python)" if name == "mypy" else name
        assert key in lines, (name, lines)


def test_a_missing_optional_tool_is_degraded_with_its_package(host: Any, capsys: pytest.CaptureFixture[str]) -> None:
    host("tesseract")
    rc, lines = run_doctor(capsys)
    assert lines["tesseract"].startswith("degraded: not found; needed for OCR")
    assert "apt-get install tesseract-ocr tesseract-ocr-eng" in lines["tesseract"]
    assert "Nix: pkgs.tesseract" in lines["tesseract"]
    assert lines["virtiofsd"].startswith("degraded:") and "qemu-system-common" in lines["virtiofsd"]
    assert rc == EXIT_OK, lines


def test_a_missing_required_tool_fails(host: Any, capsys: pytest.CaptureFixture[str]) -> None:
    host("qemu-img")
    rc, lines = run_doctor(capsys)
    assert rc == EXIT_SETUP
    assert lines["qemu-img"].startswith("missing: not found") and "apt-get install qemu-utils" in lines["qemu-img"]


_real_load_tools = doctor.load_tools


def test_without_nix_instantiate_doctor_says_to_install_it(host: Any, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "load_tools", _real_load_tools)  # the real one finds no nix-instantiate
    host("nix-instantiate")
    rc, lines = run_doctor(capsys)
    assert rc == EXIT_SETUP
    assert lines["nix-instantiate"].startswith("missing:") and "apt-get install nix-bin" in lines["nix-instantiate"]
    assert "tool list" in lines


def test_the_bootstrap_entry_is_the_lists() -> None:
    listed = doctor.load_tools()["nix-instantiate"]
    assert listed == doctor.NIX_INSTANTIATE


def test_python_requirements() -> None:
    parts = {p.name: p for p in doctor.python_parts(["construct>=2.10", "no-such-package-ntng>=1",
                                                       'no-such-checker-ntng; extra == "typecheck"',
                                                       'pytest; extra == "dev"'])}
    assert parts["construct (Python)"].status == doctor.OK
    assert parts["no-such-package-ntng (Python)"].status == doctor.MISSING
    assert parts["no-such-checker-ntng (Python)"].status == doctor.DEGRADED
    assert "skips the type check" in parts["no-such-checker-ntng (Python)"].detail
    assert "pytest (Python)" not in parts


def test_the_source_trees_requirements_include_mypy() -> None:
    reqs = doctor.requirements()
    assert reqs is not None and any(r.startswith("pyroute2") for r in reqs)
    assert 'mypy; extra == "typecheck"' in reqs


def test_kvm_reasons_are_lines_not_qemus_assertion() -> None:
    reasons = accel.probe_failure_reasons(-6, QEMU_ABORT)
    assert reasons[0] == "QEMU was killed by SIGABRT (it aborted on an internal check)"
    assert "MSR 0x10a (IA32_ARCH_CAPABILITIES)" in reasons[1] and "nested" in reasons[1]
    assert not any("Assertion" in r or "kvm.c" in r for r in reasons)
    assert all(";" not in r for r in reasons)  # probe_kvm joins them with "; "


def test_an_unknown_qemu_error_is_its_last_line() -> None:
    reasons = accel.probe_failure_reasons(1, "qemu-system-x86_64: -accel kvm: something new\n")
    assert reasons == ["QEMU exited with 1 before the probe kernel ran",
                       "QEMU said: qemu-system-x86_64: -accel kvm: something new"]


def test_doctor_prints_one_line_per_kvm_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(accel, "kvm_device_problem", lambda: None)
    monkeypatch.setattr(accel, "probe_kvm",
                        lambda kernel: (False, "; ".join(accel.probe_failure_reasons(-6, QEMU_ABORT))))
    part = doctor.kvm_part(tmp_path / "vmlinuz")
    out = io.StringIO()
    monkeypatch.setenv("NTNG_CACHE", str(tmp_path))
    doctor.report([part], out)
    text = out.getvalue().splitlines()
    assert text[0].startswith("[degraded] KVM: not usable here: runs use TCG")
    assert text[1].strip() == "- QEMU was killed by SIGABRT (it aborted on an internal check)"
    assert text[2].strip().startswith("- the host's KVM refused to set MSR 0x10a")
    assert "Assertion" not in "\n".join(text)


def test_no_dev_kvm_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "kvm_device_problem", lambda: "/dev/kvm does not exist")
    monkeypatch.setattr(os.path, "exists", lambda p: False if p == "/dev/kvm" else os.path.lexists(p))
    part = doctor.kvm_part(None)
    assert part.status == doctor.DEGRADED and part.reasons[0] == "/dev/kvm does not exist"
    assert part.detail == "runs use TCG (about 10x slower)"


def test_without_nixlib_doctor_says_where_it_looked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NTNG_DATA", str(tmp_path))  # no nixlib/ there
    assert cli.main(["doctor"]) == EXIT_SETUP
    err = capsys.readouterr().err
    assert f"NTNG_DATA={tmp_path} has no nixlib/default.nix" in err, err
