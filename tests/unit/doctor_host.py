"""The host `ntng doctor` sees in its tests (test_doctor.py, test_doctor_script.py)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from ntng import doctor


def stand_in_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """PATH = a folder with this machine's copy of every listed tool (a stand-in for absent
    required ones); sbin and the list's off-PATH locations are ignored, so only PATH decides.
    KVM is a stand-in and no network part is probed: those have their own tests.  Returns
    `drop(*names)`, which takes tools away."""
    tools = doctor.load_tools()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in tools:
        real = shutil.which(name)
        if real:
            (bindir / name).symlink_to(real)
        elif tools[name].required:  # a stand-in: doctor only looks for it
            (bindir / name).write_text("#!/bin/sh\n")
            (bindir / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.setattr(doctor, "SBIN", ())
    monkeypatch.setattr(doctor, "load_tools", lambda: {
        n: doctor.Tool(**{**t.__dict__, "paths": ()}) for n, t in tools.items()})
    monkeypatch.setenv("NTNG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(doctor, "kvm_part", lambda kernel: doctor.Part(doctor.OK, "KVM", "stand-in"))
    monkeypatch.setattr(doctor, "network_parts", lambda _netem: [])

    def drop(*names: str) -> None:
        for name in names:
            (bindir / name).unlink(missing_ok=True)
    return drop
