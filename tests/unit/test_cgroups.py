"""Each container gets cgroups of its own (python/ntng/cgroups.py): made under the runner's,
entered by a child before exec, removed with what was made inside them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ntng import cgroups

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not cgroups.hierarchies(),
                                reason="making cgroups needs root and a cgroup hierarchy")


@needs_root
def test_a_child_enters_its_own_cgroups_and_they_go_with_their_subtree() -> None:
    made = cgroups.make("unit")
    assert made and all(p.is_dir() for p in made)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                             preexec_fn=lambda: cgroups.enter(made))
    try:
        listed = [(p / "cgroup.procs").read_text().split() for p in made]
        assert all(str(child.pid) in pids for pids in listed)
        (made[0] / "system.slice" / "x.service").mkdir(parents=True)  # as a container's systemd does
    finally:
        child.kill()
        child.wait()
    cgroups.remove(made)
    assert not any(p.exists() for p in made)


@needs_root
def test_two_containers_never_share_a_cgroup() -> None:
    a, b = cgroups.make("same"), cgroups.make("same")
    try:
        assert not set(a) & set(b)
    finally:
        cgroups.remove(a + b)


@needs_root
def test_a_killed_runners_empty_cgroups_are_removed_by_the_next_start() -> None:
    left = cgroups.make("killed")
    fresh = cgroups.make("fresh")  # a concurrent runner's, not yet entered: must stay
    try:
        old = os.stat(left[0]).st_mtime - cgroups.STALE_AFTER_S - 1
        for p in left:
            os.utime(p, (old, old))
        made = cgroups.make("next")
        assert not any(p.exists() for p in left)
        assert all(p.exists() for p in fresh)
        cgroups.remove(made)
    finally:
        cgroups.remove(left + fresh)
