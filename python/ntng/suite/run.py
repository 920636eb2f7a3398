"""Run a suite: each test in its own `ntng run` subprocess (own session, own artifact folder
OUT/tests/<test>/), as many at once as the budget allows, output streamed line by line with
the test's name in front, results recorded as they come (state file, JSON log), one JUnit
file at the end.

Ctrl-C or SIGTERM stops the suite: each running test gets one SIGTERM (the runner cleans up:
VMs, taps, state dirs) and is killed if it has not exited within STOP_GRACE seconds, or at a
second Ctrl-C.  Children live in their own sessions, so the terminal's SIGINT reaches only the
suite and each runner gets exactly one signal; they also get PDEATHSIG, so a suite killed by
SIGKILL takes its tests with it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from types import FrameType
from typing import IO

from .. import pdeathsig, testspec
from ..errors import EXIT_OK, EXIT_SETUP, EXIT_TEST_FAILED, NtngError
from . import budget as budget_mod
from . import discover, output, shard
from .state import FILE_NAME, Result, SuiteState

EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM: the suite did not finish; --resume goes on
STOP_GRACE = 60.0  # seconds a stopped test has for its cleanup (journals are fetched within 20 s)
STATUS = {0: "passed", 1: "failed", 2: "error", 3: "error", 4: "timeout"}
TAIL_LINES = 30  # of a failed test's output, in the JUnit message for tests without a report


@dataclasses.dataclass
class SuiteOptions:
    paths: list[Path]
    out_dir: Path
    jobs: int | None = None
    memory_mib: int | None = None
    fail_fast: bool = False
    shard: str | None = None
    resume: bool = False
    run_args: list[str] = dataclasses.field(default_factory=list)  # for every `ntng run`
    python: str = sys.executable


@dataclasses.dataclass
class Running:
    test: discover.TestFile
    proc: subprocess.Popen[bytes]
    reader: threading.Thread
    started: float
    memory_mib: int
    tail: deque[str]
    folder: Path


class Suite:
    def __init__(self, opts: SuiteOptions, out: IO[str] | None = None) -> None:
        self.opts = opts
        self.out = out or sys.stdout
        self._print_lock = threading.Lock()
        self.interrupts = 0
        self.running: dict[str, Running] = {}
        self._deadline = float("inf")  # set when the running tests are asked to stop

    def say(self, prefix: str, line: str) -> None:
        with self._print_lock:
            self.out.write(f"[{prefix}] {line}\n" if prefix else f"{line}\n")
            self.out.flush()

    # -- the suite ---------------------------------------------------------------------------

    def run(self) -> int:
        opts = self.opts
        tests = discover.discover(opts.paths)
        if opts.shard is not None:
            index, count = shard.parse(opts.shard)
            tests = shard.select(tests, index, count)
            self.say("", f"ntng test: shard {index}/{count}: {len(tests)} test(s)")
        by_id = {t.id: t for t in tests}
        opts.out_dir.mkdir(parents=True, exist_ok=True)
        state_path = opts.out_dir / FILE_NAME
        last = SuiteState.last_durations(state_path)  # before a fresh run overwrites it
        if opts.resume:
            state = SuiteState.resume(state_path, list(by_id))
            done = len(state.test_ids) - len(state.unfinished())
            self.say("", f"ntng test: resuming: {done} of {len(by_id)} test(s) already have a result")
        else:
            state = SuiteState(state_path, list(by_id))
            state.save()
        budget = budget_mod.default_budget(opts.jobs, opts.memory_mib)
        log = output.SuiteLog(opts.out_dir / "suite.jsonl")
        log.emit("suite", result="started", tests=state.test_ids, resume=opts.resume, shard=opts.shard,
                 jobs=budget.jobs, memory_mib=budget.memory_mib)
        self.say("", f"ntng test: {len(state.unfinished())} to run, at most {budget.jobs} at once "
                 f"within {budget.memory_mib} MiB; artifacts in {opts.out_dir}")
        t0 = time.monotonic()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            order = budget_mod.longest_first(state.unfinished(), last)
            self._loop([by_id[t] for t in order], state, budget, log)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            duration = time.monotonic() - t0
            results = [state.results.get(t) or Result(t, "not run") for t in state.test_ids]
            junit = opts.out_dir / "junit.xml"
            junit.write_text(output.junit_xml("ntng test", results, duration))
            code = self._exit_code(results)
            log.emit("suite", result={EXIT_OK: "passed", EXIT_INTERRUPTED: "interrupted"}.get(code, "failed"),
                     exit_code=code, duration=round(duration, 3),
                     counts={s: sum(r.status == s for r in results) for s in {r.status for r in results}})
            log.close()
            self._summary(results, duration, junit)
        return code

    def _exit_code(self, results: list[Result]) -> int:
        if self.interrupts:
            return EXIT_INTERRUPTED
        bad = [r for r in results if r.final and r.status != "passed"]
        if not bad:
            return EXIT_OK
        # Only broken setups (image, QEMU, KVM): CI may retry infrastructure trouble.
        return EXIT_SETUP if all(r.exit_code == EXIT_SETUP for r in bad) else EXIT_TEST_FAILED

    def _summary(self, results: list[Result], duration: float, junit: Path) -> None:
        for r in results:
            if r.status != "passed":
                self.say("", f"  {r.status.upper():<11} {r.id}" + (f"  ({r.artifacts})" if r.artifacts else ""))
        counts = ", ".join(f"{sum(r.status == s for r in results)} {s}"
                           for s in ("passed", "failed", "error", "timeout", "interrupted", "not run")
                           if any(r.status == s for r in results))
        self.say("", f"ntng test: {counts or 'no tests'} in {duration:.1f}s; reports: {junit}, "
                 f"{self.opts.out_dir / 'suite.jsonl'}")

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.interrupts += 1

    # -- scheduling --------------------------------------------------------------------------

    def _loop(self, todo: list[discover.TestFile], state: SuiteState, budget: budget_mod.Budget,
              log: output.SuiteLog) -> None:
        needs = self._load(todo, state, log)
        waiting = [t for t in todo if t.id in needs]
        sched = budget_mod.Scheduler(budget)
        stopping = self.opts.fail_fast and len(needs) < len(todo)
        if stopping:
            self.say("", "ntng test: --fail-fast: a test does not load; starting none")
        while (waiting and not stopping) or self.running:
            if self.interrupts and not stopping:
                stopping = True
                self.say("", "ntng test: interrupted: stopping the running tests (Ctrl-C again to kill them)")
                self._stop(log)
            if not stopping:
                for test_id in sched.startable([(t.id, needs[t.id]) for t in waiting]):
                    test = next(t for t in waiting if t.id == test_id)
                    waiting.remove(test)
                    if sched.oversized(needs[test_id]):
                        self.say(test_id, f"needs {needs[test_id]} MiB, more than the budget "
                                 f"({budget.memory_mib} MiB): running it alone")
                    self._start(test, needs[test_id], sched, log)
            for test_id, r in list(self.running.items()):
                if r.proc.poll() is None:
                    continue
                r.reader.join()
                del self.running[test_id]
                sched.finished(test_id)
                result = self._result(r, stopping)
                state.record(result)
                log.emit("test", result=result.status, test=test_id, exit_code=result.exit_code,
                         duration=round(result.duration, 3), artifacts=result.artifacts)
                self.say(test_id, f"{result.status.upper()} in {result.duration:.1f}s")
                if self.opts.fail_fast and result.final and result.status != "passed" and not stopping:
                    stopping = True
                    self.say("", f"ntng test: --fail-fast: {test_id} {result.status}; stopping the others")
                    self._stop(log)
            if self.running and (self.interrupts >= 2 or time.monotonic() > self._deadline):
                self._kill_all()
            time.sleep(0.1)

    def _load(self, todo: list[discover.TestFile], state: SuiteState, log: output.SuiteLog) -> dict[str, int]:
        """Each test's memory need, from its declared nodes (nixlib validates them: a test that
        does not load is that test's error, recorded here, and never started)."""
        def need(test: discover.TestFile) -> int:
            testspec.compile_script(test.path, testspec.read_script(test.path))
            spec = testspec.load_declared(test.path)
            return budget_mod.test_memory_mib(spec.plans.values())

        needs: dict[str, int] = {}
        workers = max(1, min(len(todo), budget_mod.usable_cores()))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            futures = {pool.submit(need, t): t for t in todo}
            for fut in concurrent.futures.as_completed(futures):
                test = futures[fut]
                try:
                    needs[test.id] = fut.result()
                except (NtngError, OSError, subprocess.SubprocessError) as e:
                    code = e.exit_code if isinstance(e, NtngError) else EXIT_SETUP  # e.g. Nix hung
                    state.record(Result(test.id, "error", code, message=f"does not load: {e}"))
                    log.emit("test", result="error", test=test.id, exit_code=code, message=str(e))
                    self.say(test.id, f"ERROR: does not load: {e}")
        return needs

    # -- processes ---------------------------------------------------------------------------

    def _start(self, test: discover.TestFile, memory_mib: int, sched: budget_mod.Scheduler,
               log: output.SuiteLog) -> None:
        folder = self.opts.out_dir / "tests" / test.slug
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "junit.xml").unlink(missing_ok=True)  # a resumed test's old report is not its result
        argv = [self.opts.python, "-m", "ntng.cli", "run", str(test.path), "-o", str(folder),
                "--junit-xml", str(folder / "junit.xml"), *self.opts.run_args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True,
                                preexec_fn=pdeathsig.preexec(os.getpid(), signal.SIGTERM))
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        assert proc.stdout is not None
        reader = threading.Thread(target=self._stream, args=(test.id, proc.stdout, folder / "output.log", tail),
                                  name=f"out-{test.id}", daemon=True)
        reader.start()
        self.running[test.id] = Running(test, proc, reader, time.monotonic(), memory_mib, tail, folder)
        log.emit("test", result="started", test=test.id, pid=proc.pid, memory_mib=memory_mib)
        self.say(test.id, f"started ({memory_mib} MiB; {len(self.running)} running, "
                 f"{sched.used_mib}/{sched.budget.memory_mib} MiB in use)")

    def _stream(self, test_id: str, pipe: IO[bytes], log_path: Path, tail: deque[str]) -> None:
        with open(log_path, "w") as f:
            for raw in iter(pipe.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\n")
                f.write(line + "\n")
                tail.append(line)
                self.say(test_id, line)
        pipe.close()

    def _result(self, r: Running, stopping: bool) -> Result:
        rc = r.proc.returncode
        status = STATUS.get(rc)
        if status is None:  # 130, or a signal: stopped by us, or killed by someone else
            status = "interrupted" if stopping else "error"
        message = "" if status == "passed" else "\n".join(r.tail)
        if status == "error" and rc < 0:
            message = f"the runner was killed by signal {-rc}\n" + message
        return Result(r.test.id, status, rc, time.monotonic() - r.started, message, str(r.folder), r.memory_mib)

    def _stop(self, log: output.SuiteLog) -> None:
        log.emit("suite", result="stopping", running=list(self.running))
        self._deadline = time.monotonic() + STOP_GRACE
        for r in self.running.values():
            try:
                r.proc.send_signal(signal.SIGTERM)  # the runner cleans up and exits 130
            except ProcessLookupError:
                pass

    def _kill_all(self) -> None:
        for r in self.running.values():
            try:
                os.killpg(r.proc.pid, signal.SIGKILL)  # VMs die with their runner (PDEATHSIG)
            except ProcessLookupError:
                pass


def run_suite(opts: SuiteOptions, out: IO[str] | None = None) -> int:
    return Suite(opts, out).run()
