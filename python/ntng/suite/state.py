"""The suite's state file (OUT/suite-state.json): every test's result as soon as it is known,
written atomically, so a suite stopped by Ctrl-C, a kill or a crashed host can go on with
`--resume`, running only the tests without a result.  The file names its test set; resuming a
different one (other paths, another shard) is refused rather than mixing two suites' results.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from ..errors import UsageError

FILE_NAME = "suite-state.json"
VERSION = 1
FINAL = ("passed", "failed", "error", "timeout")  # a result; anything else runs again on --resume


@dataclasses.dataclass
class Result:
    id: str
    status: str  # passed | failed | error | timeout | interrupted | not run
    exit_code: int | None = None
    duration: float = 0.0
    message: str = ""  # the runner's last words, or why the test did not load
    artifacts: str | None = None  # the test's folder under OUT/tests
    memory_mib: int = 0

    @property
    def final(self) -> bool:
        return self.status in FINAL


class SuiteState:
    def __init__(self, path: Path, test_ids: list[str], results: dict[str, Result] | None = None) -> None:
        self.path = path
        self.test_ids = sorted(test_ids)
        self.results: dict[str, Result] = results or {}

    def record(self, result: Result) -> None:
        self.results[result.id] = result
        self.save()

    def unfinished(self) -> list[str]:
        return [t for t in self.test_ids if not (t in self.results and self.results[t].final)]

    def save(self) -> None:
        data: dict[str, Any] = {"version": VERSION, "tests": self.test_ids,
                                "results": {k: dataclasses.asdict(v) for k, v in sorted(self.results.items())}}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(self.path)  # atomic: a kill never leaves half a file

    @staticmethod
    def last_durations(path: Path) -> dict[str, float]:
        """How long each test took in the state file's suite (any suite): for the start order."""
        try:
            results = json.loads(path.read_text())["results"]
            return {k: float(v["duration"]) for k, v in results.items() if v.get("status") in FINAL}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    @classmethod
    def resume(cls, path: Path, test_ids: list[str]) -> SuiteState:
        """The saved state of this very test set, or a UsageError saying why not."""
        try:
            data = json.loads(path.read_text())
            saved = list(data["tests"])
            results = {k: Result(**v) for k, v in data["results"].items()}
            if data.get("version") != VERSION:
                raise ValueError(f"version {data.get('version')!r}, this ntng writes {VERSION}")
        except FileNotFoundError:
            raise UsageError(f"--resume: no suite state in {path.parent} (is this the suite's -o directory?)") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"--resume: {path} is not a suite state file: {e}") from None
        ours = set(test_ids)
        if set(saved) != ours:
            extra, missing = sorted(set(saved) - ours), sorted(ours - set(saved))
            raise UsageError(
                f"--resume: {path} is from another suite (different tests): "
                + "; ".join(part for part in (
                    f"it has {len(extra)} not in this one: {', '.join(extra[:5])}{' …' if len(extra) > 5 else ''}" if extra else "",
                    f"it lacks {len(missing)}: {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}" if missing else "",
                ) if part)
                + ". Run with the same paths and --shard, or without --resume to start afresh.")
        return cls(path, saved, results)
