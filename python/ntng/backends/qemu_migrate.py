"""QEMU snapshots by migration to a file, and restores from one (QMP only).

QEMU 7.2 has no `file:` migration URI: the stream goes through `exec:cat`.  Saving: stop the
VM, migrate (no bandwidth cap: the default 32 MiB/s would make it take seconds), wait for
`completed`, copy the disk overlay (QEMU flushed it when the migration completed), then let
the origin run on.  Restoring: QEMU started with `-incoming defer`, `migrate-incoming`, wait,
`cont`.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import snapshots
from ..errors import SetupError

if TYPE_CHECKING:
    from ..qmp import QMPClient
    from .qemu import QemuBackend

MIGRATE_TIMEOUT = 300.0
POLL = 0.02


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


def save(backend: QemuBackend, directory: Path, resume: bool = True) -> int:
    """Freeze the running VM into `directory` (memory stream, read-only disk copy, a note).
    Returns the memory stream's size."""
    qmp = backend._qmp()
    directory.mkdir(parents=True)
    memory = directory / snapshots.MEMORY
    qmp.command("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
    qmp.command("stop")
    try:
        qmp.command("migrate", uri=f"exec:cat > {shlex.quote(str(memory))}")
        try:
            wait_migration(qmp, f"saving the VM state to {memory}")
        except SetupError:
            qmp.command("migrate_cancel")  # a timed-out migration must not go on behind `cont`
            raise
        disk = Path(backend.plan["files"]["disk"])
        backend._copy_disk(disk, directory / snapshots.DISK)
        os.chmod(directory / snapshots.DISK, 0o444)  # a base now: nothing may write to it
        note = {"backend": backend.name, "machine": backend.machine_name, "disk": str(disk)}
        (directory / snapshots.NOTE).write_text(json.dumps(note, indent=2) + "\n")
    finally:
        if resume:
            qmp.command("cont")  # also from postmigrate: the disk is taken back
    return memory.stat().st_size


def restore(backend: QemuBackend, directory: Path, timeout: float = MIGRATE_TIMEOUT) -> None:
    """Load `directory`'s memory stream into a QEMU started with `-incoming defer`, run it."""
    memory = directory / snapshots.MEMORY
    if not memory.exists():
        raise SetupError(f"{backend.machine_name}: {directory} holds no snapshot ({memory} is missing)")
    qmp = backend._qmp()
    qmp.command("migrate-incoming", uri=f"exec:cat {shlex.quote(str(memory))}")
    wait_migration(qmp, f"restoring from {memory}", timeout)
    if (qmp.command("query-status") or {}).get("status") != "running":
        qmp.command("cont")
