"""`ntng test` end to end, cheaply: node-less scripts (no VM: pass, fail, load errors, sleepers
for Ctrl-C, --fail-fast and --resume) and one script with one small VM, stopped by Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from helpers import ROOT
from ntng import errors
from ntng.suite import budget
from ntng.suite.run import EXIT_INTERRUPTED

PASS = '#: nodes = { };\nwith subtest("adds"):\n    assert 1 + 1 == 2\nprint("all good")\n'
FAIL = '#: nodes = { };\nprint("about to fail")\nassert 1 == 2, "one is not two"\n'
# Sleeps as long as $SUITE_SLEEP says: long while a test interrupts the suite, zero on --resume.
SLEEP = '#: nodes = { };\nimport os, time\ntime.sleep(float(os.environ.get("SUITE_SLEEP", "0")))\n'


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def ntng_test(cwd: Path, *args: str, sleep: float = 0, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SUITE_SLEEP": str(sleep)}
    return subprocess.run([sys.executable, "-m", "ntng.cli", "test", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def start_suite(cwd: Path, *args: str, sleep: float) -> subprocess.Popen[str]:
    env = {**os.environ, "SUITE_SLEEP": str(sleep)}
    return subprocess.Popen([sys.executable, "-m", "ntng.cli", "test", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env)


def states(out: Path) -> dict[str, str]:
    data = json.loads((out / "suite-state.json").read_text())
    return {k: v["status"] for k, v in data["results"].items()}


def wait_for_line(proc: subprocess.Popen[str], needle: str, seen: list[str], timeout: float = 60) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            return
        assert time.monotonic() < deadline, "".join(seen)
    raise AssertionError(f"{needle!r} never came:\n" + "".join(seen))


def test_pass_fail_and_load_errors_are_each_tests_own(tmp_path: Path) -> None:
    write(tmp_path, {"suite/pass.py": PASS, "suite/fail.py": FAIL,
                     "suite/syntax.py": "#: nodes = { };\ndef (\n",
                     "suite/badnode.py": '#: nodes.a = { memory = "lots"; };\nstart_all()\n',
                     "suite/helper.py": "x = 1\n"})
    r = ntng_test(tmp_path, "suite", "-o", "out")
    assert r.returncode == errors.EXIT_TEST_FAILED, r.stdout + r.stderr
    out = r.stdout
    assert "[suite/pass.py] all good" in out and "[suite/fail.py] about to fail" in out
    assert "[suite/pass.py] PASSED" in out and "[suite/fail.py] FAILED" in out
    assert ("[suite/badnode.py] ERROR: does not load: suite/badnode.py:1: node declaration rejected: "
            "node 'a': memory must be an integer number of MiB") in out
    assert "[suite/syntax.py] ERROR: does not load: suite/syntax.py:2: syntax error" in out
    assert "2 error" in out and "1 failed" in out and "1 passed" in out and "helper" not in out
    junit = ET.parse(tmp_path / "out" / "junit.xml").getroot()
    suites = {ts.get("name"): ts for ts in junit.iter("testsuite")}
    assert sorted(suites) == ["suite/badnode.py", "suite/fail.py", "suite/pass.py", "suite/syntax.py"]
    assert [tc.get("name") for tc in suites["suite/pass.py"]] == ["adds", "script"]
    assert suites["suite/fail.py"].find("testcase/failure") is not None
    assert suites["suite/syntax.py"].find("testcase/error") is not None
    events = [json.loads(line) for line in (tmp_path / "out" / "suite.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "suite" and events[0]["result"] == "started"
    assert events[-1]["result"] == "failed" and events[-1]["exit_code"] == 1
    assert {e["test"]: e["result"] for e in events if e["event"] == "test" and e["result"] != "started"} == {
        "suite/pass.py": "passed", "suite/fail.py": "failed", "suite/syntax.py": "error",
        "suite/badnode.py": "error"}
    own = tmp_path / "out" / "tests" / "suite__pass"
    assert (own / "output.log").read_text().count("all good") == 1
    assert (own / "latest" / "events.jsonl").exists()


def test_usage_errors(tmp_path: Path) -> None:
    write(tmp_path, {"a.py": PASS, "b.py": PASS})
    r = ntng_test(tmp_path, "a.py", "b.py", "--shard", "3/2")
    assert r.returncode == errors.EXIT_USAGE and "--shard 3/2: index 3 is out of range" in r.stderr
    r = ntng_test(tmp_path, "a.py", "b.py", "--shard", "1/2", "-o", "out")
    assert r.returncode == 0 and "shard 1/2: 1 test(s)" in r.stdout and "[a.py] PASSED" in r.stdout
    r = ntng_test(tmp_path, "a.py", "b.py", "-o", "out", "--resume")  # shard 1/2 ran a.py only
    assert r.returncode == errors.EXIT_USAGE and "from another suite" in r.stderr and "lacks 1: b.py" in r.stderr
    r = ntng_test(tmp_path, "nothing-here")
    assert r.returncode == errors.EXIT_USAGE and "nothing-here: no such file or directory" in r.stderr
    r = ntng_test(tmp_path, "a.py", "-j", "0")
    assert r.returncode == errors.EXIT_USAGE and "-j 0" in r.stderr


def test_ctrl_c_stops_the_tests_and_resume_runs_only_the_unfinished(tmp_path: Path) -> None:
    write(tmp_path, {"a.py": PASS, "s1.py": SLEEP, "s2.py": SLEEP, "s3.py": SLEEP})
    proc = start_suite(tmp_path, ".", "-o", "out", "-j", "2", sleep=120)
    seen: list[str] = []
    wait_for_line(proc, "[s1.py] started", seen)  # a.py passes first, then s1 and s2 run
    wait_for_line(proc, "[s2.py] started", seen)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    out = "".join(seen) + rest
    assert proc.returncode == EXIT_INTERRUPTED, out
    assert "[s1.py] ntng: interrupted; cleaning up" in out and "[s1.py] INTERRUPTED" in out
    assert states(tmp_path / "out") == {"a.py": "passed", "s1.py": "interrupted", "s2.py": "interrupted"}
    assert "NOT RUN     s3.py" in out
    r = ntng_test(tmp_path, ".", "-o", "out", "--resume", sleep=0)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming: 1 of 4 test(s) already have a result" in r.stdout
    assert "[a.py] started" not in r.stdout and "[s3.py] PASSED" in r.stdout
    assert set(states(tmp_path / "out").values()) == {"passed"}
    junit = ET.parse(tmp_path / "out" / "junit.xml").getroot()
    assert (junit.get("tests"), junit.get("failures"), junit.get("errors"), junit.get("skipped")) == ("5", "0", "0", "0")


def test_fail_fast_stops_the_others(tmp_path: Path) -> None:
    write(tmp_path, {"a_fail.py": FAIL, "b_sleep.py": SLEEP, "c_sleep.py": SLEEP})
    r = ntng_test(tmp_path, ".", "-o", "out", "-j", "2", "--fail-fast", sleep=120)
    assert r.returncode == errors.EXIT_TEST_FAILED, r.stdout
    assert "--fail-fast: a_fail.py failed; stopping the others" in r.stdout
    assert states(tmp_path / "out") == {"a_fail.py": "failed", "b_sleep.py": "interrupted"}


def test_fail_fast_starts_nothing_when_a_test_does_not_load(tmp_path: Path) -> None:
    write(tmp_path, {"a.py": PASS, "b.py": "#: nodes = { };\ndef (\n"})
    r = ntng_test(tmp_path, ".", "-o", "out", "-x")
    assert r.returncode == errors.EXIT_TEST_FAILED, r.stdout
    assert "a test does not load; starting none" in r.stdout and "[a.py] started" not in r.stdout
    assert states(tmp_path / "out") == {"b.py": "error"}


def test_one_small_vm_stopped_by_ctrl_c_leaves_no_vm(tmp_path: Path, guest_image: object) -> None:
    """The one VM this file boots: Ctrl-C while it runs; its QEMU must be gone when the suite exits."""
    proc = start_suite(ROOT, str(ROOT / "examples" / "suite" / "kernel.py"), "-o", str(tmp_path / "out"),
                       "--accel", os.environ.get("NTNG_ACCEL", "auto"), sleep=0)
    seen: list[str] = []
    wait_for_line(proc, "machine: QEMU running (pid ", seen, timeout=600)
    qemu = int(seen[-1].split("(pid ")[1].split(")")[0])
    need = budget.test_memory_mib([{"memory": 512}])
    assert f"[examples/suite/kernel.py] started ({need} MiB" in "".join(seen)
    os.kill(qemu, 0)  # it runs
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, "".join(seen) + rest
    assert "[examples/suite/kernel.py] machine: kill machine" in rest
    for _ in range(50):  # a moment for init to reap it, if the runner did not
        try:
            os.kill(qemu, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"QEMU {qemu} still runs after the suite exited")
    assert states(tmp_path / "out") == {"examples/suite/kernel.py": "interrupted"}
    assert (tmp_path / "out" / "tests" / "examples__suite__kernel" / "latest" / "events.jsonl").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_sigterm_is_an_interrupt_too(tmp_path: Path, sig: signal.Signals) -> None:
    write(tmp_path, {"s.py": SLEEP})
    proc = start_suite(tmp_path, ".", "-o", "out", sleep=120)
    seen: list[str] = []
    wait_for_line(proc, "[s.py] started", seen)
    time.sleep(1.0)
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED
    assert states(tmp_path / "out") == {"s.py": "interrupted"}
