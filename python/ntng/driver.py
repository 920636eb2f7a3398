"""Driver: machines, the test script's globals, the global timeout, and cleanup.

Test scripts written for the NixOS test driver run unchanged: the same globals (start_all,
subtest, retry, polling_condition, …) and one global per node.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from . import caps, clones, report, testspec
from . import network as network_mod
from .client import ExecResult
from .errors import (
    EXIT_TIMEOUT,
    GlobalTimeout,
    NtngError,
    RequestedAssertionFailed,
    TestFailure,
    TestScriptError,
)
from .machine import Machine
from .plan import NodePlan
from .polling import PollingCondition, polling_condition_factory
from .report import EventLog
from .retry import retry
from .snapshots import Snapshot
from .testspec import TestSpec, compile_script
from .watch import Detection, Rule, Watcher

T = TypeVar("T")

# release(): the journals may take this long (Machine.save_journal's 20 s and 5 s to answer) ...
ARTIFACTS_TIMEOUT = 25.0
# ... or this long after the global timeout, when the guest may well be the reason for it.
ARTIFACTS_TIMEOUT_AFTER_GLOBAL = 3.0
# Then closing connections, port forwards, killing VMMs and joining their threads: all bounded
# steps (a kill is reaped within vmm.KILL_REAP_TIMEOUT); this bounds them together.
RELEASE_TIMEOUT = 10.0
# After the global timeout the main thread is interrupted and releases the machines itself
# (reports first); if it has not started to within this, the timer thread does it.
GLOBAL_TIMEOUT_RELEASE_AFTER = 2.0
# `ntng run` ends at most this long after the global timeout, whatever the script or a guest
# do: a release takes ARTIFACTS_TIMEOUT_AFTER_GLOBAL + RELEASE_TIMEOUT at most, and a script
# that swallows the interrupt is ended by os._exit (VMMs die with the runner: PDEATHSIG).
GLOBAL_TIMEOUT_EXIT = 15.0

# The names a test script sees besides its machines (the NixOS driver's, plus `driver`).
DRIVER_GLOBALS = (
    "start_all", "join_all", "subtest", "retry", "polling_condition", "serial_stdout_on",
    "serial_stdout_off", "run_tests", "machines", "machines_qemu", "driver", "log", "Machine",
    "BaseMachine", "RequestedAssertionFailed", "create_machine", "start_from_snapshot",
)


def pythonize_name(name: str) -> str:
    return re.sub(r"^[^A-Za-z_]|[^A-Za-z0-9_]", "_", name)


class Driver:
    def __init__(
        self,
        spec: TestSpec,
        out_dir: Path,
        boot_timeout: float,
        global_timeout: float | None = None,
        log: Callable[[str], None] | None = None,
        keep_state: bool = False,
    ) -> None:
        self.spec = spec
        # Everything of this run (reports, consoles, journals, screenshots, copied files) goes
        # into a folder of its own under out_dir; machines' out_dir is that folder.
        self.out_dir = report.new_run_dir(out_dir, spec.name)
        self._artifacts_saved = False
        self.global_timeout = global_timeout if global_timeout is not None else spec.global_timeout
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.polling_conditions: list[PollingCondition] = []
        self.events = EventLog(self.out_dir / "events.jsonl")
        self.events.emit("test", None, result="started", name=spec.name, script=str(spec.script_path))
        # Declared impairments are checked before anything is made.
        self.declared_impairments = network_mod.declared_impairments(spec.network, str(spec.script_path))
        # Bridges and taps (or switches) exist before any machine starts; gone after the last.
        self.network = network_mod.make(spec.network, self._log)
        try:
            self.network.start()
        except BaseException:
            self.network.release()
            raise
        # Artifacts shares (nixlib's @artifacts@ marker) live in this run's folder.
        plans = {name: testspec.substitute(plan, testspec.ARTIFACTS_MARKER, str(self.out_dir))
                 for name, plan in spec.plans.items()}
        self.detections: list[Detection] = []
        self._in_script = False
        self._interrupted = False
        self.watcher = Watcher(self._on_detection)
        self.timed_out = False
        self.exit_on_timeout = False  # the runner: os._exit GLOBAL_TIMEOUT_EXIT after the timeout
        self.global_deadline: float | None = None
        self._timer: threading.Timer | None = None
        self._release_lock = threading.Lock()
        self._release_started = threading.Event()
        self._released = False
        self.subtests: list[tuple[str, float, BaseException | None]] = []
        self.boot_timeout = boot_timeout
        self.keep_state = keep_state
        self.machines: list[Machine] = [self.new_machine(name, plans[name])
                                        for name in sorted(spec.node_names)]

    def log(self, msg: str) -> None:
        self._log(msg)

    def new_machine(self, name: str, plan: NodePlan, boot_timeout: float | None = None,
                    restore_from: Snapshot | None = None) -> Machine:
        """A Machine of this run, made with all it needs from the driver: the checks before
        each command (polling conditions, detections, the global timeout), failure detection,
        the network and the impairments declared for it; a clone restores `restore_from`.
        The caller adds it to `machines`."""
        return Machine(
            name, plan, self.out_dir, self.boot_timeout if boot_timeout is None else boot_timeout,
            self._log, callbacks=[self.check_polling_conditions, self.check_detections,
                                  self.check_global_timeout],
            network=self.network, events=self.events,
            keep_state=self.keep_state and restore_from is None,
            watcher=self.watcher, restore_from=restore_from,
            declared_impairments={vlan: d for (node, vlan), d in self.declared_impairments.items() if node == name},
            global_deadline=lambda: self.global_deadline)

    def connect_all(self, machines: list[Machine]) -> None:
        """Start the machines and wait for all of them to come up, in parallel."""
        on_each(machines, Machine.connect)

    # -- globals ------------------------------------------------------------------------------

    def test_symbols(self) -> dict[str, Any]:
        symbols: dict[str, Any] = {
            "start_all": self.start_all,
            "join_all": self.join_all,
            "subtest": self.subtest,
            "retry": retry,
            "polling_condition": polling_condition_factory(self),
            "serial_stdout_on": self.serial_stdout_on,
            "serial_stdout_off": self.serial_stdout_off,
            "run_tests": self.run_tests,
            "machines": self.machines,
            "machines_qemu": self.machines,
            "driver": self,
            "log": self,
            "Machine": Machine,
            "BaseMachine": Machine,
            "RequestedAssertionFailed": RequestedAssertionFailed,
            "create_machine": self.create_machine,
            "start_from_snapshot": self.start_from_snapshot,
        }
        assert tuple(symbols) == DRIVER_GLOBALS  # the quick check lints against that list
        for m in self.machines:
            symbols[pythonize_name(m.name)] = m
        if len(self.machines) == 1:
            symbols["machine"] = self.machines[0]
        return symbols

    def start_all(self) -> None:
        """Start every VM, then wait for all of them to come up, in parallel."""
        self.log("start all VMs")
        for m in self.machines:
            m.start()
        self.connect_all(self.machines)

    def parallel(self, command: str | list[str], *machines: Machine, timeout: float | None = 900
                 ) -> dict[str, ExecResult]:
        """Extension: the same command on several machines (default: all) at once; each
        machine's result (status, stdout, stderr, duration) by name."""
        chosen = list(machines) or self.machines
        results = on_each(chosen, lambda m: m.run(command, timeout=timeout))
        return {m.name: r for m, r in zip(chosen, results, strict=True)}

    def create_machine(self, start_command: str, *, name: str | None = None,
                       keep_vm_state: bool = False) -> Machine:
        """The NixOS driver's legacy way to add a machine from a run-<name>-vm script.  Here
        machines come from the test's node declarations, which a clear error says."""
        raise TestScriptError(
            f"create_machine({start_command!r}): machines are declared as nodes "
            "(`#: nodes.<name> = { … };` or mkTest's nodes), not started from NixOS VM scripts")

    def start_from_snapshot(self, snapshot: Snapshot, names: list[str]) -> list[Machine]:
        """Extension: clones of `snapshot` (from machine.snapshot(name)), one per name, restored
        in parallel and up; each a full Machine, in `machines` and cleaned up with the run."""
        return clones.start_clones(self, snapshot, names)

    def join_all(self) -> None:
        for m in self.machines:
            m.wait_for_shutdown()
        if self._timer:
            self._timer.cancel()

    @contextlib.contextmanager
    def subtest(self, name: str) -> Iterator[None]:
        self.log(f"subtest: {name}")
        t0 = time.monotonic()
        try:
            yield
        except BaseException as e:
            self.subtests.append((name, time.monotonic() - t0, e))
            self.events.emit("subtest", None, time.monotonic() - t0, "fail", name=name, error=str(e))
            self.log(f'Test "{name}" failed with error: "{e}"')
            raise
        self.subtests.append((name, time.monotonic() - t0, None))
        self.events.emit("subtest", None, time.monotonic() - t0, name=name)

    def serial_stdout_on(self) -> None:
        for m in self.machines:
            m.serial_stdout = True

    def serial_stdout_off(self) -> None:
        for m in self.machines:
            m.serial_stdout = False

    # -- failure detection ---------------------------------------------------------------------

    def watch(self, regex: str, severity: str = "fail", machine: str | None = None,
              name: str | None = None) -> None:
        """Extension: a console rule for every machine (or one): "fail" ends the test at once
        with the matching lines, "warn" reports them."""
        self.watcher.add(Rule.make(name or regex, regex, severity, machine))

    def unwatch(self, name: str, machine: str | None = None) -> None:
        self.watcher.remove(name, machine)

    def _on_detection(self, d: Detection) -> None:
        self.events.emit("detection", d.machine, result=d.rule.severity, rule=d.rule.name, line=d.line)
        if d.rule.severity == "warn":
            self.log(f"warning: {d.describe()}")
            return
        self.log(f"failure detected: {d.describe()}")
        self.detections.append(d)
        if self._in_script and not self._interrupted:
            # Wake the script wherever it waits (as the global timeout does); run_tests turns
            # the interrupt into this failure.
            self._interrupted = True
            os.kill(os.getpid(), signal.SIGINT)

    def check_detections(self) -> None:
        if self.detections:
            raise TestFailure(self.detections[0].describe())

    def check_polling_conditions(self) -> None:
        for cond in self.polling_conditions:
            cond.maybe_raise()

    # -- running ------------------------------------------------------------------------------

    def start_global_timer(self) -> None:
        """The global timeout starts now: machines' commands without a timeout wait until it
        at most; when it passes, _on_global_timeout ends the test."""
        self.cancel_global_timer()
        self.global_deadline = time.monotonic() + self.global_timeout  # machines read it
        self._timer = threading.Timer(self.global_timeout, self._on_global_timeout)
        self._timer.daemon = True
        self._timer.start()

    def cancel_global_timer(self) -> None:
        if self._timer:
            self._timer.cancel()

    def timeout_message(self) -> str:
        return f"{self.spec.script_path}: global timeout of {self.global_timeout:.0f}s reached"

    def check_global_timeout(self) -> None:
        """Every command checks it first: after the global timeout nothing new starts."""
        if self.timed_out:
            raise GlobalTimeout(self.timeout_message())

    def _on_global_timeout(self) -> None:
        """The timer thread: interrupt the main thread (a signal wakes it inside any blocking
        wait; it unwinds, reports and releases); release from here if it does not start to;
        for the runner, end the process GLOBAL_TIMEOUT_EXIT after the timeout at the latest."""
        fired = time.monotonic()
        self.timed_out = True
        self.log(f"global timeout of {self.global_timeout:.0f}s reached; test terminating")
        main = threading.main_thread().ident
        if main is not None:
            signal.pthread_kill(main, signal.SIGINT)
        if not self._release_started.wait(GLOBAL_TIMEOUT_RELEASE_AFTER):
            self.log("the test script did not stop; releasing the machines from the timer")
            self.release()
        if self.exit_on_timeout:
            time.sleep(max(0.0, fired + GLOBAL_TIMEOUT_EXIT - time.monotonic()))
            self.log(f"ntng: TIMEOUT: the test did not end within {GLOBAL_TIMEOUT_EXIT:.0f}s of the "
                     "global timeout; exiting (reports may be missing)")
            os._exit(EXIT_TIMEOUT)

    def run_tests(self) -> None:
        code = compile_script(self.spec.script_path, self.spec.script)
        self.start_global_timer()
        t0 = time.monotonic()
        self._in_script = True
        symbols = self.test_symbols()
        try:
            exec(code, symbols)
            self.check_detections()  # a detection in the script's last moments still fails it
        except KeyboardInterrupt:
            if self.detections:
                raise TestFailure(self.detections[0].describe()) from None
            if self.timed_out:
                raise GlobalTimeout(self.timeout_message()) from None
            raise
        except (NtngError, AssertionError, Exception) as e:
            if self.detections and not isinstance(e, TestFailure):
                raise TestFailure(self.detections[0].describe()) from None
            if self.timed_out:
                raise GlobalTimeout(self.timeout_message()) from None
            raise script_error(self.spec.script_path, e, symbols) from None
        finally:
            self._in_script = False
            self.cancel_global_timer()
        self.log(f"test script finished in {time.monotonic() - t0:.2f}s")

    def write_reports(self, duration: float, outcome: BaseException | None) -> Path:
        """junit.xml in out_dir: one case per subtest and one for the script; the event log's
        last line.  Returns the JUnit file."""
        cases = [report.Case(name, d, failure=None if e is None else f"{type(e).__name__}: {e}")
                 for name, d, e in self.subtests]
        script = report.Case("script", duration)
        if outcome is not None:
            message = str(outcome)
            if isinstance(outcome, NtngError) and outcome.exit_code == TestFailure.exit_code:
                script.failure = message
            else:
                script.error = message
        cases.append(script)
        path = self.out_dir / "junit.xml"
        path.write_text(report.junit_xml(self.spec.name, cases, duration))
        result = "ok" if outcome is None else ("fail" if script.failure else "error")
        self.events.emit("test", None, duration, result, name=self.spec.name,
                         error=None if outcome is None else str(outcome))
        return path

    def save_artifacts(self) -> None:
        """Each running machine's journal of this boot into the run's folder, once, in parallel
        (best effort, within ARTIFACTS_TIMEOUT, or ARTIFACTS_TIMEOUT_AFTER_GLOBAL after the
        global timeout); consoles are written as they arrive."""
        if self._artifacts_saved:
            return
        self._artifacts_saved = True
        budget = ARTIFACTS_TIMEOUT_AFTER_GLOBAL if self.timed_out else ARTIFACTS_TIMEOUT
        up = [m for m in self.machines if m.is_up()]
        late = _bounded_each(up, lambda m: m.save_journal(timeout=max(1.0, budget - 5)), budget)
        for m in late:
            self.log(f"{m.name}: journal not saved: no answer within {budget:.0f}s")

    def release(self) -> None:
        """Save what can be saved and stop everything, bounded whatever the guests do: the
        journals (save_artifacts' budget), then RELEASE_TIMEOUT for the rest.  Backdoor
        connections are closed first, which returns any call blocked on a silent guest.  A
        second caller (the timer and the main thread) waits for the first one to finish."""
        self._release_started.set()
        if not self._release_lock.acquire(
                timeout=ARTIFACTS_TIMEOUT + RELEASE_TIMEOUT + GLOBAL_TIMEOUT_RELEASE_AFTER):
            return
        try:
            if not self._released:
                self._released = True
                self._release()
        finally:
            self._release_lock.release()

    def _release(self) -> None:
        self.cancel_global_timer()
        try:
            self.save_artifacts()
        except Exception as e:
            self.log(f"saving artifacts failed: {e}")
        deadline = time.monotonic() + RELEASE_TIMEOUT

        def release(m: Machine) -> None:
            try:
                m.release()
            except Exception as e:
                self.log(f"{m.name}: cleanup failed: {e}")

        for m in _bounded_each(self.machines, release, deadline - time.monotonic()):
            self.log(f"{m.name}: cleanup did not finish within {RELEASE_TIMEOUT:.0f}s (RELEASE_TIMEOUT)")
        try:
            if _bounded_each([self.network], lambda n: n.release(), deadline - time.monotonic()):
                self.log(f"network: cleanup did not finish within {RELEASE_TIMEOUT:.0f}s (RELEASE_TIMEOUT)")
        except Exception as e:
            self.log(f"network: cleanup failed: {e}")
        self.events.close()

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def on_each(machines: list[Machine], fn: Callable[[Machine], T]) -> list[T]:
    """fn(m) for every machine on its own thread, all at once; results in order, or the first
    error raised."""
    results: dict[int, T] = {}
    errors: list[BaseException] = []

    def one(i: int, m: Machine) -> None:
        try:
            results[i] = fn(m)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i, m), daemon=True) for i, m in enumerate(machines)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [results[i] for i in range(len(machines))]


def _bounded_each(items: list[T], fn: Callable[[T], object], timeout: float) -> list[T]:
    """fn(x) for every item on its own daemon thread, all at once, waiting `timeout` seconds
    in all; the items whose call had not finished (it goes on in the background).  The first
    error raised is re-raised."""
    errors: list[BaseException] = []

    def one(x: T) -> None:
        try:
            fn(x)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(x,), daemon=True) for x in items]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if errors:
        raise errors[0]
    return [x for x, t in zip(items, threads, strict=True) if t.is_alive()]


def script_error(path: Path, e: BaseException, names: Iterable[str] = DRIVER_GLOBALS) -> NtngError:
    """Turn an exception from the script into an error naming the script line; an unknown
    name gets the closest of `names` (the script's globals) or of the builtins."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == str(path)]
    where = f"{path}:{frames[-1].lineno}" if frames else str(path)
    line = f" ({frames[-1].line.strip()})" if frames and frames[-1].line else ""
    if isinstance(e, NtngError):
        out: NtngError = type(e).__new__(type(e))
        NtngError.__init__(out, f"{where}{line}: {e}")
        out.exit_code = e.exit_code
        return out
    if isinstance(e, (NameError, AttributeError, TypeError, ImportError)) and not isinstance(
        e, RequestedAssertionFailed
    ):
        # A Machine's AttributeError already names the closest method (caps.unknown_attribute).
        hint = caps.closest(e.name, [*names, *dir(builtins)]) if isinstance(e, NameError) and e.name else ""
        return TestScriptError(f"{where}{line}: {type(e).__name__}: {e}{hint}")
    return TestFailure(f"{where}{line}: {type(e).__name__}: {e}")

