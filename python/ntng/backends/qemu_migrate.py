"""QEMU snapshots by migration to a file, and restores from one (QMP only).

QEMU 7.2 has no `file:` migration URI: the stream goes through `exec:cat`.  Saving: stop the
VM, migrate (no bandwidth cap: the default 32 MiB/s would make it take seconds), wait for
`completed`, copy the disk overlay (QEMU flushed it when the migration completed), then let
the origin run on.  Restoring: QEMU started with `-incoming defer`, `migrate-incoming`, wait,
`cont`.

Guest RAM in a memfd (the plan's `ram`, from nixlib) stays out of the stream (x-ignore-shared):
while the VM is stopped its pages are copied to a file, holes kept, and a clone maps that file
copy-on-write, so a restore loads only device state and the guest faults in what it touches.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SetupError
from .vmm import copy_disk

if TYPE_CHECKING:
    from ..plan import SnapshotLayout
    from ..qmp import QMPClient

MIGRATE_TIMEOUT = 300.0
POLL = 0.02
MEMFD_NAME = "memory-backend-memfd"  # QEMU names a memory-backend-memfd's memfd after its type


def wait_migration(qmp: QMPClient, what: str, timeout: float = MIGRATE_TIMEOUT) -> dict[str, Any]:
    """Poll query-migrate until completed; a failure or timeout is a SetupError saying which."""
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = qmp.command("query-migrate") or {}
        status = info.get("status")
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            raise SetupError(f"{qmp.name}: {what} {status}: {info.get('error-desc', 'no reason given')}")
        if time.monotonic() > deadline:
            raise SetupError(f"{qmp.name}: {what} not completed within {timeout:.0f}s (status {status})")
        time.sleep(POLL)


def _ignore_shared(qmp: QMPClient, on: bool) -> None:
    qmp.command("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": on}])


def find_memfd(pid: int) -> Path:
    """/proc path of QEMU's guest RAM memfd (nixlib's memory-backend-memfd; QEMU names it so)."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith(f"/memfd:{MEMFD_NAME} "):
                found.append(fd)
        except OSError:
            continue
    if len(found) != 1:
        raise SetupError(f"QEMU (pid {pid}) holds {len(found)} guest RAM memfds, expected one")
    return found[0]


def copy_sparse(source: Path, target: Path) -> int:
    """Copy a file's data extents only (guest RAM never touched stays a hole); bytes copied."""
    copied = 0
    with open(source, "rb") as src, open(target, "wb") as dst:
        size = os.fstat(src.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(src.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(src.fileno(), start, os.SEEK_HOLE)
            offset = start
            while offset < end:
                os.lseek(dst.fileno(), offset, os.SEEK_SET)
                sent = os.sendfile(dst.fileno(), src.fileno(), offset, end - offset)
                if sent <= 0:
                    raise SetupError(f"copying {source}: sendfile made no progress at {offset}")
                offset += sent
            copied += end - start
            pos = end
        dst.truncate(size)
    return copied


def save(qmp: QMPClient, layout: SnapshotLayout, disk: Path, who: str, *, ram_pid: int | None = None,
         resume: bool = True) -> tuple[int, int]:
    """Freeze the running VM behind `qmp` into nixlib's snapshot `layout` (its files: memory
    stream, RAM file where the RAM is a memfd of QEMU process `ram_pid`, read-only copy of
    `disk`, a note naming machine `who`; its migrate URI).  The stream's size and the RAM bytes
    copied."""
    Path(layout["directory"]).mkdir(parents=True)
    files = {k: Path(str(v)) for k, v in layout["files"].items()}
    memory = files["memory"]
    ram_copied = 0
    qmp.command("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
    _ignore_shared(qmp, ram_pid is not None)
    qmp.command("stop")
    try:
        qmp.command("migrate", uri=layout["migrate"]["save"])
        try:
            wait_migration(qmp, f"saving the VM state to {memory}")
        except SetupError:
            qmp.command("migrate_cancel")  # a timed-out migration must not go on behind `cont`
            raise
        if ram_pid is not None:
            ram_copied = copy_sparse(find_memfd(ram_pid), files["ram"])
        copy_disk(layout["copyDisk"]["save"], who)
        os.chmod(files["disk"], 0o444)  # a base now: nothing may write to it
        note = {"backend": "qemu", "machine": who, "disk": str(disk)}
        files["note"].write_text(json.dumps(note, indent=2) + "\n")
    finally:
        if resume:
            qmp.command("cont")  # also from postmigrate: the disk is taken back
    return memory.stat().st_size, ram_copied


def restore(qmp: QMPClient, layout: SnapshotLayout, who: str, ram_file: Path | None = None,
            timeout: float = MIGRATE_TIMEOUT) -> None:
    """Load the memory stream of nixlib's snapshot `layout` into a QEMU started with
    `-incoming defer` (behind `qmp`), run it.  `ram_file`: the snapshot's RAM file the clone
    maps (the stream has no RAM)."""
    memory = Path(layout["files"]["memory"])
    if not memory.exists():
        raise SetupError(f"{who}: {layout['directory']} holds no snapshot ({memory} is missing)")
    if ram_file is not None:
        if not ram_file.exists():
            raise SetupError(f"{who}: the snapshot's RAM file {ram_file} is missing")
        _ignore_shared(qmp, True)
    qmp.command("migrate-incoming", uri=layout["migrate"]["restore"])
    wait_migration(qmp, f"restoring from {memory}", timeout)
    if (qmp.command("query-status") or {}).get("status") != "running":
        qmp.command("cont")
