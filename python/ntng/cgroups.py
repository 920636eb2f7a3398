"""A cgroup of its own for each container.

`systemd-nspawn --keep-unit` runs the container in the cgroup nspawn was started in, and the
container's systemd builds its tree (`init.scope`, `system.slice/<unit>`, ...) there.  Two
containers started from one runner (or from two test workers in one session) would share that
tree: one container's systemd then kills the other's `ntng-agent.service` when it (re)starts its
own, and removes cgroups the other's units live in ("Failed to attach to cgroup: No such
device", measured on this host's hybrid hierarchy).  So every container gets a fresh child of
the runner's cgroup in each hierarchy systemd uses, entered by nspawn's process before exec.
The names are the runtime's (a random suffix): nothing a plan could know ahead of time.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


def _own_paths() -> dict[str, str]:
    """/proc/self/cgroup: hierarchy (controllers, "name=systemd", "" for v2) → our path."""
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        own[controllers] = path
    return own


def hierarchies() -> list[Path]:
    """The runner's cgroup folder in each hierarchy systemd uses: the unified one (v2), or the
    named systemd one plus the unified one where it is mounted beside it (hybrid)."""
    own = _own_paths()
    if (ROOT / "cgroup.controllers").exists():
        return [ROOT / own.get("", "/").lstrip("/")]
    found = []
    if (ROOT / "systemd" / "cgroup.procs").exists():
        found.append(ROOT / "systemd" / own.get("name=systemd", "/").lstrip("/"))
    if (ROOT / "unified" / "cgroup.procs").exists():
        found.append(ROOT / "unified" / own.get("", "/").lstrip("/"))
    return found


# A runner killed with SIGKILL cannot remove its containers' cgroups (empty once the container
# died with it).  The next container start removes such leftovers; one younger than this may be a
# concurrent runner's, made but not yet entered by its nspawn.
STALE_AFTER_S = 120.0


def make(name: str) -> list[Path]:
    """A new empty cgroup `ntng-<name>-<random>` under the runner's in each hierarchy."""
    made = []
    leaf = f"ntng-{name}-{uuid.uuid4().hex[:8]}"
    for parent in hierarchies():
        remove_stale(parent)
        path = parent / leaf
        path.mkdir()
        made.append(path)
    return made


def enter(paths: list[Path]) -> None:
    """Move the calling process into `paths` (run in the child between fork and exec: no
    allocation beyond the loop, plain os calls)."""
    for path in paths:
        fd = os.open(path / "cgroup.procs", os.O_WRONLY)
        try:
            os.write(fd, b"0")  # 0: the writing process
        finally:
            os.close(fd)


def remove(paths: list[Path]) -> None:
    """Remove the cgroups and what the container's systemd made in them, deepest first (a
    cgroup folder goes with rmdir once no process is in it; its files are the kernel's)."""
    for path in paths:
        if not path.is_dir():
            continue
        for folder, _dirs, _files in os.walk(path, topdown=False):
            try:
                os.rmdir(folder)
            except OSError:
                pass  # a process still in it (the kill is bounded): the runner's parent cgroup keeps it


def _has_processes(path: Path) -> bool:
    for folder, _dirs, _files in os.walk(path):
        try:
            if (Path(folder) / "cgroup.procs").read_text().strip():
                return True
        except OSError:
            continue
    return False


def remove_stale(parent: Path) -> None:
    """Remove `ntng-*` cgroups under `parent` that hold no process and are older than
    STALE_AFTER_S (left by a runner that was killed)."""
    now = time.time()
    for path in parent.glob("ntng-*"):
        try:
            old = now - path.stat().st_mtime > STALE_AFTER_S
        except OSError:
            continue
        if old and not _has_processes(path):
            remove([path])
