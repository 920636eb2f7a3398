"""What a run leaves for CI and for people, in a folder per run: junit.xml, events.jsonl, each
machine's console and journal, and progress lines while it waits."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from helpers import run_cli
from ntng import errors

pytestmark = pytest.mark.e2e

# A container (issue 17): reports are the runner's, no VM feature is under test.
SCRIPT = """\
#: nodes.machine = { backend = "nspawn"; };
machine.wait_for_unit("multi-user.target")
with subtest("commands pass"):
    machine.succeed("echo hi")
    machine.execute("exit 3")
with subtest("a wait that times out"):
    machine.wait_until_succeeds("test -e /tmp/never", timeout=20)
"""


def test_a_failing_run_leaves_junit_events_and_consoles(tmp_path: Path, guest_image: object) -> None:
    script = tmp_path / "reported.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    r = run_cli("run", str(script), "-o", str(out), "--junit-xml", str(tmp_path / "ci.xml"), cwd=tmp_path)
    assert r.returncode == errors.EXIT_TEST_FAILED, r.stderr[-3000:]
    # One folder per run under -o, named in the last line, and `latest` pointing at it.
    m = re.search(r"ntng: artifacts \(.*\): (\S+)$", r.stderr.strip().splitlines()[-1])
    assert m is not None, r.stderr[-1000:]
    run_dir = Path(m.group(1))
    assert run_dir.parent == out and (out / "latest").resolve() == run_dir.resolve()
    out = run_dir
    # Progress while waiting: what, on which machine, how long.
    assert re.search(r"machine: still waiting for `test -e /tmp/never` to succeed \(1\ds of 20s\)", r.stderr)

    assert (tmp_path / "ci.xml").read_text() == (out / "junit.xml").read_text()  # the NixOS driver's option
    suite = ET.parse(out / "junit.xml").getroot().find("testsuite")
    assert suite is not None and suite.get("name") == "reported"
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert list(cases) == ["commands pass", "a wait that times out", "script"]
    assert cases["commands pass"].find("failure") is None
    failure = cases["a wait that times out"].find("failure")
    assert failure is not None and "action timed out" in (failure.text or "")
    assert cases["script"].find("failure") is not None and suite.get("failures") == "2"

    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    actions = [(e["action"], e["result"]) for e in events]
    assert actions[0] == ("test", "started") and actions[-1] == ("test", "fail")
    boot = next(e for e in events if e["action"] == "boot")
    assert boot["machine"] == "machine" and boot["duration"] > 0 and boot["boot_id"]
    execs = {e["command"]: e for e in events if e["action"] == "exec"}
    assert execs["echo hi"]["result"] == "ok" and execs["exit 3"]["status"] == 3
    waits = [e for e in events if e["action"] == "wait"]
    assert waits[0]["what"] == "unit multi-user.target" and waits[0]["result"] == "ok"
    assert waits[-1]["result"] == "timeout" and 19 < waits[-1]["duration"] < 80
    assert [(e["name"], e["result"]) for e in events if e["action"] == "subtest"] == [
        ("commands pass", "ok"), ("a wait that times out", "fail")]

    console = (out / "machine" / "console.log").read_text(errors="replace")
    assert "ntng-agent: serving on" in console and "login:" in console
    journal = (out / "machine" / "journal.log").read_text(errors="replace")  # fetched at the end
    assert "Reached target" in journal and "multi-user.target" in journal
