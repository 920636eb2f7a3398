"""mkTest's path without Nix's build: a spec nixlib evaluated ahead of time (with the state root
left as a marker), one file per accelerator, run by `ntng run --spec-dir`.  The Debian image
stands in for a NixOS system here."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import run_cli
from ntng import nixeval
from ntng.image import GuestImage
from ntng.testspec import STATE_ROOT_MARKER


def write_specs(directory: Path, img: GuestImage) -> None:
    directory.mkdir()
    header = {"name": "prebuilt", "nodes": {"server": {"kernelParams": ["ntng.prebuilt=1"]}}}
    for accel in ("kvm", "tcg"):
        defaults = {"kernel": str(img.kernel), "initrd": str(img.initrd), "image": str(img.base),
                    "imageFormat": "raw", "accel": accel, "stateRoot": STATE_ROOT_MARKER}
        spec = nixeval.call("testSpec", {"header": header, "defaults": defaults})
        (directory / f"spec-{accel}.json").write_text(json.dumps(spec))


def test_run_from_prebuilt_spec(tmp_path: Path, guest_image: GuestImage) -> None:
    specs = tmp_path / "share"
    write_specs(specs, guest_image)
    assert STATE_ROOT_MARKER in (specs / "spec-tcg.json").read_text()
    script = tmp_path / "test.py"
    script.write_text(
        'assert "ntng.prebuilt=1" in server.succeed("cat /proc/cmdline")\n'
        'assert server.succeed("hostname").strip() == "server"\n')
    check = run_cli("check", "--spec-dir", str(specs), str(script))
    assert check.returncode == 0, check.stderr
    r = run_cli("run", "--accel", "tcg", "--spec-dir", str(specs), str(script), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "PASS prebuilt" in r.stderr


def test_spec_dir_errors(tmp_path: Path) -> None:
    script = tmp_path / "test.py"
    script.write_text("start_all()\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli("run", "--accel", "tcg", "--spec-dir", str(empty), str(script), cwd=tmp_path)
    assert r.returncode == 2 and "no spec-<accel>.json here" in r.stderr, r.stderr
    only_kvm = tmp_path / "kvm-only"
    only_kvm.mkdir()
    (only_kvm / "spec-kvm.json").write_text("{}")
    r = run_cli("run", "--accel", "tcg", "--spec-dir", str(only_kvm), str(script), cwd=tmp_path)
    assert r.returncode == 2 and "has no spec for tcg (it has: kvm)" in r.stderr, r.stderr
    r = run_cli("run", "--accel", "kvm", "--spec-dir", str(only_kvm), str(script), cwd=tmp_path)
    assert r.returncode == 2 and "spec-kvm.json: not a test spec" in r.stderr, r.stderr
