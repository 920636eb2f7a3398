"""Failure-detection rules against console lines in the formats the kernel and systemd print."""

from __future__ import annotations

import pytest

from ntng.watch import DEFAULT_RULES, SHUTDOWN_MARKER, SHUTDOWN_QUIET, Detection, Rule, Watcher

BAD = {
    "kernel panic": "[   12.345678] Kernel panic - not syncing: sysrq triggered crash",
    "kernel oops": "[   99.000001] BUG: kernel NULL pointer dereference, address: 0000000000000000",
    "OOM kill": "[  101.1] Out of memory: Killed process 4242 (stress) total-vm:1234kB, anon-rss:999kB",
    "failed unit": "[FAILED] Failed to start ntng-broken.service - /usr/bin/false.",
    "agent crash": "ntng-backdoor.service: Main process exited, code=killed, status=9/KILL",
    "agent crash ": "ntng-backdoor.service: Main process exited, code=exited, status=1/FAILURE",
}
BENIGN = [
    "[  OK  ] Started ntng-backdoor.service - nixos-test-ng backdoor agent.",
    "[  OK  ] Reached target multi-user.target - Multi-User System.",
    "ntng-backdoor.service: Deactivated successfully.",
    "Stopping ntng-backdoor.service - nixos-test-ng backdoor agent...",
    "[    0.000000] Linux version 6.1.0-28-amd64 (debian-kernel@lists.debian.org)",
    "systemd[1]: Finished systemd-remount-fs.service - Remount Root and Kernel File Systems.",
    "oom_score_adj set to -1000",
    "Failed password for root from 192.168.1.1",  # not a unit
    "ntng-backdoor.service: Main process exited, code=killed, status=15/TERM",  # stopped by systemd
]


def run(lines: list[tuple[str, str]], watcher_rules: tuple[Rule, ...] = DEFAULT_RULES) -> list[Detection]:
    found: list[Detection] = []
    w = Watcher(found.append, watcher_rules)
    for machine, line in lines:
        w.feed(machine, line)
    return found


@pytest.mark.parametrize("rule", sorted(BAD))
def test_default_rules_catch_what_they_name(rule: str) -> None:
    found = run([("m", f"line {i}") for i in range(10)] + [("m", BAD[rule])])
    assert [d.rule.name for d in found] == [rule.strip()]
    d = found[0]
    assert d.machine == "m" and d.line == BAD[rule]
    assert d.context == tuple(f"line {i}" for i in range(2, 10))  # the 8 lines before it
    assert rule.strip() in d.describe() and f"m # {BAD[rule]}" in d.describe()


def test_default_rules_ignore_a_normal_boot() -> None:
    assert run([("m", line) for line in BENIGN]) == []


def test_user_rules_and_removal_per_machine() -> None:
    found: list[Detection] = []
    w = Watcher(found.append)
    w.add(Rule.make("db down", r"database .* shut down", severity="warn", machine="db"))
    w.feed("web", "database x shut down")  # another machine: not this rule's business
    w.feed("db", "database x shut down")
    assert [(d.rule.name, d.rule.severity, d.machine) for d in found] == [("db down", "warn", "db")]
    found.clear()
    w.remove("failed unit", machine="a")
    w.remove("failed unit", machine="b")
    for m in ("a", "b", "c"):
        w.feed(m, BAD["failed unit"])
    assert [d.machine for d in found] == ["c"]
    w.remove("failed unit")
    w.feed("c", BAD["failed unit"])
    assert [d.machine for d in found] == ["c"]
    with pytest.raises(ValueError, match=r"no watch rule called 'nope' \(rules: "):
        w.remove("nope")


def test_bad_rules_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match=r"rule 'x': severity must be one of fail, warn, got 'fatal'"):
        Rule.make("x", "a", severity="fatal")
    with pytest.raises(ValueError, match=r"rule 'y': bad regular expression '\(': "):
        Rule.make("y", "(")


# Seen on a real reboot under TCG: systemd kills a unit that was still starting.
SHUTDOWN = [
    "[   39.110691] systemd[1]: Reached target umount.target - Unmount All Filesystems.",
    "[   39.354678] systemd[1]: systemd-tmpfiles-setup-dev.service: Failed with result 'signal'.",
]


@pytest.mark.parametrize("marker", [
    "systemd-logind[212]: System is rebooting.", "systemd[1]: Received SIGINT.",
    "[   39.110691] systemd[1]: Reached target umount.target - Unmount All Filesystems.",
    "systemd[1]: Stopped target multi-user.target - Multi-User System.", "reboot: Restarting system",
])
def test_shutdown_markers(marker: str) -> None:
    assert SHUTDOWN_MARKER.search(marker)


def test_a_shutdown_quiets_failed_units_but_not_panics() -> None:
    seen: list[str] = []
    w = Watcher(lambda d: seen.append(d.rule.name))
    for line in SHUTDOWN:
        w.feed("m", line, SHUTDOWN_QUIET)
    assert seen == []
    w.feed("m", "Kernel panic - not syncing: Attempted to kill init!", SHUTDOWN_QUIET)
    assert seen == ["kernel panic"]
    w.feed("m", SHUTDOWN[1])  # not shutting down: the same line is a failure
    assert seen == ["kernel panic", "failed unit"]
    assert not any(SHUTDOWN_MARKER.search(line) for line in (
        "systemd[1]: Started ssh.service - OpenBSD Secure Shell server.",
        "systemd[1]: Reached target multi-user.target - Multi-User System.",
    ))
