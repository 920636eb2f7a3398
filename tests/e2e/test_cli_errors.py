"""Bad input gets a clear error and an exit code that tells a failed test from a broken setup."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from helpers import ntng_run
from ntng import accel, errors, image


def script(tmp_path: Path, text: str, name: str = "t.py") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    p = script(tmp_path, "machine.succeed('true')\nif True\n    pass\n")
    r = ntng_run(p)
    assert r.returncode == errors.EXIT_USAGE, r.stderr
    assert f"{p}:2: syntax error" in r.stderr
    assert "Traceback" not in r.stderr


def test_name_error_names_file_and_line(tmp_path: Path, guest_image: object) -> None:
    p = script(tmp_path, "x = 1\nstart_al()\n")
    r = ntng_run(p, "--accel", "tcg")
    assert r.returncode == errors.EXIT_USAGE, r.stderr
    assert f"{p}:2 (start_al()): NameError: name 'start_al' is not defined" in r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_machine_method_names_the_closest(tmp_path: Path, guest_image: object) -> None:
    p = script(tmp_path, "machine.succed('true')\n")
    r = ntng_run(p, "--accel", "tcg")
    assert r.returncode == errors.EXIT_USAGE, r.stderr
    assert "did you mean succeed?" in r.stderr and f"{p}:1" in r.stderr


def test_bad_node_declaration_names_the_line(tmp_path: Path, guest_image: object) -> None:
    p = script(tmp_path, "# a comment\n#: nodes.a = { memory = \"lots\"; };\nstart_all()\n")
    r = ntng_run(p, "--accel", "tcg")
    assert r.returncode == errors.EXIT_USAGE, r.stderr
    assert f"{p}:2: node declaration rejected: node 'a': memory must be an integer" in r.stderr


def test_missing_image(tmp_path: Path) -> None:
    r = ntng_run(script(tmp_path, "start_all()\n"), "--image", str(tmp_path / "nope"))
    assert r.returncode == errors.EXIT_SETUP
    assert "no guest image at" in r.stderr and "ntng image build" in r.stderr


def test_missing_kernel_in_image(tmp_path: Path, guest_image: image.GuestImage) -> None:
    broken = tmp_path / "img"
    broken.mkdir()
    for part in (guest_image.base, guest_image.vmlinux, guest_image.initrd):
        (broken / part.name).symlink_to(part)
    r = ntng_run(script(tmp_path, "start_all()\n"), "--image", str(broken))
    assert r.returncode == errors.EXIT_SETUP
    assert "vmlinuz is missing" in r.stderr


def test_qemu_absent(tmp_path: Path, guest_image: object) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("nix-instantiate", "qemu-img"):
        found = shutil.which(tool)
        assert found
        (bindir / tool).symlink_to(found)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{bindir}"}
    r = ntng_run(script(tmp_path, "start_all()\n"), "--accel", "tcg", env=env)
    assert r.returncode == errors.EXIT_SETUP, r.stderr
    assert "qemu-system-x86_64 not found" in r.stderr


def test_accel_kvm_where_kvm_does_not_boot(tmp_path: Path, guest_image: image.GuestImage) -> None:
    works, why = accel.probe_kvm(guest_image.kernel)
    if works:
        pytest.skip("KVM works on this machine")
    r = ntng_run(script(tmp_path, "start_all()\n"), "--accel", "kvm")
    assert r.returncode == errors.EXIT_SETUP
    assert "--accel kvm: KVM is not usable here" in r.stderr


def test_guest_that_never_says_hello(tmp_path: Path, guest_image: object) -> None:
    # A container (issue 17): what is under test is the runner's wait, not a kernel's boot.
    p = script(tmp_path, '#: nodes.mute = { backend = "nspawn"; kernelParams = [ "systemd.mask=ntng-backdoor.service" ]; };\n'
                         "mute.succeed('true')\n")
    r = ntng_run(p, "--accel", "tcg", "--boot-timeout", "15")
    assert r.returncode == errors.EXIT_SETUP, r.stderr
    assert "mute:" in r.stderr and "waited 15" in r.stderr and "the backdoor agent's hello" in r.stderr
    assert "last console lines:" in r.stderr
    # the agent's service is masked: what it printed says so
    assert "the agent's last lines on the console:\n(none: it never printed there)" in r.stderr
    assert "Traceback" not in r.stderr


def test_failed_test_and_global_timeout_exit_codes(tmp_path: Path, guest_image: object) -> None:
    box = '#: nodes.machine = { backend = "nspawn"; };\n'  # no VM feature under test
    r = ntng_run(script(tmp_path, box + "machine.succeed('echo checking; exit 4')\n"), "--accel", "tcg")
    assert r.returncode == errors.EXIT_TEST_FAILED, r.stderr
    assert "command `echo checking; exit 4` failed (exit code 4)" in r.stderr
    assert f"{tmp_path / 't.py'}:2" in r.stderr
    r = ntng_run(script(tmp_path, box + "#: globalTimeout = 5;\nmachine.succeed('sleep 600')\n", "slow.py"),
                 "--accel", "tcg")
    assert r.returncode == errors.EXIT_TIMEOUT, r.stderr
    assert "global timeout of 5s reached" in r.stderr
