"""The suite runner's parts without processes: discovery, shards, the memory/cores budget,
the resume state, the suite's JUnit XML and JSON log."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from ntng import nixeval
from ntng.errors import UsageError
from ntng.suite import budget, discover, output, shard
from ntng.suite.state import Result, SuiteState

NODELESS = "#: nodes = { };\nassert True\n"


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


# -- discovery ----------------------------------------------------------------------------------

def test_discovery_rule(tmp_path: Path) -> None:
    tree(tmp_path, {
        "a.py": NODELESS,
        "sub/b.py": "#: nodes.x = { memory = 512; };\nx.start()\n",
        "sub/deeper/c.py": "  #: nodes = { };\n",
        "helper.py": "def f(): pass\n",  # no header: a module, not a test
        "test_plugin.py": "#: nodes.web = { };\ndef test_x(ntng): pass\n",  # pytest's
        "conftest.py": "#: nodes = { };\n",
        "x_test.py": "#: nodes = { };\n",
        "notes.txt": "#: nodes = { };\n",
        ".hidden/d.py": NODELESS,
        "__pycache__/e.py": NODELESS,
    })
    found = discover.discover([tmp_path], cwd=tmp_path)
    assert [t.id for t in found] == ["a.py", "sub/b.py", "sub/deeper/c.py"]


def test_named_files_are_tests_whatever_their_name_and_each_counts_once(tmp_path: Path) -> None:
    tree(tmp_path, {"helper.py": "machine.start()\n", "test_x.py": NODELESS, "d/a.py": NODELESS})
    found = discover.discover([tmp_path / "test_x.py", tmp_path / "d", tmp_path / "helper.py",
                               tmp_path / "d" / "a.py", tmp_path / "d" / ".." / "d" / "a.py"], cwd=tmp_path)
    assert [t.id for t in found] == ["d/a.py", "helper.py", "test_x.py"]


def test_ids_are_relative_to_the_working_directory_and_slugs_are_folder_names(tmp_path: Path) -> None:
    tree(tmp_path, {"suite/x y.py": NODELESS})
    inside = discover.discover([tmp_path / "suite"], cwd=tmp_path)[0]
    assert (inside.id, inside.slug) == ("suite/x y.py", "suite__x_y")
    outside = discover.discover([tmp_path / "suite"], cwd=tmp_path / "suite" / "..")[0]
    assert outside.id == "suite/x y.py"
    elsewhere = discover.discover([tmp_path / "suite"], cwd=Path("/proc"))[0]
    assert elsewhere.id == str((tmp_path / "suite" / "x y.py").resolve())
    assert "/" not in elsewhere.slug and not elsewhere.slug.startswith((".", "_"))


def test_missing_path_and_empty_directory_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="nope: no such file or directory"):
        discover.discover([tmp_path / "nope"])
    tree(tmp_path, {"lib.py": "x = 1\n"})
    with pytest.raises(UsageError, match="no tests found under .*a test is a \\*.py file with a `#:` header"):
        discover.discover([tmp_path])


# -- shards -------------------------------------------------------------------------------------

def _files(*ids: str) -> list[discover.TestFile]:
    return [discover.TestFile(i, Path(i)) for i in ids]


def test_shards_cover_every_test_once_evenly_whatever_the_order() -> None:
    ids = [f"t{i:02}.py" for i in range(11)]
    shards = [[t.id for t in shard.select(_files(*ids), i, 3)] for i in (1, 2, 3)]
    assert sorted(sum(shards, [])) == ids
    assert sorted(len(s) for s in shards) == [3, 4, 4]
    reordered = [[t.id for t in shard.select(_files(*reversed(ids)), i, 3)] for i in (1, 2, 3)]
    assert reordered == shards
    assert [t.id for t in shard.select(_files("a.py"), 2, 2)] == []  # more shards than tests


@pytest.mark.parametrize(("text", "message"), [
    ("3/2", "index 3 is out of range, it must be from 1 to 2"),
    ("0/2", "index 0 is out of range"),
    ("1/0", "N must be at least 1"),
    ("1-2", "expected I/N"),
    ("a/b", "expected I/N"),
])
def test_bad_shards(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        shard.parse(text)


def test_shard_parse() -> None:
    assert shard.parse("2/4") == (2, 4) and shard.parse(" 1 / 1 ") == (1, 1)


# -- budget -------------------------------------------------------------------------------------

def test_memory_of_a_test() -> None:
    assert budget.test_memory_mib([]) == budget.RUNNER_MIB
    assert budget.test_memory_mib([{"memory": 512}, {"memory": 1024}]) == (
        budget.RUNNER_MIB + 512 + 1024 + 2 * budget.VM_OVERHEAD_MIB)


def test_a_container_is_budgeted_by_its_measured_rss_not_its_memory() -> None:
    # A real nspawn plan from nixlib: `memory` is not enforced for a container (no VM), so it
    # does not count; the container's measured footprint does.
    container = nixeval.call("nspawn.launch", {"name": "c", "kernel": "/k", "image": "/i/root.ext4",
                                               "stateDir": "/s/c", "memory": 4096})
    assert container["backend"] == "nspawn" and container["memory"] == 4096
    assert budget.test_memory_mib([container]) == budget.RUNNER_MIB + budget.CONTAINER_MIB
    assert budget.test_memory_mib([container, {"memory": 512}]) == (
        budget.RUNNER_MIB + budget.CONTAINER_MIB + 512 + budget.VM_OVERHEAD_MIB)
    assert budget.CONTAINER_MIB < 512  # what makes containers worth it here


def test_available_memory_leaves_a_reserve() -> None:
    meminfo = "MemTotal:       10240000 kB\nMemFree:         1000 kB\nMemAvailable:    8192000 kB\n"
    assert budget.available_memory_mib(meminfo) == (8192000 - 1024000) // 1024
    assert budget.available_memory_mib("MemTotal: 100 kB\nMemAvailable: 1 kB\n") == 0
    assert budget.default_budget(3, 1000) == budget.Budget(3, 1000)
    assert budget.default_budget().jobs >= 1


def test_scheduler_respects_jobs_and_memory_and_backfills() -> None:
    s = budget.Scheduler(budget.Budget(jobs=3, memory_mib=2000))
    assert s.startable([("a", 1200), ("b", 1000), ("c", 500), ("d", 300)]) == ["a", "c", "d"]
    assert s.used_mib == 2000
    assert s.startable([("b", 1000)]) == []  # no memory left
    s.finished("a")
    assert s.startable([("b", 1000), ("e", 100)]) == ["b"]  # 3 jobs: e waits
    s.finished("c"), s.finished("d")
    assert s.startable([("e", 100)]) == ["e"]


def test_a_test_bigger_than_the_budget_runs_alone() -> None:
    s = budget.Scheduler(budget.Budget(jobs=4, memory_mib=1000))
    assert s.startable([("small", 100)]) == ["small"]
    assert s.startable([("huge", 5000)]) == []  # not while anything else runs
    s.finished("small")
    assert s.startable([("huge", 5000), ("small2", 100)]) == ["huge"]  # and nothing beside it
    assert s.oversized(5000) and not s.oversized(1000)


def test_longest_first_with_new_tests_before_all() -> None:
    last = {"a.py": 10.0, "b.py": 100.0, "c.py": 50.0, "gone.py": 1.0}
    assert budget.longest_first(["c.py", "a.py", "new2.py", "b.py", "new1.py"], last) == [
        "new1.py", "new2.py", "b.py", "c.py", "a.py"]


# -- resume state -------------------------------------------------------------------------------

def test_state_records_results_and_resumes_only_unfinished(tmp_path: Path) -> None:
    path = tmp_path / "suite-state.json"
    st = SuiteState(path, ["b.py", "a.py", "c.py", "d.py"])
    st.save()
    st.record(Result("a.py", "passed", 0, 1.5))
    st.record(Result("b.py", "failed", 1, 2.0, "boom", "/out/b"))
    st.record(Result("c.py", "interrupted", 130))
    again = SuiteState.resume(path, ["d.py", "c.py", "b.py", "a.py"])  # any order
    assert again.unfinished() == ["c.py", "d.py"]
    assert again.results["b.py"] == Result("b.py", "failed", 1, 2.0, "boom", "/out/b")
    assert not list(tmp_path.glob(".suite-state.json.*"))  # atomic writes leave no temporaries
    assert SuiteState.last_durations(path) == {"a.py": 1.5, "b.py": 2.0}  # results only
    assert SuiteState.last_durations(tmp_path / "none.json") == {}


def test_resume_refuses_another_suite_and_missing_or_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "suite-state.json"
    with pytest.raises(UsageError, match="no suite state in"):
        SuiteState.resume(path, ["a.py"])
    SuiteState(path, ["a.py", "b.py"]).save()
    with pytest.raises(UsageError, match=r"from another suite \(different tests\): it has 1 not in this one: "
                                         r"b.py; it lacks 1: c.py\. Run with the same paths and --shard"):
        SuiteState.resume(path, ["a.py", "c.py"])
    path.write_text("{not json")
    with pytest.raises(UsageError, match="is not a suite state file"):
        SuiteState.resume(path, ["a.py"])
    path.write_text(json.dumps({"version": 99, "tests": [], "results": {}}))
    with pytest.raises(UsageError, match="version 99"):
        SuiteState.resume(path, [])


# -- reports ------------------------------------------------------------------------------------

def test_suite_junit_embeds_each_tests_own_report_or_says_why_there_is_none(tmp_path: Path) -> None:
    own = tmp_path / "t1"
    own.mkdir()
    (own / "junit.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="t1" tests="2" failures="1" errors="0" time="3">'
        '<testcase classname="t1" name="sub" time="1"><failure message="x">x</failure></testcase>'
        '<testcase classname="t1" name="script" time="3"/></testsuite></testsuites>')
    results = [
        Result("t1.py", "failed", 1, 3.0, "tail", str(own)),
        Result("bad.py", "error", 2, 0.0, "does not load: bad.py:1: syntax error \x1b[1m"),
        Result("gone.py", "interrupted", 130, 1.0, "", str(tmp_path / "missing")),
        Result("later.py", "not run"),
        Result("ok.py", "passed", 0, 1.0, "", str(tmp_path / "nothing-here")),
    ]
    root = ET.fromstring(output.junit_xml("ntng test", results, 9.0))
    assert (root.get("tests"), root.get("failures"), root.get("errors"), root.get("skipped")) == ("6", "1", "1", "2")
    suites = {ts.get("name"): ts for ts in root.iter("testsuite")}
    assert list(suites) == ["t1.py", "bad.py", "gone.py", "later.py", "ok.py"]
    assert [tc.get("name") for tc in suites["t1.py"]] == ["sub", "script"]
    assert {tc.get("classname") for tc in root.iter("testcase")} == set(suites)
    err = suites["bad.py"].find("testcase/error")
    assert err is not None and err.get("message", "").startswith("does not load: bad.py:1") and "\x1b" not in (err.text or "")
    assert suites["gone.py"].find("testcase/skipped") is not None
    assert suites["later.py"].find("testcase/skipped") is not None
    assert suites["ok.py"].find("testcase/failure") is None and suites["ok.py"].find("testcase/error") is None


def test_suite_log_appends_json_lines(tmp_path: Path) -> None:
    for run in (1, 2):  # a resumed suite appends to the same log
        log = output.SuiteLog(tmp_path / "suite.jsonl")
        log.emit("suite", result="started", run=run)
        log.emit("test", result="passed", test="a.py", duration=1.0)
        log.close()
    events = [json.loads(line) for line in (tmp_path / "suite.jsonl").read_text().splitlines()]
    assert [(e["event"], e["result"]) for e in events] == [("suite", "started"), ("test", "passed")] * 2
    assert all({"time", "t"} <= set(e) for e in events)
