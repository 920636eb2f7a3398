"""The suite's reports: one JUnit XML file (a <testsuite> per test script, holding that test's
own cases from its `ntng run` report, or one case saying why there is none) and one JSON log
(OUT/suite.jsonl: a JSON object a line as things happen, appended to by --resume)."""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, TextIO

from ..report import _xml_text
from .state import Result


class SuiteLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.t0 = time.monotonic()
        self._file: TextIO = open(path, "a", buffering=1)  # noqa: SIM115 - closed in close()

    def emit(self, event: str, **detail: Any) -> None:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "t": round(time.monotonic() - self.t0, 3), "event": event, **detail}
        self._file.write(json.dumps(record, default=str) + "\n")

    def close(self) -> None:
        self._file.close()


def _own_suites(result: Result) -> list[ET.Element]:
    """The <testsuite> elements of the test's own JUnit file (ntng run --junit-xml)."""
    if result.artifacts is None:
        return []
    path = Path(result.artifacts) / "junit.xml"
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return []
    return [root] if root.tag == "testsuite" else list(root.iter("testsuite"))


def _synthetic(result: Result) -> ET.Element:
    """One case for a test without a report of its own (did not load, interrupted, not run)."""
    ts = ET.Element("testsuite", name=_xml_text(result.id), tests="1", failures="0", errors="0",
                    skipped="0", time=f"{result.duration:.3f}")
    tc = ET.SubElement(ts, "testcase", classname=_xml_text(result.id), name=_xml_text(result.id),
                       time=f"{result.duration:.3f}")
    text = _xml_text(result.message or result.status)
    first = text.splitlines()[0][:500] if text.strip() else result.status
    if result.status in ("failed", "timeout"):
        ET.SubElement(tc, "failure", message=first).text = text
        ts.set("failures", "1")
    elif result.status == "error":
        ET.SubElement(tc, "error", message=first).text = text
        ts.set("errors", "1")
    elif result.status != "passed":
        ET.SubElement(tc, "skipped", message=first)
        ts.set("skipped", "1")
    return ts


def junit_xml(name: str, results: list[Result], duration: float) -> str:
    root = ET.Element("testsuites", name=_xml_text(name), time=f"{duration:.3f}")
    for r in results:
        own = _own_suites(r) if r.status != "not run" else []
        for ts in own or [_synthetic(r)]:
            ts.set("name", _xml_text(r.id))  # the script's path: unique in the suite
            for tc in ts.iter("testcase"):
                tc.set("classname", _xml_text(r.id))
            root.append(ts)
    counts = {k: sum(int(ts.get(k, "0")) for ts in root) for k in ("tests", "failures", "errors", "skipped")}
    for k, v in counts.items():
        root.set(k, str(v))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
