"""Snapshot a running machine and start clones of it: the Machine/Driver side of snapshots.py.

Any backend with nixlib's "snapshot" feature saves (Backend.snapshot_save into nixlib's layout);
clones need "clone" (QEMU: the others restore drives at their old paths).  A clone is a full Machine (every method works) whose first start restores the snapshot instead
of booting; right after its agent has said hello (a new session on the clone's own backdoor
socket) it gets its identity: hostname, clone id, the host's time, and where networked its own
MACs, addresses and hosts entries.  Later starts (after crash()) boot the clone's own disk.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import caps, testspec
from . import protocol as P
from .errors import RemoteError
from .snapshots import (
    Snapshot,
    SnapshotError,
    check_name,
    clone_plan,
    layout,
)

if TYPE_CHECKING:
    from .driver import Driver
    from .machine import Machine
    from .session import Session

_taken: set[Path] = set()  # snapshot directories made by this process (a name is used once)


def take(m: Machine, name: str) -> Snapshot:
    """Boot to ready if needed, pause, save memory and devices, freeze the disk, run on.
    (Machine.snapshot's guard has checked the "snapshot" capability.)"""
    check_name("snapshot name", name)
    where = layout(m.plan, name)
    directory = Path(where["directory"])
    if directory in _taken:
        raise SnapshotError(f"{m.name}: a snapshot named {name!r} exists already in this run")
    shutil.rmtree(directory, ignore_errors=True)  # left by an earlier -K run
    m.connect()
    assert m.client is not None
    for argv in where["guestPrepare"]:  # nixlib's: what its clones need made before
        m.client.execute(P.Exec(argv=argv), wait=60)
    m.log(f"snapshot {name!r}: pausing and saving the VM state")
    t0 = time.monotonic()
    try:
        size, ram = m.backend.snapshot_save(where)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    paused = time.monotonic() - t0
    _taken.add(directory)
    step_clock(m)  # the origin's clock stood still while it was paused
    m.events.emit("snapshot", m.name, paused, name=name, memory_bytes=size, ram_bytes=ram)
    m.log(f"snapshot {name!r} saved in {paused:.2f}s ({size / 1e6:.0f} MB of migration stream, "
          f"{ram / 1e6:.0f} MB of RAM file) to {directory}")
    return Snapshot(name, m.name, where, m.plan, paused, size, ram)


def step_clock(m: Machine) -> None:
    assert m.client is not None
    req = P.Exec(argv=["date", "-s", f"@{time.time():.6f}"])
    m.client.execute(req, wait=60)


def start_clones(driver: Driver, snap: Snapshot, names: list[str]) -> list[Machine]:
    """Machines `names` restored from `snap`, in parallel, each up and with its identity."""
    if isinstance(names, str):
        raise SnapshotError(f"start_from_snapshot: names must be a list of machine names, got {names!r}")
    caps.require(snap.plan, "clone", f"start_from_snapshot: clones of machine {snap.origin}")
    taken = {m.name for m in driver.machines}
    for name in names:
        check_name("clone name", name)
        if name in taken:
            raise SnapshotError(f"start_from_snapshot: there is a machine called {name!r} already")
        taken.add(name)
    if not snap.memory.exists():
        raise SnapshotError(f"start_from_snapshot: snapshot {snap.name!r} is gone ({snap.directory})")
    origin = next(m for m in driver.machines if m.name == snap.origin)
    clones = []
    for name in names:
        # Its artifacts (nixlib's @artifacts@ marker) live in this run's folder, as the nodes'.
        plan = testspec.substitute(clone_plan(snap, name, driver.network.plan), testspec.ARTIFACTS_MARKER,
                                   str(driver.out_dir))
        if plan.get("interfaces"):
            driver.network.add_clone(name, plan["interfaces"])
        m = driver.new_machine(name, plan, origin.boot_timeout, restore_from=snap)
        driver.machines.append(m)
        clones.append(m)
    driver.connect_all(clones)
    return clones


def restore(m: Session, snap: Snapshot) -> None:
    """Session.start() of a clone's first start."""
    m.log(f"restoring snapshot {snap.name!r} of {snap.origin}")
    t0 = time.monotonic()
    m.backend.snapshot_restore(snap.layout)
    m.log(f"{m.backend.name} started and loaded the snapshot in {time.monotonic() - t0:.2f}s")


def adopt_identity(m: Session, started: float) -> None:
    """Right after the clone's first hello: hostname, id, clock and hosts entry (an IDENTITY
    request, set by the agent itself), then its NICs (one `ip -batch` command).  What to say
    is nixlib's (plan["clone"]["identity"]); only the clock and the clone id are the runner's."""
    assert m.client is not None
    clone = m.plan["clone"]
    identity = clone["identity"]
    t0 = time.monotonic()
    assert m.client.agent is not None  # adopt_identity runs right after the hello
    env: list[dict[str, str]] = []
    if "identity" in m.client.agent.capabilities:
        # The agent sets clock, hostname and files itself; only NICs need a process (`ip`).
        ident = P.Identity(identity["hostname"], clone["id"], time.time_ns(), list(identity["hosts"]))
        try:
            m.client.set_identity(ident)
        except RemoteError as e:
            raise SnapshotError(f"{m.name}: giving the clone its identity failed: {e}") from None
        script: str = identity["nics"]
    else:  # an older agent: one shell script does it all, the run-time values in its environment
        script = identity["script"]
        env = [{"key": "NTNG_EPOCH", "value": f"{time.time():.6f}"}, {"key": "NTNG_CLONE_ID", "value": clone["id"]}]
    res = m.client.execute(P.Exec(argv=["sh", "-euc", script], env=env), wait=60) if script else None
    m.log(f"hello {t0 - started:.2f}s after the restore began; identity set in {time.monotonic() - t0:.2f}s")
    if res is not None and res.status != 0:
        raise SnapshotError(f"{m.name}: giving the clone its identity failed (exit {res.status}): "
                            f"{res.stderr.decode(errors='replace').strip()}")
    m.restore_seconds = time.monotonic() - started
    m.events.emit("restore", m.name, m.restore_seconds, snapshot=clone["snapshot"], clone_id=clone["id"])
    m.log(f"clone {clone['id']} of {clone['origin']} ready {m.restore_seconds:.2f}s after the restore began")
