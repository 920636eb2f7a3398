"""Run reports: a JSON event log (one event a line) and JUnit XML for CI systems, in a folder
of their own per run (with the consoles, journals, screenshots and copied files).

The event log is written as the test runs, so a killed run still leaves what happened up to
that point; JUnit XML is written once at the end (one test case per subtest, plus one for the
script as a whole).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, TextIO


def new_run_dir(base: Path, name: str) -> Path:
    """A fresh artifact folder for one run: base/<UTC time>-<test name>, and base/latest
    pointing at it, so runs never overwrite each other and the newest is easy to find."""
    stem = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + (re.sub(r"[^\w.-]", "_", name) or "test")
    base.mkdir(parents=True, exist_ok=True, mode=0o700)  # a folder we make is private (an existing one stays)
    for n in range(1, 1000):
        run = base / (stem if n == 1 else f"{stem}-{n}")
        try:
            run.mkdir(mode=0o700)  # consoles, journals and guest files: for the runner's user only
            break
        except FileExistsError:
            continue  # two runs in the same second
    else:
        raise FileExistsError(f"{base}: too many runs named {stem}")
    latest = base / "latest"
    try:
        tmp = base / f".latest.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(run.name)
        tmp.replace(latest)  # atomic: a parallel run never sees it missing
    except OSError:
        pass  # a convenience only (e.g. a file system without symlinks)
    return run


# One encoder for every event: json.dumps with an argument (default=) builds a new one per call.
_ENCODER = json.JSONEncoder(default=str)


class EventLog:
    """Thread-safe JSON lines: {"t": seconds since start, "machine", "action", "duration",
    "result", …}.  Without a path it only keeps nothing (tests and the REPL)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.t0 = time.monotonic()
        self._lock = threading.Lock()
        self._file: TextIO | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "w", buffering=1)  # noqa: SIM115 - closed in close()

    def emit(self, action: str, machine: str | None = None, duration: float | None = None,
             result: str = "ok", **detail: Any) -> None:
        if self._file is None:
            return
        event: dict[str, Any] = {"t": round(time.monotonic() - self.t0, 3), "machine": machine,
                                 "action": action, "result": result}
        if duration is not None:
            event["duration"] = round(duration, 3)
        event.update(detail)
        line = _ENCODER.encode(event)
        with self._lock:
            if self._file is not None:
                self._file.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


@dataclasses.dataclass
class Case:
    name: str
    duration: float
    failure: str | None = None  # a failed assertion or command
    error: str | None = None  # a broken setup, a script error, a timeout


# Characters XML 1.0 cannot hold (command output is full of ANSI escapes): replaced, so CI
# parsers accept the file.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_text(text: str) -> str:
    return _NOT_XML.sub("\ufffd", text)


def junit_xml(suite: str, cases: list[Case], duration: float) -> str:
    root = ET.Element("testsuites")
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(cases)),
                       failures=str(sum(c.failure is not None for c in cases)),
                       errors=str(sum(c.error is not None for c in cases)),
                       time=f"{duration:.3f}")
    ts.set("name", _xml_text(suite))
    for c in cases:
        tc = ET.SubElement(ts, "testcase", classname=_xml_text(suite), name=_xml_text(c.name),
                           time=f"{c.duration:.3f}")
        for tag, text in (("failure", c.failure), ("error", c.error)):
            if text is not None:
                clean = _xml_text(text)
                first = clean.splitlines()[0][:500] if clean.strip() else ""
                ET.SubElement(tc, tag, message=first).text = clean
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
