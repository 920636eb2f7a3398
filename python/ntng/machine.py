"""Machine: the NixOS test driver's machine API over the binary backdoor.

Names, arguments, defaults and error messages follow nixpkgs' test driver so test scripts run
unchanged; `run()` is the extension returning stdout, stderr and timings separately.  This is
the facade (commands, systemd, waits, files, console and screen, network): the VM and the
backdoor connection (start, connect, boots, reboot, crash, shutdown) are its Session's.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import caps, clones, netem, safepath, screen, shares
from . import protocol as P
from .backends import Backend
from .client import DEFAULT_MAX_OUTPUT, BackdoorClient, ExecResult, OutputCallback
from .errors import (
    AgentRestarted,
    BootError,
    ConnectionLost,
    GuestStoppedReading,
    MachineExited,
    RequestedAssertionFailed,
    WaitTimeout,
)
from .keys import key_for
from .network import LinkCounters, Network
from .plan import Interface, NodePlan, no_network
from .portforward import PortForward
from .report import EventLog
from .retry import retry
from .session import Session, stderr_log
from .snapshots import Snapshot
from .watch import SHUTDOWN_MARKER, SHUTDOWN_QUIET, Rule, Watcher

if TYPE_CHECKING:
    from .backends.qemu import QemuBackend

__all__ = ["Machine", "RequestedAssertionFailed", "retry"]  # the last two: as the NixOS driver's

# The host waits for a command its timeout plus this: the agent kills a timed-out command and
# reports it, which a slow (TCG) guest may take a while to do.
COMMAND_WAIT_GRACE = 60.0
# timeout=None (succeed's and fail's default, as in NixOS): no timeout for the command in the
# guest, but the host waits at most until the driver's global timeout (plus the grace) or,
# without a driver, this long: a silent guest must not hold a caller for days.
COMMAND_WAIT_NO_TIMEOUT = 3600.0
# wait_for_console_text(timeout=None) waits this long (NixOS: for ever), like the other waits.
CONSOLE_WAIT_TIMEOUT = 900.0
# A console match may span lines, up to this many characters of console text: each check
# scans the new text and this much before it, not all text since the start.
CONSOLE_MATCH_SPAN = 256 * 1024
CONSOLE_POLL = 0.05  # seconds: lines arriving meanwhile are checked together
CONSOLE_EXIT_DRAIN = 1.0  # seconds for a VM's last console lines once it has exited

Impairments = dict[int, tuple[netem.Impairment, str]]  # vlan → (impairment, direction)


def _console_window(text: str) -> str:
    """The end of already searched console text that a match of new lines may still start in:
    CONSOLE_MATCH_SPAN characters at most, from a line start (so ^ means what it says)."""
    if len(text) <= CONSOLE_MATCH_SPAN:
        return text
    cut = text.find("\n", len(text) - CONSOLE_MATCH_SPAN)
    return text[cut + 1:] if cut >= 0 else ""


def _short(command: str | list[str], limit: int = 300) -> str:
    text = command if isinstance(command, str) else shlex.join(command)
    return text if len(text) <= limit else text[:limit] + "…"


@caps.guard_methods  # methods a backend may lack check its capabilities (caps.py)
class Machine:
    def __init__(
        self,
        name: str,
        plan: NodePlan,
        out_dir: Path,
        boot_timeout: float,
        log: Callable[[str], None] | None = None,
        callbacks: list[Callable[[], None]] | None = None,
        network: Network | None = None,
        events: EventLog | None = None,
        keep_state: bool = False,
        *,
        watcher: Watcher | None = None,
        declared_impairments: Impairments | None = None,
        restore_from: Snapshot | None = None,
        global_deadline: Callable[[], float | None] | None = None,
    ) -> None:
        """Everything comes from the caller (the driver, or a test making one machine):
        `callbacks` run before each command; `watcher` is the driver's failure detection, fed
        by the console; `declared_impairments` are applied at each boot; a clone's first start
        restores `restore_from`; `global_deadline()` is the driver's global timeout (monotonic)."""
        self.name = name
        self.plan = plan
        self.out_dir = out_dir
        self.boot_timeout = boot_timeout
        self.callbacks = callbacks or []
        self.events = events if events is not None else EventLog(None)
        self._log = log or stderr_log
        self.network = network if network is not None else Network(no_network(), self._log)
        self.watcher = watcher
        self.declared_impairments: Impairments = dict(declared_impairments or {})
        self._global_deadline = global_deadline or (lambda: None)
        self.forwards: list[PortForward] = []
        # Most stdout + stderr run() keeps in memory per command (execute/succeed/fail too);
        # raise it here or per call with run(max_output=...).
        self.max_output = DEFAULT_MAX_OUTPUT
        self.serial_stdout = False
        self.session = Session(name, plan, out_dir, boot_timeout, log=self.log, events=self.events,
                               network=self.network, keep_state=keep_state, restore_from=restore_from,
                               on_console=self._on_console, on_new_boot=self._boot_setup)

    def __repr__(self) -> str:
        return f"<Machine '{self.name}'>"

    if not TYPE_CHECKING:  # a __getattr__ mypy saw would make it accept any attribute
        def __getattr__(self, name: str) -> Any:
            raise caps.unknown_attribute(self, name)  # names the closest real method

    def log(self, msg: str) -> None:
        self._log(f"{self.name}: {msg}")

    # -- the session's state, read here ---------------------------------------------------------

    @property
    def backend(self) -> Backend:
        return self.session.backend

    @property
    def client(self) -> BackdoorClient | None:
        return self.session.client

    @client.setter
    def client(self, client: BackdoorClient | None) -> None:
        """Tests: drop the connection (the next command opens a new one)."""
        self.session.client = client

    @property
    def booted(self) -> bool:
        return self.session.booted

    @property
    def boot_id(self) -> str | None:
        return self.session.boot_id

    @property
    def boot_ids(self) -> list[str]:
        """One boot id per boot seen, in order."""
        return self.session.boot_ids

    @property
    def reboots_seen(self) -> int:
        return self.session.reboots_seen

    @property
    def going_down(self) -> bool:
        """Shutting down (or rebooting): see watch.SHUTDOWN_MARKER."""
        return self.session.going_down

    @property
    def restore_from(self) -> Snapshot | None:
        return self.session.restore_from

    @property
    def restore_seconds(self) -> float | None:
        """A clone: from the start of its restore until its first command was possible."""
        return self.session.restore_seconds

    @property
    def global_deadline(self) -> float | None:
        """The driver's global timeout (monotonic), if it runs."""
        return self._global_deadline()

    # -- lifecycle ----------------------------------------------------------------------------

    def is_up(self) -> bool:
        return self.session.is_up()

    def start(self, allow_reboot: bool = True) -> None:
        """Launch the VM (does not wait for it: the first command does, as in NixOS)."""
        self.session.start()

    def connect(self) -> BackdoorClient:
        """Start if needed and wait until the agent has said hello (bounded by the boot timeout)."""
        return self.session.connect()

    def watch(self, regex: str, severity: str = "fail", name: str | None = None) -> None:
        """Extension: fail the test (or warn) as soon as this machine's console matches `regex`."""
        if self.watcher is None:
            raise RequestedAssertionFailed(f"{self.name}: no failure detection in this driver")
        self.watcher.add(Rule.make(name or regex, regex, severity, self.name))

    def unwatch(self, name: str) -> None:
        """Extension: stop a rule (e.g. "failed unit" where a test breaks units on purpose) for
        this machine."""
        if self.watcher is not None:
            self.watcher.remove(name, machine=self.name)

    def _on_console(self, line: str) -> None:
        if self.watcher is not None:
            if SHUTDOWN_MARKER.search(line):
                self.session.going_down = True
            self.watcher.feed(self.name, line, SHUTDOWN_QUIET if self.going_down else frozenset())
        if self.serial_stdout:
            print(f"{self.name} # {line}", file=sys.stderr, flush=True)

    def _boot_setup(self) -> None:
        """What every new boot needs before the test's next command (the session calls it):
        its shared directories mounted and the impairments declared for this node (the guest
        engine's tc settings die with the boot)."""
        if self.plan.get("shares"):
            self._wait_for_shares()
        for vlan, (imp, direction) in self.declared_impairments.items():
            self._apply_impairment(vlan, imp, direction)

    def _wait_for_shares(self) -> None:
        """A Debian guest mounts its shares once /tmp is cleaned (ntng-shares runs after
        systemd-tmpfiles-setup, which would empty /tmp/shared), so not before the agent starts:
        starting the unit waits for that job.  A NixOS guest has no such unit (fileSystems)."""
        r = self.run("systemctl start ntng-shares.service", strict=False, timeout=None)
        if r.status != 0 and b"not found" not in r.stderr:
            raise BootError(f"{self.name}: mounting the shared directories failed: "
                            f"{r.stderr.decode(errors='replace').strip()}; "
                            f"{self.execute('journalctl -b -u ntng-shares.service -o cat')[1].strip()}")

    @property
    def clone_id(self) -> str | None:
        """Extension: a clone's id (also in the guest's /run/ntng/clone-id); None otherwise."""
        clone = self.plan.get("clone")
        return str(clone["id"]) if clone else None

    def snapshot(self, name: str) -> Snapshot:
        """Extension: freeze this machine (booted to ready first) into snapshot `name` and let it
        run on; `start_from_snapshot(snap, ["c1", "c2"])` starts clones of it (where the node has
        nixlib's "clone" capability: QEMU with the virtio-serial backdoor)."""
        return clones.take(self, name)

    def wait_for_shutdown(self, timeout: float | None = None) -> None:
        self.session.wait_for_shutdown(timeout)

    def save_journal(self, timeout: float = 20) -> Path | None:
        """Artifact: this boot's journal (the plan's artifacts.journal: out_dir/<machine>/journal.log).  Best effort and
        bounded; the agent is asked directly (no callbacks: a failed test must still get it)."""
        if self.client is None or not self.is_up() or not self.backend.alive():
            return None
        req = P.Exec(argv=["journalctl", "-b", "--no-pager"], timeout_ms=int(timeout * 1000))
        try:
            res = self.client.execute(req, wait=timeout + 5)
        except Exception as e:
            self.log(f"journal not saved: {e}")
            return None
        path = Path(self.plan["artifacts"]["journal"])  # nixlib names it
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(res.stdout)
        return path

    def shutdown(self) -> None:
        """Clean poweroff from inside the guest, then wait for the VMM to exit."""
        self.session.shutdown()

    def crash(self) -> None:
        """Simulate a power loss: the VMM quits at once."""
        self.session.crash()

    def reboot(self) -> None:
        """Ctrl-Alt-Delete; the next command waits for the agent of the new boot."""
        self.session.reboot(lambda: self.send_key("ctrl-alt-delete"))

    def release(self) -> None:
        """Stop everything of this machine, bounded: the backdoor connection is closed first (a
        call blocked on a silent guest returns), then the port forwards; the VMM is killed and
        its threads joined with bounds (backends' release)."""
        if self.client is not None:
            self.client.close()
        for fwd in self.forwards:
            fwd.close()
        self.forwards = []
        self.session.release()

    # -- commands -----------------------------------------------------------------------------

    def run_callbacks(self) -> None:
        for cb in self.callbacks:
            cb()

    def run(
        self,
        command: str | list[str],
        *,
        stdin: bytes | Iterable[bytes] | None = None,
        env: dict[str, str] | None = None,
        cwd: str = "",
        user: str = "",
        timeout: float | None = 900,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        strict: bool = True,
        max_output: int | None = None,
    ) -> ExecResult:
        """Extension: run a command and get stdout, stderr, status and duration separately.

        A string runs under `bash -c 'set -euo pipefail; …'` (strict=True, like NixOS), a list
        runs as argv without a shell.
        """
        self.run_callbacks()
        if isinstance(command, str):
            script = f"set -euo pipefail; {command}" if strict else command
            argv = ["bash", "-c", script]
        else:
            argv = list(command)
        req = P.Exec(
            argv=argv,
            env=[{"key": k, "value": v} for k, v in (env or {}).items()],
            cwd=cwd,
            user=user,
            timeout_ms=int(timeout * 1000) if timeout else 0,
            stdin=stdin is not None,
        )
        wait = self._host_wait(timeout)
        client = self.connect()
        t0 = time.monotonic()
        try:
            try:
                res = client.execute(req, stdin=stdin, on_stdout=on_stdout, on_stderr=on_stderr, wait=wait,
                                     max_output=self.max_output if max_output is None else max_output)
            except ConnectionLost as lost:
                if not self.backend.reconnects or isinstance(lost, GuestStoppedReading):
                    raise
                # vsock: the connection ends with the agent, as a serial port's session would
                raise AgentRestarted(f"{self.name}: the agent went away while the request was running "
                                     f"(a reboot or an agent restart): {lost}") from None
        except BaseException as e:
            self.events.emit("exec", self.name, time.monotonic() - t0, "error",
                             command=_short(command), error=str(e))
            raise
        self.events.emit("exec", self.name, time.monotonic() - t0,
                         "ok" if res.status == 0 else ("timeout" if res.timed_out else "nonzero"),
                         command=_short(command), status=res.status)
        return res

    def _host_wait(self, timeout: float | None) -> float:
        """How long the host waits for a command: its timeout plus COMMAND_WAIT_GRACE; without
        one, until the driver's global timeout plus the grace, else COMMAND_WAIT_NO_TIMEOUT."""
        if timeout:
            return timeout + COMMAND_WAIT_GRACE
        if self.global_deadline is not None:
            return max(0.0, self.global_deadline - time.monotonic()) + COMMAND_WAIT_GRACE
        return COMMAND_WAIT_NO_TIMEOUT

    def execute(
        self,
        command: str,
        check_return: bool = True,
        check_output: bool = True,
        timeout: int | None = 900,
    ) -> tuple[int, str]:
        """NixOS-compatible: (status, stdout).  A timed-out command gives status 124 like
        coreutils' `timeout`."""
        if not check_output:
            # Fire and forget, like NixOS: used for commands that take the machine down.
            client = self.connect()
            threading.Thread(
                target=self._ignore_errors,
                args=(client, P.Exec(argv=["bash", "-c", f"set -euo pipefail; {command}"])),
                daemon=True,
            ).start()
            return (-2, "")
        try:
            r = self.run(command, timeout=timeout)
        except (AgentRestarted, ConnectionLost):
            if not check_return:
                return (-1, "")
            raise
        if r.timed_out:
            return (124, r.output)
        if not check_return:
            return (-1, r.output)
        return (r.status, r.output)

    @staticmethod
    def _ignore_errors(client: BackdoorClient, req: P.Exec) -> None:
        try:
            client.execute(req, wait=3600)
        except Exception:
            pass

    def succeed(self, *commands: str, timeout: int | None = None) -> str:
        output = ""
        for command in commands:
            self.log(f"must succeed: {command}")
            status, out = self.execute(command, timeout=timeout)
            if status != 0:
                self.log(f"output: {out}")
                raise RequestedAssertionFailed(f"command `{command}` failed (exit code {status})")
            output += out
        return output

    def fail(self, *commands: str, timeout: int | None = None) -> str:
        output = ""
        for command in commands:
            self.log(f"must fail: {command}")
            status, out = self.execute(command, timeout=timeout)
            if status == 0:
                raise RequestedAssertionFailed(f"command `{command}` unexpectedly succeeded")
            output += out
        return output

    def _retry_command(
        self, command: str, want_success: bool, timeout: int, command_timeout: int | None = 900
    ) -> str:
        """Run `command` every second until its success is `want_success`; the last output."""
        output = ""

        def check(_last_try: bool) -> bool:
            nonlocal output
            try:
                status, output = self.execute(command, timeout=command_timeout)
            except AgentRestarted as e:  # a reboot under way: the next try reaches the new boot
                self.log(str(e))
                return False
            return (status == 0) == want_success

        self._wait(f"`{command}` to {'succeed' if want_success else 'fail'}", check, timeout)
        return output

    def _wait(self, what: str, check: Callable[[bool], Any], timeout: float) -> None:
        """retry() with a progress line while it waits and an event when it is done."""
        t0 = time.monotonic()

        def progress(elapsed: float) -> None:
            self.log(f"still waiting for {what} ({elapsed:.0f}s of {timeout:.0f}s)")

        try:
            retry(check, timeout, progress)
        except BaseException as e:
            self.events.emit("wait", self.name, time.monotonic() - t0, "timeout"
                             if "timed out" in str(e) else "fail", what=what, error=str(e))
            raise
        self.events.emit("wait", self.name, time.monotonic() - t0, what=what)

    def wait_until_succeeds(self, command: str, timeout: int = 900) -> str:
        self.log(f"waiting for success: {command}")
        return self._retry_command(command, True, timeout, command_timeout=timeout)

    def wait_until_fails(self, command: str, timeout: int = 900) -> str:
        self.log(f"waiting for failure: {command}")
        return self._retry_command(command, False, timeout, command_timeout=timeout)

    def sleep(self, secs: int) -> None:
        self.succeed(f"sleep {secs}")

    # -- systemd ------------------------------------------------------------------------------

    def systemctl(self, q: str, user: str | None = None) -> tuple[int, str]:
        if user is not None:
            q = q.replace("'", "\\'")
            return self.execute(
                f"su -l {user} --shell /bin/sh -c "
                "$'XDG_RUNTIME_DIR=/run/user/`id -u` "
                f"systemctl --user {q}'"
            )
        return self.execute(f"systemctl {q}")

    def start_job(self, jobname: str, user: str | None = None) -> tuple[int, str]:
        return self.systemctl(f"start {jobname}", user)

    def stop_job(self, jobname: str, user: str | None = None) -> tuple[int, str]:
        return self.systemctl(f"stop {jobname}", user)

    def get_unit_info(self, unit: str, user: str | None = None) -> dict[str, str]:
        status, lines = self.systemctl(f'--no-pager show "{unit}"', user)
        if status != 0:
            raise RequestedAssertionFailed(
                f'retrieving systemctl info for unit "{unit}"'
                + ("" if user is None else f' under user "{user}"')
                + f" failed with exit code {status}"
            )
        info = {}
        for line in lines.splitlines():
            m = re.match(r"^([^=]+)=(.*)$", line)
            if m:
                info[m.group(1)] = m.group(2)
        return info

    def get_unit_property(self, unit: str, property: str, user: str | None = None) -> str:
        status, lines = self.systemctl(f'--no-pager show "{unit}" --property="{property}"', user)
        if status != 0:
            raise RequestedAssertionFailed(
                f'retrieving systemctl property "{property}" for unit "{unit}"'
                + ("" if user is None else f' under user "{user}"')
                + f" failed with exit code {status}"
            )
        m = re.match(rf"^{re.escape(property)}=(.*)$", lines.strip())
        if m is None:
            raise RequestedAssertionFailed(
                f'systemctl show --property "{property}" "{unit}" produced invalid output: {lines!r}'
            )
        return m.group(1)

    def wait_for_unit(self, unit: str, user: str | None = None, timeout: int = 900) -> None:
        def check_active(_last_try: bool) -> bool:
            state = self.get_unit_property(unit, "ActiveState", user)
            if state == "failed":
                raise RequestedAssertionFailed(f'unit "{unit}" reached state "{state}"')
            if state == "inactive":
                _, jobs = self.systemctl("list-jobs --full 2>&1", user)
                if "No jobs" in jobs:
                    info = self.get_unit_info(unit, user)
                    if info["ActiveState"] == state:
                        raise RequestedAssertionFailed(
                            f'unit "{unit}" is inactive and there are no pending jobs'
                        )
            return state == "active"

        self.log(f"waiting for unit {unit}" + (f" with user {user}" if user else ""))
        self._wait(f"unit {unit}" + (f" of user {user}" if user else ""), check_active, timeout)

    def require_unit_state(self, unit: str, require_state: str = "active") -> None:
        state = self.get_unit_info(unit)["ActiveState"]
        if state != require_state:
            raise RequestedAssertionFailed(
                f"Expected unit '{unit}' to to be in state '{require_state}' but it is in state '{state}'"
            )

    # -- waiting helpers ----------------------------------------------------------------------

    def wait_for_file(self, filename: str, timeout: int = 900) -> None:
        self.log(f"waiting for file '{filename}'")
        self._retry_command(f"test -e {filename}", True, timeout)

    def wait_for_open_port(self, port: int, addr: str = "localhost", timeout: int = 900) -> None:
        self.log(f"waiting for TCP port {port} on {addr}")
        self._retry_command(f"nc -z {addr} {port}", True, timeout)

    def wait_for_closed_port(self, port: int, addr: str = "localhost", timeout: int = 900) -> None:
        self.log(f"waiting for TCP port {port} on {addr} to be closed")
        self._retry_command(f"nc -z {addr} {port}", False, timeout)

    def wait_for_open_unix_socket(self, addr: str, is_datagram: bool = False, timeout: int = 900) -> None:
        flags = "-uU" if is_datagram else "-U"
        self._retry_command(f"nc -z {flags} {addr}", True, timeout)

    def wait_for_console_text(self, regex: str, timeout: int | None = None) -> None:
        """Wait until the serial console matches `regex`: the lines kept since the VM started
        (the last console.CONSOLE_TAIL_CHARS) and those to come; a match may span lines (up to
        CONSOLE_MATCH_SPAN characters).  timeout=None waits CONSOLE_WAIT_TIMEOUT (NixOS: for
        ever).  MachineExited if the VM exits first (a VM that exits to reboot is restarted)."""
        limit = CONSOLE_WAIT_TIMEOUT if timeout is None else timeout
        self.log(f"waiting for {regex} to appear on console")
        pattern = re.compile(regex)
        deadline = time.monotonic() + limit
        backend, number, text = self.backend, 0, ""

        def matched() -> bool:  # the lines that came since the last look
            nonlocal number, text
            lines, number = backend.console_since(number)
            if not lines:
                return False
            text = _console_window(text) + "\n".join(lines) + "\n"
            return pattern.search(text) is not None

        while True:
            if backend is not self.backend:  # started again: its console starts anew
                backend, number = self.backend, 0
            if matched():
                return
            if backend.proc is not None and not backend.alive():
                if not backend.console_ended and backend.wait_console(number, CONSOLE_EXIT_DRAIN):
                    continue  # its last lines are still coming
                if matched():
                    return
                if self.session.follow_reboot():  # restarted by its backend: a reboot
                    continue
                raise MachineExited(
                    f"{self.name}: the VM exited (status {backend.wait_exit(0)}) while waiting for "
                    f"/{regex}/ on the console\nlast console lines:\n{backend.console_tail()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(f"{self.name}: console did not match /{regex}/ within {limit}s")
            backend.wait_console(number, min(left, 1.0))
            time.sleep(min(CONSOLE_POLL, max(0.0, deadline - time.monotonic())))

    def get_console_log(self) -> str:
        """The console of this boot kept in memory: its last console.CONSOLE_TAIL_CHARS
        characters (everything since the start for a normal boot).  The whole console of every
        boot is in the artifact out_dir/<machine>/console.log."""
        return "\n".join(self.backend.get_console_lines())

    # -- keys, console, screen ----------------------------------------------------------------

    def send_key(self, key: str, delay: float | None = 0.01, log: bool | None = True) -> None:
        key = key_for(key)
        if log:
            self.log(f"sending key {key!r}")
        self.backend.send_key(key)
        if delay:
            time.sleep(delay)

    def send_chars(self, chars: str, delay: float | None = 0.01) -> None:
        self.log(f"sending keys {chars!r}")
        for char in chars:
            self.send_key(char, delay, log=False)

    def send_console(self, chars: str) -> None:
        self.backend.send_console(chars)

    def get_tty_text(self, tty: str) -> str:
        """The text on virtual terminal `tty`, folded to its width (as the NixOS driver reads it)."""
        _status, output = self.execute(
            f"fold -w$(stty -F /dev/tty{tty} size | awk '{{print $2}}') /dev/vcs{tty}")
        return output

    def wait_until_tty_matches(self, tty: str, regexp: str, timeout: int = 900) -> None:
        matcher = re.compile(regexp)

        def tty_matches(last: bool) -> bool:
            text = self.get_tty_text(tty)
            if last:
                self.log(f"Last chance to match /{regexp}/ on TTY{tty}, which currently contains: {text}")
            return len(matcher.findall(text)) > 0

        self._wait(f"/{regexp}/ on TTY{tty}", tty_matches, timeout)

    def dump_tty_contents(self, tty: str) -> None:
        self.execute(f"fold -w 80 /dev/vcs{tty} | systemd-cat")

    def console_interact(self) -> None:
        """Interactive: your terminal on the serial console (lines you type go to it, its
        output is printed) until end of input (Ctrl-D)."""
        def show(line: str) -> None:
            print(f"{self.name} # {line}", flush=True)

        self.start()
        self.backend.console_callbacks.append(show)
        try:
            while True:
                try:
                    line = input()
                except EOFError:
                    break
                self.send_console(line + "\n")
        finally:
            self.backend.console_callbacks.remove(show)

    def shell_interact(self, address: str | None = None) -> None:
        """Interactive: a root shell prompt over the backdoor, one command a line, until
        end of input (Ctrl-D).  `address` (the NixOS driver's socat target) is not needed."""
        self.connect()
        while True:
            try:
                command = input(f"{self.name}$ ")
            except EOFError:
                print()
                break
            if command.strip():
                result = self.run(command, strict=False, timeout=None)
                sys.stdout.write((result.stdout + result.stderr).decode(errors="replace"))

    def switch_root(self) -> None:
        raise RequestedAssertionFailed(
            f"{self.name}: switch_root needs an agent inside the initrd (the NixOS driver's "
            "testing.initrdBackdoor); here the agent starts after the switch to the root fs")

    def _require_display(self, what: str) -> None:
        if not self.plan.get("display"):
            raise RequestedAssertionFailed(
                f"{self.name}: {what} needs a display; this machine has none. Declare it with one: "
                f"`#: nodes.{self.name} = {{ display = true; }};` (mkTest: ntng.vm.display = true; "
                "QEMU q35/pc only)")

    def screenshot(self, filename: str) -> None:
        """As NixOS: a PNG of the screen; no extension gets .png, a bare name goes into out_dir."""
        self._require_display("screenshot")
        path = screen.screenshot_path(filename, self.out_dir)
        self.log(f"making screenshot {path}")
        t0 = time.monotonic()
        screen.save_png(self.backend.screendump, path)
        self.events.emit("screenshot", self.name, time.monotonic() - t0, path=str(path))

    def get_screen_text_variants(self) -> list[str]:
        """OCR of the screen (tesseract): several readings, the best first."""
        self._require_display("get_screen_text")
        return screen.screen_text_variants(self.backend.screendump)

    def get_screen_text(self) -> str:
        self._require_display("get_screen_text")
        return screen.screen_text_variants(self.backend.screendump, first_only=True)[0]

    def wait_for_text(self, regex: str, timeout: int = 900) -> None:
        """Wait until OCR of the screen matches `regex` (any of its readings)."""
        self._require_display("wait_for_text")
        screen.tesseract_path()  # a missing tool fails now, not after the timeout
        self.log(f"waiting for {regex} to appear on screen")

        def screen_matches(last: bool) -> bool:
            variants = self.get_screen_text_variants()
            if last:
                self.log(f"Last OCR attempt failed. Text was: {variants}")
            return any(re.search(regex, text) for text in variants)

        self._wait(f"/{regex}/ on the screen", screen_matches, timeout)

    def wait_for_x(self, timeout: int = 900) -> None:
        """As NixOS: graphical.target reached and the X socket there."""
        def x_ready(_last: bool) -> bool:
            status, _ = self.execute(
                'journalctl -b SYSLOG_IDENTIFIER=systemd | grep "Reached target Current graphical"'
                " && [ -e /tmp/.X11-unix/X0 ]")
            return status == 0

        self._wait("the X server", x_ready, timeout)

    def get_window_names(self) -> list[str]:
        tree = self.succeed("xwininfo -root -tree")
        return re.findall(r'0x[0-9a-f]+ "([^"]*)"', tree)

    def wait_for_window(self, regexp: str, timeout: int = 900) -> None:
        pattern = re.compile(regexp)

        def window_is_visible(last: bool) -> bool:
            names = self.get_window_names()
            if last:
                self.log(f"Last chance to match {regexp} on the window list, which currently contains: "
                         + ", ".join(names))
            return any(pattern.search(n) for n in names)

        self._wait(f"a window matching /{regexp}/", window_is_visible, timeout)

    # -- files --------------------------------------------------------------------------------

    def copy_from_host(self, source: str, target: str, via: str = "protocol") -> None:
        """Copy a host file or directory to `target` in the guest, through the protocol or
        (via="share") through the node's writable shared directory."""
        shares.check_via(via, "copy_from_host")
        src = Path(source)
        if not src.exists():
            raise RequestedAssertionFailed(f"copy_from_host: {source} does not exist on the host")
        self.log(f"copy_from_host {source} -> {target}" + (" (via share)" if via == "share" else ""))
        if via == "share":
            shares.to_guest(self, shares.writable_share(self.plan, self.name), src, target)
            return
        client = self.connect()
        if src.is_dir():
            for root, _dirs, files in os.walk(src):
                rel = Path(root).relative_to(src)
                self.succeed(f"mkdir -p {shlex.quote(str(Path(target) / rel))}")
                for f in files:
                    client.put_file(Path(root) / f, str(Path(target) / rel / f))
        else:
            client.put_file(src, target)

    def copy_from_host_via_shell(self, source: str, target: str) -> None:
        import base64

        data = base64.b64encode(Path(source).read_bytes()).decode()
        t = shlex.quote(target)
        self.succeed(f"mkdir -p \"$(dirname {t})\"", f"echo -n {data} | base64 -d > {t}")

    def copy_from_machine(self, source: str, target_dir: str = "", via: str = "protocol") -> None:
        """Copy a guest file or directory into out_dir/target_dir/basename(source), through the
        protocol or (via="share") through the node's writable shared directory.  The guest's
        names are checked and folders made through dir fds (safepath): nothing lands outside
        out_dir, no symlink is followed; guest symlinks, devices, FIFOs and sockets are skipped
        (and logged), so none is made on the host."""
        shares.check_via(via, "copy_from_machine")
        what = "copy_from_machine"
        name = safepath.source_name(source, what)
        sub = os.path.normpath(target_dir) if target_dir else "."  # the test's own: a/./b is fine
        parts = safepath.components(sub, f"{what}: target_dir") if sub != "." else []
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out_fd = safepath.open_dir(self.out_dir)
        try:
            dest_fd = safepath.make_dirs(out_fd, parts, what)
        finally:
            os.close(out_fd)
        try:
            safepath.check_under(dest_fd, self.out_dir, what)
            if via == "share":
                share = shares.writable_share(self.plan, self.name)
                if self.execute(f"test -e {shlex.quote(source)}")[0] != 0:
                    raise RequestedAssertionFailed(f"{what}: {source} does not exist in {self.name}")
                skipped = shares.from_guest(self, share, source, safepath.fd_path(dest_fd))
            else:
                skipped = self._copy_listed(source, name, dest_fd)
        finally:
            os.close(dest_fd)
        if skipped:
            self.log(f"{what}: skipped {len(skipped)} symlink(s), device(s), FIFO(s) or socket(s) of {source} "
                     f"(never made on the host): {', '.join(skipped[:10])}{' …' if len(skipped) > 10 else ''}")

    def _copy_listed(self, source: str, name: str, dest_fd: int) -> list[str]:
        """The protocol copy: the guest lists `source` (one NUL-ended record per entry: find's
        type letter and the path below source; a first record 'd' or 'f' for source itself)."""
        what = "copy_from_machine"
        q = shlex.quote(source)
        status, listing = self.execute(
            f"if [ -d {q} ]; then cd -- {q} && printf 'd\\0' && find . -mindepth 1 -printf '%y %P\\0'; "
            f"elif [ -f {q} ]; then printf 'f\\0'; else exit 3; fi")
        if status == 3:
            raise RequestedAssertionFailed(f"{what}: {source} does not exist in {self.name}")
        if status != 0:
            raise RequestedAssertionFailed(f"{what}: listing {source} in {self.name} failed (status {status})")
        records = listing.split("\0")
        if records[-1] != "" or records[0] not in ("d", "f"):
            raise safepath.UnsafePath(f"{what}: the listing of {source} from {self.name} is garbled "
                                      f"(starts {listing[:40]!r}); nothing copied")
        client = self.connect()
        if records[0] == "f":
            client.get_file(source, safepath.fd_path(dest_fd, name))
            return []
        skipped: list[str] = []
        root_fd = safepath.make_dirs(dest_fd, [name], what)
        try:
            for rec in records[1:-1]:
                kind, _, rel = rec.partition(" ")
                parts = safepath.components(rel, f"{what}: {source} in {self.name} listed")
                if kind not in ("d", "f"):
                    skipped.append(rel)
                    continue
                fd = safepath.make_dirs(root_fd, parts if kind == "d" else parts[:-1], what)
                try:
                    if kind == "f":
                        client.get_file(f"{source}/{rel}", safepath.fd_path(fd, parts[-1]))
                finally:
                    os.close(fd)
        finally:
            os.close(root_fd)
        return skipped

    copy_from_vm = copy_from_machine

    def copy_to_machine(self, source: str | Path, target: str, mode: int | None = None) -> P.FileDone:
        """Extension: one file, returns size and sha256 as the agent wrote them."""
        return self.connect().put_file(Path(source), target, mode=mode)

    def get_file(self, source: str, target: str | Path) -> P.FileDone:
        """Extension: one guest file to a host path, checked end to end (CRC-32 by default)."""
        return self.connect().get_file(source, target)


    # -- network ------------------------------------------------------------------------------

    def _vlans(self, vlan: int | None) -> list[Interface]:
        return self.network.interfaces(self.name) if vlan is None else [self.network.interface(self.name, vlan)]

    def block(self) -> None:
        """Unplug the machine's network cables (all NICs; the NixOS driver's eth1)."""
        self._set_links(False)

    def unblock(self) -> None:
        self._set_links(True)

    def _set_links(self, up: bool) -> None:
        ifaces = self.network.interfaces(self.name)
        if not ifaces:
            raise RequestedAssertionFailed(f"{self.name}: has no network interfaces to "
                                           f"{'unblock' if up else 'block'} (declare vlans)")
        self.log(f"{'unblock' if up else 'block'}: links {'up' if up else 'down'} on vlan(s) "
                 + ", ".join(str(i["vlan"]) for i in ifaces))
        for i in self.plan["interfaces"]:  # nixlib says who switches each link
            if i["link"] == "vmm":
                self.backend.set_link(i["netdev"], up)
            else:
                self.network.set_link(self.name, i["vlan"], up)

    def link_counters(self, vlan: int | None = None) -> LinkCounters:
        """Extension: bytes and packets the guest sent (tx) and received (rx) on a link (default:
        its first vlan), counted on the host's TAP device: the guest cannot fake them."""
        return self.network.counters(self.name, vlan)

    def impair(self, vlan: int | None = None, direction: str = "both", **params: Any) -> None:
        """Extension: netem on this machine's link(s): delay (ms), jitter (ms), loss, corrupt,
        duplicate, reorder (percent), rate (kbit/s).  direction: "in" (to the guest), "out"
        (from it) or "both".  Calling it again replaces the link's impairment, even while
        traffic flows; impair() with no parameters clears it."""
        imp = netem.Impairment.from_mapping(params, where=f"{self.name}.impair")
        netem.check_direction(direction)
        self._apply_impairment(vlan, None if imp.is_noop else imp, direction)

    def clear_impairment(self, vlan: int | None = None) -> None:
        self._apply_impairment(vlan, None, "both")

    def _apply_impairment(self, vlan: int | None, imp: netem.Impairment | None, direction: str) -> None:
        ifaces = self._vlans(vlan)
        if not ifaces:
            raise RequestedAssertionFailed(f"{self.name}: has no network interfaces to impair (declare vlans)")
        host = self.network.host_impairment()
        if not host and hasattr(self.backend, "check_guest_impairment"):
            self.backend.check_guest_impairment()  # a container: the guest's kernel is the host's
        for i in ifaces:
            what = imp.describe() if imp else "none"
            self.log(f"impairment on vlan {i['vlan']} ({direction}): {what}"
                     + ("" if host else " [in the guest]"))
            # Both directions are (re)set: "in" alone must clear an earlier "out".
            for d in ("in", "out"):
                this = imp if direction in (d, "both") else None
                if host:
                    self.network.impair(self.name, i["vlan"], this, d)
                else:
                    # Guest view: "in" (towards the guest) is the guest's ingress.
                    self.succeed("\n".join(netem.guest_tc_commands(i["guestName"], this, d, i["guestIfb"])))

    def forward_port(self, host_port: int = 8080, guest_port: int = 80) -> None:
        """Forward TCP 127.0.0.1:host_port on the host to guest_port of this machine."""
        what = f"{self.name}:{guest_port}"
        self.network.check_forwarding(self.name)
        self.forwards.append(PortForward(
            host_port, lambda: self.network.connect(self.name, guest_port), what, self.log))
        self.log(f"forwarding 127.0.0.1:{host_port} → {what}")

    # -- QEMU monitor and QMP events (capability "monitor") -----------------------------------

    def send_monitor_command(self, command: str) -> str:
        """A command for QEMU's human monitor (e.g. "info status", or attaching a USB disk with
        drive_add/device_add); its text output.  Through QMP's human-monitor-command."""
        self.run_callbacks()
        self.log(f"sending monitor command: {command}")
        return self._qemu("send_monitor_command").monitor_command(command)

    def wait_for_qmp_event(self, event_filter: Callable[[dict[str, Any]], bool],
                           timeout: int = 60 * 10) -> dict[str, Any]:
        """The first QMP event for which event_filter(event) is true, waiting at most `timeout`
        seconds.  As in NixOS, events are read in order and each once: events that came since
        the VM started and were not read yet count; those the filter rejects are dropped."""
        from .qmp import describe_filter  # local: this section's edits stay in this section

        backend = self._qemu("wait_for_qmp_event")
        self.log(f"waiting for a QMP event matching {describe_filter(event_filter)}")
        t0 = time.monotonic()
        try:
            event = backend.wait_for_qmp_event(event_filter, timeout)
        except WaitTimeout as e:
            self.events.emit("wait", self.name, time.monotonic() - t0, "timeout", what="QMP event", error=str(e))
            raise
        self.events.emit("wait", self.name, time.monotonic() - t0, what=f"QMP event {event.get('event')}")
        return event

    def _qemu(self, method: str) -> QemuBackend:
        """The QEMU backend, for the methods only QEMU has; a plan without capabilities (which
        the guard does not judge) on another backend gets the same error as the guard's."""
        from .backends.qemu import QemuBackend

        if not isinstance(self.backend, QemuBackend):
            raise caps.MissingCapability(f'machine {self.name}: {method}(): backend {self.backend.name} lacks '
                                         'capability "monitor" (QEMU only)')
        return self.backend
