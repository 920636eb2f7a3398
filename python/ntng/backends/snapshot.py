"""A snapshot directory (nixlib's clone.snapshot layout): the VMM's own files, the disk as it
was when they were written (the saved memory refers to its contents), and a note of whose disk
that was.

Firecracker and Cloud Hypervisor restore drives at the paths they had, so a snapshot loads into
the machine (the state directory) it was taken of: the note turns a mismatch into a clear error
instead of a guest running on another machine's disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SetupError
from ..plan import SnapshotFile, SnapshotLayout

if TYPE_CHECKING:
    from .vmm import VmmProcess


def save_disk(backend: VmmProcess, layout: SnapshotLayout) -> None:
    """After the VMM wrote its files (the VM still paused): the disk and the note."""
    disk = Path(backend.plan["files"]["disk"])
    backend.copy_disk(layout["copyDisk"]["save"])
    note = {"backend": backend.name, "machine": backend.machine_name, "disk": str(disk)}
    Path(layout["files"]["note"]).write_text(json.dumps(note, indent=2) + "\n")


def restore_disk(backend: VmmProcess, layout: SnapshotLayout) -> None:
    """Before the VMM loads the snapshot: check it is this machine's, put its disk in place."""
    directory, note_path = layout["directory"], Path(layout["files"]["note"])
    try:
        note = json.loads(note_path.read_text())
    except (OSError, ValueError) as e:
        raise SetupError(f"{backend.machine_name}: {directory} is not a snapshot (its {note_path.name}: {e})") from None
    disk = backend.plan["files"]["disk"]
    if note.get("backend") != backend.name:
        raise SetupError(f"{backend.machine_name}: {directory} is a {note.get('backend')} snapshot, "
                         f"this machine runs {backend.name}")
    if note.get("disk") != disk:
        raise SetupError(
            f"{backend.machine_name}: the snapshot in {directory} is of machine {note.get('machine')!r}, "
            f"whose disk was {note.get('disk')}; {backend.name} restores drives at the paths they "
            f"had, so load it into a machine with that disk path (this one's is {disk})")
    copy = layout["copyDisk"]["restore"]
    if copy is None:
        raise SetupError(f"{backend.machine_name}: {directory}: nixlib's layout puts no disk back (a QEMU snapshot?)")
    backend.copy_disk(copy)


def saved_bytes(layout: SnapshotLayout, *keys: SnapshotFile) -> int:
    """The size of the layout's files `keys` (what snapshot_save reports)."""
    paths = [Path(layout["files"][k]) for k in keys]
    return sum(p.stat().st_size for p in paths if p.exists())
