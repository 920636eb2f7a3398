"""`ntng doctor SCRIPT`: what the script's nodes need, each ok or missing with what to install;
exit 3 when one is missing, one line per reason."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from doctor_host import stand_in_host

from ntng import cli, doctor, network
from ntng.errors import EXIT_OK, EXIT_SETUP

pytestmark = pytest.mark.skipif(not shutil.which("nix-instantiate"), reason="nix-instantiate not found")

KVM_REASONS = ("QEMU was killed by SIGABRT (it aborted on an internal check)",
               "the host's KVM refused to set MSR 0x10a (IA32_ARCH_CAPABILITIES): nested virtualisation "
               "(this machine is itself a VM) that does not pass it through")


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """PATH = this machine's copy of every listed tool (a stand-in for absent required ones) but
    the ones a test drops; the list's off-PATH locations and sbin are ignored."""
    drop = stand_in_host(tmp_path, monkeypatch)
    return drop


def needs(capsys: pytest.CaptureFixture[str], script: Path) -> tuple[int, list[str]]:
    """Exit code and the lines after `what SCRIPT needs:`."""
    rc = cli.main(["doctor", str(script)])
    out = capsys.readouterr().out
    assert "Assertion" not in out
    return rc, out.split(f"what {script} needs:\n", 1)[1].splitlines()


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "t.py"
    p.write_text(text)
    return p


def test_vsock_virtiofs_and_ocr_name_their_tools(host: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    host("vhost-device-vsock", "virtiofsd", "tesseract")
    p = write(tmp_path, '#: nodes.a = { backdoor.transport = "vsock"; virtiofsd = "virtiofsd";\n'
                        '#:   sharedDirs.d = { source = "/tmp"; target = "/mnt"; type = "virtiofs"; }; };\n'
                        'start_all()\na.wait_for_text("login")\n')
    rc, lines = needs(capsys, p)
    assert rc == EXIT_SETUP
    assert "[missing ] vhost-device-vsock: not found; needed for the vsock backdoor on QEMU without " \
           "/dev/vhost-vsock (hybrid vsock): apt-get install vhost-device-vsock (Debian sid); " \
           "Nix: pkgs.vhost-device-vsock" in lines
    assert lines[lines.index("[missing ] vhost-device-vsock: not found; needed for the vsock backdoor on QEMU "
                             "without /dev/vhost-vsock (hybrid vsock): apt-get install vhost-device-vsock "
                             "(Debian sid); Nix: pkgs.vhost-device-vsock") + 1] == "           - node a: helper vhost-device-vsock"
    virtiofsd = next(i for i, ln in enumerate(lines) if ln.startswith("[missing ] virtiofsd:"))
    assert "apt-get install qemu-system-common" in lines[virtiofsd]
    assert lines[virtiofsd + 1] == "           - node a: helper virtiofsd-d"
    tesseract = next(i for i, ln in enumerate(lines) if ln.startswith("[missing ] tesseract:"))
    assert "apt-get install tesseract-ocr tesseract-ocr-eng" in lines[tesseract]
    assert lines[tesseract + 1] == "           - line 4: a.wait_for_text (OCR)"
    assert lines[-1] == f"ntng doctor: {p} needs vhost-device-vsock, virtiofsd, tesseract, missing here"
    assert any(ln.startswith("[ok      ] qemu-system-x86_64:") for ln in lines)


def test_firecracker_needs_kvm_and_its_binary(host: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    host("firecracker")
    monkeypatch.setattr(doctor, "kvm_part", lambda kernel: doctor.Part(doctor.DEGRADED, "KVM", "not usable",
                                                                       KVM_REASONS))
    p = write(tmp_path, '#: nodes.q = { };\n#: nodes.fc = { backend = "firecracker"; };\nstart_all()\n')
    rc, lines = needs(capsys, p)
    assert rc == EXIT_SETUP
    fc = lines.index("[missing ] firecracker: not found; needed for Firecracker nodes (not packaged in Debian: "
                     "its GitHub releases): Nix: pkgs.firecracker")
    assert lines[fc + 1] == "           - node fc: its VMM (firecracker)"
    kvm = lines.index("[missing ] KVM: not usable here")
    assert lines[kvm + 1:kvm + 4] == [f"           - {KVM_REASONS[0]}", f"           - {KVM_REASONS[1]}",
                                      "           - node fc: backend firecracker runs on KVM only"]
    assert lines[-1] == f"ntng doctor: {p} needs firecracker, KVM, missing here"


def test_networks_without_cap_net_admin(host: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    host("vde_switch")
    monkeypatch.setattr(network, "choose_mode", lambda requested, log: "vde")
    p = write(tmp_path, '#: nodes.a = { vlans = [ 1 ]; };\n#: nodes.b = { vlans = [ 1 ]; };\n'
                        '#: nodes.c = { backend = "cloud-hypervisor"; vlans = [ 1 ]; };\nstart_all()\n')
    rc, lines = needs(capsys, p)
    assert rc == EXIT_SETUP
    vde = next(i for i, ln in enumerate(lines) if ln.startswith("[missing ] vde_switch: not found; needed for networks"))
    assert "apt-get install vde2" in lines[vde]
    assert lines[vde + 1:vde + 3] == ["           - node a: vlans without CAP_NET_ADMIN",
                                      "           - node b: vlans without CAP_NET_ADMIN"]
    cap = next(i for i, ln in enumerate(lines) if ln.startswith("[missing ] CAP_NET_ADMIN:"))
    assert lines[cap + 1] == "           - node c: backend cloud-hypervisor networks through TAP devices only"


def test_a_script_whose_needs_are_here_passes(host: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    host("tesseract", "vhost-device-vsock")  # absent, but this script needs neither
    p = write(tmp_path, "#: nodes.a = { };\nstart_all()\na.succeed('true')\n")
    rc, lines = needs(capsys, p)
    assert rc == EXIT_OK, lines
    assert not [ln for ln in lines if ln.startswith("[missing")]
    assert lines[-1].startswith("ntng doctor: everything a run needs is here") and f"all {p} needs" in lines[-1]


def test_a_bad_script_is_the_scripts_error(host: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write(tmp_path, "#: nodes.a = { memory = \"x\"; };\n")
    assert cli.main(["doctor", str(p)]) == 2
    assert "memory must be an integer" in capsys.readouterr().err
