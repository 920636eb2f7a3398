"""What every backend does with its VMM process: prepare the state directory from the plan,
spawn the VMM so that it dies with the runner, watch it, kill it.

The plan (nixlib's launch output) names the files and sockets; nothing here invents paths.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .. import backdoorkey, paths, pdeathsig
from ..errors import MissingCapability, SetupError
from ..plan import NodePlan
from ..unixhttp import UnixHttpClient
from .console import ConsoleLines

HELPER_START_TIMEOUT = 10.0
TITLES = {"qemu": "QEMU", "firecracker": "Firecracker", "cloud-hypervisor": "Cloud Hypervisor",
          "nspawn": "systemd-nspawn"}
# After SIGKILL a process is gone at once unless it is stuck in the kernel (D state, e.g. on a
# dead file system); release() does not wait for it longer than this.
KILL_REAP_TIMEOUT = 5.0
# A helper's log is read from its end only, this many bytes: it is the helper's to grow.
HELPER_LOG_TAIL = 600
PANIC = "panicked at"  # what a Rust program prints when one of its threads panics


def log_tail(log: Path) -> str:
    """The last HELPER_LOG_TAIL bytes of a helper's log, or what stood in the way."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - HELPER_LOG_TAIL))
            return f.read(HELPER_LOG_TAIL).decode(errors="replace").strip() or "(empty)"
    except OSError as e:
        return f"(unreadable: {e.strerror})"


class VmmProcess(ConsoleLines):
    name = "vmm"  # the backend's name, as in plan["backend"]

    def __init__(self, machine_name: str, plan: NodePlan,
                 preexec: Callable[[], None] | None = None, keep_disk: bool = False) -> None:
        self.machine_name = machine_name
        self.plan = plan
        self.preexec = preexec  # runs in the child before exec: enters the test's network namespace
        self.keep_disk = keep_disk
        self.proc: subprocess.Popen[bytes] | None = None
        self.helpers: list[subprocess.Popen[bytes]] = []  # side processes of the plan (virtiofsd, ...)
        self.state_dir = Path(plan["stateDir"])  # nixlib names it
        self._console_thread: threading.Thread | None = None
        self._console_copy: IO[bytes] | None = None  # consoleLog, where stdout is the console
        self._init_console()

    @property
    def stderr_path(self) -> Path:
        """The VMM's stderr (and stdout unless the backend takes it): nixlib names it."""
        return Path(self.plan["files"]["stderr"])

    @property
    def title(self) -> str:
        """The VMM's name in log lines and errors ("QEMU running", "Firecracker exited")."""
        return TITLES.get(self.name, self.name)

    @property
    def restarts_on_reboot(self) -> bool:
        """A guest reboot ends this VMM and the runner starts it again (nixlib's restartOnReboot)."""
        return bool(self.plan.get("restartOnReboot", False))

    def exited_for_reboot(self) -> bool:
        """Whether the VMM is gone because the guest asked for a reboot."""
        return False

    def restart_if_rebooted(self) -> bool:
        """The restart-on-reboot policy: where the plan says a guest reboot ends the VMM
        (restartOnReboot) and it did, start it again on the same disk, so the test sees a
        reboot.  Whether it did (the backdoor connection ended with the old VMM)."""
        if not (self.restarts_on_reboot and self.proc is not None and not self.alive()
                and self.exited_for_reboot()):
            return False
        self._relaunch()
        return True

    def _relaunch(self) -> None:
        """Stop what is left of the VMM and start it again on the same disk (restart_if_rebooted):
        console.log goes on, the lines kept in memory are the new run's.  Needs a backend that
        start() can run again after release() (QEMU's; only QEMU plans say restartOnReboot)."""
        self.release()
        self.close_console_artifact()  # the new run's lines open it again (appended)
        self._restart_console()
        self.keep_disk = True
        self.start()

    def start(self) -> None:
        raise NotImplementedError  # each backend's

    def release(self) -> None:
        raise NotImplementedError  # each backend's

    # -- starting -----------------------------------------------------------------------------

    def _prepare(self, missing_hint: str, skip_disk_steps: bool = False, keep: bool | None = None) -> None:
        """Fresh state directory: leftover sockets gone, the plan's prepare steps run.  A kept
        disk (-K, or `keep`: one restored from a snapshot) is booted as it is, so the steps that
        would make a fresh one are skipped (`skip_disk_steps`: only those naming the disk; else
        all of them)."""
        paths.private_dir(self.state_dir)
        for sock in self.plan["sockets"].values():
            Path(sock).unlink(missing_ok=True)
        backdoorkey.write(self.plan)  # before the VMM starts: QEMU reads it at start (fw_cfg)
        disk = Path(self.plan["files"]["disk"])
        if keep is None:
            keep = self.keep_disk and disk.exists()
        if not keep:
            disk.unlink(missing_ok=True)
        for cmd in self.plan["prepare"]:
            if keep and (not skip_disk_steps or str(disk) in cmd):
                continue
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            except FileNotFoundError:
                raise SetupError(f"{self.machine_name}: {cmd[0]} not found ({missing_hint})") from None
            if r.returncode != 0:
                raise SetupError(f"{self.machine_name}: `{' '.join(cmd)}` failed: {r.stderr.strip()}")

    def _check_binary(self, argv0: str, hint: str) -> None:
        """Fail before anything is prepared when the VMM is not installed."""
        found = os.access(argv0, os.X_OK) if "/" in argv0 else shutil.which(argv0) is not None
        if not found:
            where = argv0 if "/" in argv0 else f"{argv0!r} (PATH={os.environ.get('PATH', '')})"
            raise SetupError(f"{self.machine_name}: {argv0} not found on PATH: looked for {where}; {hint}")

    def _spawn(self, argv: list[str], missing: str, **popen: Any) -> None:
        """Start the VMM as a child that dies with the runner; stderr goes to stderr_path
        unless `popen` says otherwise."""
        try:
            with open(self.stderr_path, "wb") as err:
                popen.setdefault("stdout", err)
                popen.setdefault("stderr", err)
                popen.setdefault("stdin", subprocess.DEVNULL)
                self.proc = pdeathsig.spawn(argv, then=self.preexec, start_new_session=True, **popen)
        except FileNotFoundError:
            raise SetupError(f"{self.machine_name}: {argv[0]} not found: {missing}") from None

    def _pump_stdout_console(self) -> None:
        """The VMM's stdout is the console (Firecracker's serial, nspawn's read-only console):
        split into lines, and copied as it came to the plan's consoleLog."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        copy = self._console_copy = open(self.plan["files"]["consoleLog"], "wb", buffering=0)
        self._console_thread = threading.Thread(
            target=self._pump_console, args=(lambda: os.read(fd, 65536), copy.write),
            name=f"console-{self.machine_name}", daemon=True)
        self._console_thread.start()

    def _end_stdout_console(self, join_timeout: float) -> None:
        """After the VMM ended: the pump's last lines, then the copy closed."""
        if self._console_thread is not None:
            self._console_thread.join(join_timeout)
        if self._console_copy is not None:
            self._console_copy.close()

    def _make_share_folders(self) -> None:
        """The artifacts share's host folder is new each run; QEMU's 9p server needs it to exist."""
        for share in self.plan.get("shares", []):
            if share.get("create"):
                Path(share["source"]).mkdir(parents=True, exist_ok=True)

    def _start_helpers(self) -> None:
        """Processes QEMU connects to (vhost-device-vsock, virtiofsd): started first, listening
        before QEMU runs, dying with the runner like QEMU."""
        for helper in self.plan.get("helpers", []):
            name, argv, ready = helper["name"], helper["argv"], Path(helper["waitFor"])
            ready.unlink(missing_ok=True)
            log = Path(helper["log"])  # nixlib names it
            try:
                with open(log, "wb") as out:
                    proc = pdeathsig.spawn(argv, then=self.preexec, stdin=subprocess.DEVNULL, stdout=out,
                                           stderr=out, start_new_session=True)
            except FileNotFoundError:
                # nixlib says what needs the helper and how to get it.
                raise SetupError(f"{self.machine_name}: {argv[0]} not found; "
                                 f"{helper.get('missing', 'it is needed by this node')}") from None
            self.helpers.append(proc)
            deadline = time.monotonic() + HELPER_START_TIMEOUT
            while not ready.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log_tail(log)
                    state = f"exited with {proc.returncode}" if proc.poll() is not None else \
                        f"did not create {ready} within {HELPER_START_TIMEOUT:.0f}s"
                    raise SetupError(f"{self.machine_name}: helper {name} {state}: {tail}")
                time.sleep(0.01)

    # -- watching and stopping ----------------------------------------------------------------

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stderr_tail(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace").strip()[-600:] or "(no output)"
        except (OSError, KeyError):  # KeyError: a hand-made plan names no stderr file
            return "(no output)"

    def _started_helpers(self) -> list[tuple[subprocess.Popen[bytes], str, Path]]:
        """(process, name, log) of each helper started: the plan's first len(self.helpers)."""
        started = zip(self.helpers, self.plan.get("helpers", []), strict=False)  # a start may stop midway
        return [(proc, h["name"], Path(h["log"])) for proc, h in started]

    def helper_failure(self) -> str | None:
        """What went wrong with a helper the VM needs, or None: one exited, or one printed a
        Rust panic (vhost-device-vsock 0.3's vsock thread dies on one, the process lives on and
        no CONNECT is answered again)."""
        for proc, name, log in self._started_helpers():
            if proc.poll() is not None:
                return f"{name} exited with {proc.returncode}; its log {log}: {log_tail(log)}"
            tail = log_tail(log)
            if PANIC in tail:
                return f"{name} (pid {proc.pid}) panicked; its log {log}: {tail}"
        return None

    def helpers_report(self) -> str:
        """One line per helper, its state and its log's last lines: for errors about a guest
        that never answered."""
        lines = []
        for proc, name, log in self._started_helpers():
            state = "running" if proc.poll() is None else f"exited with {proc.returncode}"
            lines.append(f"{name} (pid {proc.pid}): {state}; its log: {log_tail(log)}")
        return "\n".join(lines)

    def wait_exit(self, timeout: float | None) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
        for proc in self.helpers:
            kill_group(proc)
        self.helpers = []

    def copy_disk(self, argv: list[str]) -> None:
        """A disk image copied by nixlib's command (a snapshot layout's copyDisk); the state
        directory made first (a restore may come before the first start)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        copy_disk(argv, self.machine_name)


    def _remove_sockets(self) -> None:
        """The VMM is gone: its sockets are dead ends (a killed VMM cannot remove them)."""
        for sock in self.plan["sockets"].values():
            Path(sock).unlink(missing_ok=True)

    @property
    def capabilities(self) -> frozenset[str]:
        """The node's effective features (nixlib/capabilities.nix, from the plan)."""
        return frozenset(self.plan.get("capabilities", {}).get("features", []))

    def _lacks(self, capability: str, what: str) -> MissingCapability:
        """`capability`: a feature name of nixlib/capabilities.nix."""
        return MissingCapability(
            f"{self.machine_name}: {what} needs the {capability!r} capability, which backend "
            f"{self.name} lacks (it has: {', '.join(sorted(self.capabilities))})")


class ApiVmm(VmmProcess):
    """A VMM driven over an HTTP API on a unix socket (Firecracker, Cloud Hypervisor), started
    by one of its ROUTES (a config file or command line, or API calls)."""

    ROUTES: tuple[str, ...] = ()

    def __init__(self, machine_name: str, plan: NodePlan,
                 preexec: Callable[[], None] | None = None, keep_disk: bool = False,
                 route: str | None = None) -> None:
        super().__init__(machine_name, plan, preexec, keep_disk)
        route = self.ROUTES[0] if route is None else route
        if route not in self.ROUTES:
            raise ValueError(f"route must be one of {self.ROUTES}, got {route!r}")
        self.route = route
        self.who = f"{machine_name}: {self.name}"
        self.api = UnixHttpClient(plan["sockets"]["api"], self.who)
        self.paused = False

    def call(self, name: str, timeout: float | None = None) -> Any:
        """Make the plan's API call `name` (nixlib's `calls`: method, path and body); the answer."""
        c = self.plan["calls"][name]
        return self.api.request(c["method"], c["path"], c.get("body"), timeout=timeout)


def copy_disk(argv: list[str], who: str) -> None:
    """Run nixlib's disk copy `argv` (a snapshot layout's copyDisk: cp, sparse, CoW where
    possible); `who` (the machine) names it in the error."""
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise SetupError(f"{who}: `{' '.join(argv)}` failed: {r.stderr.strip()}")


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a child's whole session (it was started with start_new_session) and reap it
    (waiting KILL_REAP_TIMEOUT at most)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # exited (and was reaped elsewhere) in the meantime
        try:
            proc.wait(KILL_REAP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass  # stuck in the kernel: it dies when it leaves it; PDEATHSIG is armed too
