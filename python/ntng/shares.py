"""Copies through a node's writable shared directory (nixlib/shares.nix) instead of the protocol.

The host stages into the share and the guest copies out of it (or the other way round), so the
bytes cross the VM boundary through 9p or virtiofs; the protocol carries only the two commands.
"""

from __future__ import annotations

import os
import shlex
import shutil
import uuid
from pathlib import Path
from typing import Any, Protocol

from .errors import TestFailure

VIAS = ("protocol", "share")


class ShareError(TestFailure):
    """The node has no share a copy can go through."""


class Shell(Protocol):
    def succeed(self, *commands: str, timeout: int | None = None) -> str: ...


def check_via(via: str, what: str) -> None:
    if via not in VIAS:
        raise ValueError(f"{what}: via must be one of {', '.join(map(repr, VIAS))}, got {via!r}")


def writable_share(plan: dict[str, Any], node: str) -> dict[str, Any]:
    """The artifacts share ("shared") if there is one, else the first writable share."""
    rw = [s for s in plan.get("shares", []) if not s.get("readOnly")]
    rw.sort(key=lambda s: s["tag"] != "shared")
    if not rw:
        raise ShareError(
            f"{node}: via=\"share\" needs a writable shared directory; declare one with "
            f"`#: nodes.{node} = {{ shareArtifacts = true; }};` (or sharedDirs.<tag> with "
            "readOnly = false)")
    return rw[0]


def _stage_name() -> str:
    return f".ntng-copy-{uuid.uuid4().hex[:12]}"


def to_guest(vm: Shell, share: dict[str, Any], source: Path, target: str) -> None:
    """Host file or directory `source` to `target` in the guest (a directory's contents go into
    `target`, as with the protocol copy)."""
    stage = _stage_name()
    host_stage = Path(share["source"]) / stage
    guest_item = f"{share['target']}/{stage}/{source.name}"
    host_stage.mkdir()
    try:
        if source.is_dir():
            shutil.copytree(source, host_stage / source.name, symlinks=True)
            copy = f"mkdir -p {shlex.quote(target)} && cp -a {shlex.quote(guest_item)}/. {shlex.quote(target)}/"
        else:
            shutil.copy2(source, host_stage / source.name)
            copy = (f"mkdir -p \"$(dirname {shlex.quote(target)})\" && "
                    f"cp {shlex.quote(guest_item)} {shlex.quote(target)}")
        vm.succeed(copy)
    finally:
        shutil.rmtree(host_stage, ignore_errors=True)


def from_guest(vm: Shell, share: dict[str, Any], source: str, dest_root: Path) -> None:
    """Guest file or directory `source` into dest_root/basename(source)."""
    stage = _stage_name()
    host_stage = Path(share["source"]) / stage
    guest_stage = f"{share['target']}/{stage}"
    name = os.path.basename(source.rstrip("/"))
    try:
        vm.succeed(f"mkdir {shlex.quote(guest_stage)} && cp -a {shlex.quote(source)} {shlex.quote(guest_stage)}/")
        dest = dest_root / name
        if dest.exists() and dest.is_dir():
            shutil.copytree(host_stage / name, dest, symlinks=True, dirs_exist_ok=True)
        else:
            # The artifacts share is inside the run folder: usually a rename, not a copy.
            shutil.move(str(host_stage / name), dest)
    finally:
        shutil.rmtree(host_stage, ignore_errors=True)
