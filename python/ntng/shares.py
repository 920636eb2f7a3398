"""Copies through a node's writable shared directory (nixlib/shares.nix) instead of the protocol.

The host stages into the share and the guest copies out of it (or the other way round), so the
bytes cross the VM boundary through 9p or virtiofs; the protocol carries only the two commands.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import uuid
from pathlib import Path
from typing import Protocol

from . import safepath
from .errors import TestFailure
from .plan import NodePlan, Share

VIAS = ("protocol", "share")


class ShareError(TestFailure):
    """The node has no share a copy can go through."""


class Shell(Protocol):
    def succeed(self, *commands: str, timeout: int | None = None) -> str: ...


def check_via(via: str, what: str) -> None:
    if via not in VIAS:
        raise ValueError(f"{what}: via must be one of {', '.join(map(repr, VIAS))}, got {via!r}")


def writable_share(plan: NodePlan, node: str) -> Share:
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
    return f".ntng-copy-{uuid.uuid4().hex}"  # unguessable: the guest sees the share's folder


# Depth of a guest's tree copied out of a share: each level holds two fds and a stack frame.
MAX_DEPTH = 256
# QEMU's 9p mapped-xattr/mapped-file models keep the guest's mode here (the host file is 0600).
VIRTFS_MODE_XATTR = "user.virtfs.mode"


def _make_stage(share_fd: int) -> tuple[str, int]:
    """A fresh 0700 staging folder in the share and an fd of it: every later host-side step
    works through that fd, so the guest renaming it or putting a symlink in its place changes
    nothing the host touches."""
    stage = _stage_name()
    os.mkdir(stage, 0o700, dir_fd=share_fd)
    return stage, os.open(stage, safepath.DIR_FLAGS, dir_fd=share_fd)


def _remove_stage(share_fd: int, stage: str) -> None:
    shutil.rmtree(stage, dir_fd=share_fd, ignore_errors=True)  # fd-based: follows no symlink


def to_guest(vm: Shell, share: Share, source: Path, target: str) -> None:
    """Host file or directory `source` to `target` in the guest (a directory's contents go into
    `target`, as with the protocol copy)."""
    name = safepath.source_name(str(source), "copy_from_host")
    share_fd = safepath.open_dir(share["source"])
    try:
        stage, stage_fd = _make_stage(share_fd)
        try:
            guest_item = f"{share['target']}/{stage}/{name}"
            if source.is_dir():
                _put_tree(source, stage_fd, name)
                copy = f"mkdir -p {shlex.quote(target)} && cp -a {shlex.quote(guest_item)}/. {shlex.quote(target)}/"
            else:
                _put_file(source, stage_fd, name)
                copy = (f"mkdir -p \"$(dirname {shlex.quote(target)})\" && "
                        f"cp {shlex.quote(guest_item)} {shlex.quote(target)}")
            vm.succeed(copy)
        finally:
            os.close(stage_fd)
            _remove_stage(share_fd, stage)
    finally:
        os.close(share_fd)


def _put_file(source: Path, dir_fd: int, name: str) -> None:
    with open(source, "rb") as f:
        safepath.write_from_fd(dir_fd, name, f.fileno(), os.fstat(f.fileno()).st_mode, keep=0o7777)


def _put_tree(source: Path, parent_fd: int, name: str) -> None:
    """The host's own tree into the stage (host symlinks stay symlinks, as cp -a would)."""
    fd = safepath.make_dirs(parent_fd, [name], "copy_from_host")
    try:
        for entry in os.scandir(source):
            if entry.is_symlink():
                os.symlink(os.readlink(entry.path), entry.name, dir_fd=fd)
            elif entry.is_dir():
                _put_tree(Path(entry.path), fd, entry.name)
            elif entry.is_file():
                _put_file(Path(entry.path), fd, entry.name)
    finally:
        os.close(fd)


def from_guest(vm: Shell, share: Share, source: str, dest_root: Path) -> list[str]:
    """Guest file or directory `source` into dest_root/basename(source).  What lands on the host
    is copied by the host through dir fds: only folders and regular files, never through a
    symlink, without setuid/setgid/sticky or group/world-write bits.  Returns what was skipped
    (symlinks, devices, FIFOs, sockets)."""
    name = safepath.source_name(source, "copy_from_machine")
    share_fd = safepath.open_dir(share["source"])
    dest_fd = safepath.open_dir(dest_root)
    skipped: list[str] = []
    try:
        stage, stage_fd = _make_stage(share_fd)
        try:
            vm.succeed(f"cp -a {shlex.quote(source)} {shlex.quote(share['target'] + '/' + stage)}/")
            _take(stage_fd, dest_fd, name, name, 0, skipped)
        finally:
            os.close(stage_fd)
            _remove_stage(share_fd, stage)
    finally:
        os.close(dest_fd)
        os.close(share_fd)
    return skipped


def _guest_mode(fd: int, host_mode: int) -> int:
    try:
        return int.from_bytes(os.getxattr(fd, VIRTFS_MODE_XATTR)[:4], "little")
    except OSError:
        return host_mode  # security_model none or passthrough, or virtiofs: the host mode is the guest's


def _take(src_dir: int, dst_dir: int, name: str, rel: str, depth: int, skipped: list[str]) -> None:
    """src_dir/name (guest-made) to dst_dir/name (ours)."""
    st = safepath.lstat_at(src_dir, name)
    if st is not None and stat.S_ISDIR(st.st_mode):
        if depth >= MAX_DEPTH:
            raise safepath.UnsafePath(f"copy_from_machine: {rel} is more than {MAX_DEPTH} folders deep "
                                      "(shares.MAX_DEPTH); copy a deeper tree as a tar archive")
        try:
            sfd = os.open(name, safepath.DIR_FLAGS, dir_fd=src_dir)
        except OSError:
            skipped.append(rel)  # swapped since the lstat
            return
        try:
            dfd = safepath.make_dirs(dst_dir, [name], "copy_from_machine")
            try:
                for entry in sorted(os.listdir(sfd)):
                    _take(sfd, dfd, entry, f"{rel}/{entry}", depth + 1, skipped)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
        return
    fd = safepath.open_regular(src_dir, name)
    if fd is None:
        skipped.append(rel)
        return
    try:
        st = os.fstat(fd)
        mode = _guest_mode(fd, st.st_mode)
        if not stat.S_ISREG(mode) and stat.S_IFMT(mode) != 0:
            skipped.append(rel)  # a mapped model's symlink or device node: a plain file on the host
            return
        safepath.write_from_fd(dst_dir, name, fd, mode)
    finally:
        os.close(fd)
