"""How many tests run at once: at most `jobs` (default: the usable cores) and only while
their VMs fit in the memory budget (default: what the host has available at the start, less a
reserve).  A test's need is the sum of its VM nodes' `memory` plus QEMU's own overhead per VM,
and a fixed measured footprint per container node (a container has no memory of its own to
reserve: `memory` is not enforced for it, docs/containers.md).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

from ..plan import NodePlan

# QEMU itself per VM beyond the guest's memory: mostly TCG's translation cache; measured here
# up to 927 MiB RSS for a 512 MiB guest under TCG (less under KVM, but the budget is a ceiling).
VM_OVERHEAD_MIB = 450
# A container node (backend nspawn): measured here 2026-12-03, the Debian image's tree booted to
# multi-user.target and idle for 5 s: 69 MiB VmRSS summed over the container's 7 processes
# (systemd, journald, the agent, sshd, ...; 42 MiB PSS) plus 9 MiB for unshare and
# systemd-nspawn, 78 MiB in all.  Rounded up to leave ~50 MiB for what the test itself runs
# there: unlike a VM's, a container's processes have no guest memory bounding them.
CONTAINER_MIB = 128
RUNNER_MIB = 60  # the `ntng run` Python process of each test
RESERVE_FRACTION = 0.1  # left to the host and whatever else runs on it


@dataclasses.dataclass(frozen=True)
class Budget:
    jobs: int
    memory_mib: int


def test_memory_mib(plans: Iterable[NodePlan]) -> int:
    """What one test needs while it runs: its VMs' memory and overhead, its containers'
    measured footprint, and its runner."""
    return RUNNER_MIB + sum(node_memory_mib(p) for p in plans)


def node_memory_mib(plan: NodePlan) -> int:
    if plan.get("backend") == "nspawn":
        return CONTAINER_MIB
    return int(plan.get("memory", 1024)) + VM_OVERHEAD_MIB


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def available_memory_mib(meminfo: str | None = None) -> int:
    """MemAvailable (what can be used without swapping) less the reserve, from /proc/meminfo."""
    if meminfo is None:
        with open("/proc/meminfo") as f:
            meminfo = f.read()
    fields = {}
    for line in meminfo.splitlines():
        name, _, rest = line.partition(":")
        if rest.split():
            fields[name] = int(rest.split()[0])  # kB
    total = fields.get("MemTotal", 0)
    available = fields.get("MemAvailable", fields.get("MemFree", 0))
    return max(0, int((available - total * RESERVE_FRACTION) // 1024))


def default_budget(jobs: int | None = None, memory_mib: int | None = None) -> Budget:
    return Budget(jobs if jobs is not None else usable_cores(),
                  memory_mib if memory_mib is not None else available_memory_mib())


def longest_first(test_ids: list[str], last_durations: dict[str, float]) -> list[str]:
    """The order to start tests in: by their duration in the suite's last run, longest first
    (a long test started last would end the suite alone); tests without one (new) first of all,
    in id order."""
    return sorted(test_ids, key=lambda t: (-last_durations.get(t, float("inf")), t))


class Scheduler:
    """Which waiting tests may start now.  First fit in the given order: a test that does not
    fit leaves its turn to a later, smaller one.  A test needing more than the whole budget
    starts alone, when nothing else runs (it could never start otherwise)."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.running: dict[str, int] = {}  # test id → its memory

    @property
    def used_mib(self) -> int:
        return sum(self.running.values())

    def oversized(self, need_mib: int) -> bool:
        return need_mib > self.budget.memory_mib

    def startable(self, waiting: list[tuple[str, int]]) -> list[str]:
        """Of (id, memory) pairs in order, those to start now; they count as running."""
        started = []
        for test, need in waiting:
            if len(self.running) >= self.budget.jobs:
                break
            fits = self.used_mib + need <= self.budget.memory_mib
            if fits or (self.oversized(need) and not self.running):
                self.running[test] = need
                started.append(test)
        return started

    def finished(self, test: str) -> None:
        self.running.pop(test, None)
