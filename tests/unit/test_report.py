"""Reports without VMs: JUnit XML that CI systems parse, and a JSON event log that stays valid
when many threads write to it."""

from __future__ import annotations

import json
import os
import stat
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ntng import report
from ntng.report import Case, EventLog, junit_xml, new_run_dir


def test_junit_counts_failures_and_errors() -> None:
    xml = junit_xml("t", [Case("ok", 1.5), Case("bad", 0.25, failure="AssertionError: 1 != 2\nmore"),
                          Case("script", 3.0, error="BootError: no hello")], 4.75)
    suite = ET.fromstring(xml.split("?>", 1)[1]).find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors"), suite.get("time")) == ("3", "1", "1", "4.750")
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert cases["ok"].find("failure") is None and cases["ok"].get("time") == "1.500"
    failure = cases["bad"].find("failure")
    assert failure is not None and failure.get("message") == "AssertionError: 1 != 2"
    assert failure.text == "AssertionError: 1 != 2\nmore"
    assert cases["script"].find("error") is not None


@given(st.text(), st.text())
def test_junit_parses_whatever_the_test_printed(name: str, message: str) -> None:
    # ANSI escapes and other control characters are not XML: they are replaced, the rest kept.
    xml = junit_xml("suite", [Case(name, 0.0, failure=message)], 0.0)
    case = ET.fromstring(xml.split("?>", 1)[1]).find("testsuite/testcase")
    assert case is not None
    failure = case.find("failure")
    assert failure is not None
    allowed = [ch for ch in message if ch in "\t\n" or (" " <= ch and not 0xD800 <= ord(ch) <= 0xDFFF
                                                          and ch not in "\ufffe\uffff")]
    # \r is normalised to \n by XML parsers; compare without it
    assert (failure.text or "").replace("\ufffd", "") == "".join(allowed).replace("\ufffd", "") or "\r" in message


def test_event_log_lines_are_whole_json_under_threads(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl")

    def writer(i: int) -> None:
        for j in range(200):
            log.emit("exec", f"m{i}", 0.001, command="x" * (j * 37 % 3000), n=j)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    log.emit("after-close", None)  # ignored, not an error
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    assert len(events) == 1600
    assert {e["machine"] for e in events} == {f"m{i}" for i in range(8)}
    assert all(e["action"] == "exec" and e["result"] == "ok" and "t" in e for e in events)


def test_event_log_without_path_writes_nothing(tmp_path: Path) -> None:
    log = EventLog(None)
    log.emit("exec", "m")
    log.close()
    assert list(tmp_path.iterdir()) == []


def test_each_run_gets_its_own_folder_and_latest_points_at_the_newest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report.time, "strftime", lambda fmt, t: "20260101-120000")
    first = new_run_dir(tmp_path / "out", "my test/1")
    second = new_run_dir(tmp_path / "out", "my test/1")  # the same second: still a new folder
    assert first != second and first.parent == second.parent == tmp_path / "out"
    assert first.name.endswith("-my_test_1") and second.name == first.name + "-2"
    assert (tmp_path / "out" / "latest").resolve() == second.resolve()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([first.name, second.name, "latest"])


def test_run_folders_are_private(tmp_path: Path) -> None:
    # Other local users must not read consoles, journals or copied guest files (issue 14, item 7).
    old = os.umask(0o022)
    try:
        run = new_run_dir(tmp_path / "out", "t")
    finally:
        os.umask(old)
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o700  # made by us: private too
