"""Streaming failure detection: rules matched against every console line as it arrives.

The console carries the kernel log and (the Debian image forwards it there) the journal, so a
kernel panic, an oops, an OOM kill, a failed unit or a crashed backdoor agent is seen the
moment it is printed, not when a later command happens to time out.  A "fail" rule fails the
test at once with the matching lines; a "warn" rule only reports them.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import threading
from collections.abc import Callable

SEVERITIES = ("fail", "warn")
CONTEXT_LINES = 8  # console lines before the match that go into the report


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    pattern: re.Pattern[str]
    severity: str = "fail"
    machine: str | None = None  # None: every machine

    @classmethod
    def make(cls, name: str, regex: str, severity: str = "fail", machine: str | None = None) -> Rule:
        if severity not in SEVERITIES:
            raise ValueError(f"rule {name!r}: severity must be one of {', '.join(SEVERITIES)}, got {severity!r}")
        try:
            pattern = re.compile(regex)
        except re.error as e:
            raise ValueError(f"rule {name!r}: bad regular expression {regex!r}: {e}") from None
        return cls(name, pattern, severity, machine)


DEFAULT_RULES = (
    Rule.make("kernel panic", r"Kernel panic - not syncing"),
    Rule.make("kernel oops", r"\bOops: \d|BUG: (unable to handle|kernel NULL pointer|scheduling while atomic)"
                             r"|general protection fault"),
    Rule.make("OOM kill", r"Out of memory: Killed process|invoked oom-killer"),
    # Before "failed unit": the agent's own unit failing is reported as what it is.  SIGTERM
    # is how systemd stops it (restart, shutdown): not a crash.
    Rule.make("agent crash", r"ntng-backdoor\.service: (Main process exited, code=(killed|dumped), status=(?!15/)"
                             r"|Main process exited, code=exited, status=[1-9]|Failed with result)"),
    Rule.make("failed unit", r"\[FAILED\] Failed to start|\S+\.(service|socket|mount): Failed with result"),
)

# While a guest shuts down (for a reboot too) systemd kills what is still starting, and those
# units "fail" with result 'signal': not a failure of the test.  These console lines mark the
# start of a shutdown; the machine is quiet for SHUTDOWN_QUIET until its next boot says hello.
SHUTDOWN_MARKER = re.compile(
    r"System is (rebooting|powering down|halting)|Received SIGINT|"
    r"Reached target \S*(shutdown|reboot|poweroff|halt|umount|final)\.target|"
    r"Stopped target (?!initrd)\S+\.target|reboot: Restarting system|reboot: Power down"
)
SHUTDOWN_QUIET = frozenset({"failed unit"})


@dataclasses.dataclass(frozen=True)
class Detection:
    rule: Rule
    machine: str
    line: str
    context: tuple[str, ...]

    def describe(self) -> str:
        lines = "\n".join(f"  {self.machine} # {x}" for x in (*self.context, self.line))
        return f"{self.machine}: {self.rule.name} on the console (rule /{self.rule.pattern.pattern}/):\n{lines}"


class Watcher:
    """Feeds console lines through the rules; calls on_detection for each match."""

    def __init__(self, on_detection: Callable[[Detection], None],
                 rules: tuple[Rule, ...] = DEFAULT_RULES) -> None:
        self.rules: list[Rule] = list(rules)
        self.on_detection = on_detection
        self._recent: dict[str, collections.deque[str]] = {}
        self._lock = threading.Lock()

    def add(self, rule: Rule) -> None:
        with self._lock:
            self.rules.append(rule)

    def remove(self, name: str, machine: str | None = None) -> None:
        """Drop rules called `name` (for one machine: it keeps watching the others)."""
        with self._lock:
            known = {r.name for r in self.rules}
            if name not in known:
                raise ValueError(f"no watch rule called {name!r} (rules: {', '.join(sorted(known))})")
            kept: list[Rule] = []
            for r in self.rules:
                if r.name != name:
                    kept.append(r)
                elif machine is None or r.machine == machine:
                    continue  # dropped
                elif r.machine is None:
                    kept.append(dataclasses.replace(r, machine=f"!{machine}"))  # all but this one
                elif r.machine.startswith("!"):
                    kept.append(dataclasses.replace(r, machine=f"{r.machine},{machine}"))
                else:
                    kept.append(r)
            self.rules = kept

    def feed(self, machine: str, line: str, quiet: frozenset[str] = frozenset()) -> None:
        """Match one console line; rules named in `quiet` are skipped for it."""
        with self._lock:
            recent = self._recent.setdefault(machine, collections.deque(maxlen=CONTEXT_LINES))
            context = tuple(recent)
            recent.append(line)
            rules = list(self.rules)
        for r in rules:
            if r.name in quiet or not _applies(r, machine):
                continue
            if r.pattern.search(line):
                self.on_detection(Detection(r, machine, line, context))
                return  # one report per line


def _applies(rule: Rule, machine: str) -> bool:
    if rule.machine is None:
        return True
    if rule.machine.startswith("!"):
        return machine not in rule.machine[1:].split(",")
    return rule.machine == machine
