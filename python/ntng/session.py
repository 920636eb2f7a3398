"""Session: one machine's VM and backdoor connection, under the Machine facade.

It owns the backend (the VMM process), the BackdoorClient, the boot ids, and the state machine
of a VM's life: start (or a clone's restore), connect (wait for the agent's hello), notice new
boots (a reboot, or the agent restarting in the same boot), reconnect where the connection
ends with the agent (vsock), reboot, crash, shutdown, release.  Whether a VMM that exited for a
guest reboot is started again is its backend's business (`restart_if_rebooted`); the session
only drops the connection that ended with it.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from . import backdoorkey, backends, clones
from . import protocol as P
from .client import BackdoorClient
from .errors import BackdoorError, BootError, ConnectionLost, WaitTimeout
from .network import Network
from .plan import NodePlan
from .report import EventLog
from .retry import PROGRESS_EVERY
from .snapshots import Snapshot

Log = Callable[[str], None]


def emulated_kernel(plan: NodePlan) -> bool:
    """The guest's kernel runs under TCG: its page cache costs more than the device (put_file
    then asks for direct I/O).  A container's kernel is the host's, whatever `accel` says."""
    return plan.get("backend") != "nspawn" and plan.get("accel") == "tcg"


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Session:
    def __init__(self, name: str, plan: NodePlan, out_dir: Path, boot_timeout: float, *,
                 log: Log, events: EventLog, network: Network, keep_state: bool,
                 restore_from: Snapshot | None, on_console: Callable[[str], None],
                 on_new_boot: Callable[[], None]) -> None:
        self.name = name
        self.plan = plan
        self.out_dir = out_dir
        self.boot_timeout = boot_timeout
        self.log = log  # prefixed with the machine's name
        self.events = events
        self.network = network
        self.keep_state = keep_state
        self.restore_from = restore_from  # a clone: its first start restores this
        self._on_console = on_console
        self._on_new_boot = on_new_boot  # what every new boot needs before the next command
        self.backend = backends.make(name, plan)
        self.client: BackdoorClient | None = None
        self.booted = False
        self.boot_id: str | None = None
        self.boot_ids: list[str] = []  # one per boot seen, in order
        self.reboots_seen = 0
        self.going_down = False  # shutting down (or rebooting): see watch.SHUTDOWN_MARKER
        self.restore_seconds: float | None = None  # a clone: restore → its first command possible
        self._disk_made = False
        self._start_lock = threading.Lock()
        self._boot_setup_due = False  # a new boot awaits on_new_boot
        self._identity_due: float | None = None  # a clone's restore began then; identity pending

    def is_up(self) -> bool:
        return self.booted and self.client is not None and self.client.agent is not None

    # -- starting and connecting ---------------------------------------------------------------

    def start(self) -> None:
        """Launch the VM (does not wait for it: connect() does)."""
        with self._start_lock:
            if self.booted:
                return
            self.log(f"starting {backends.noun(self.backend.name)}")
            # A clone's first start restores its snapshot; later ones boot its own disk.
            restore_from = None if self._disk_made else self.restore_from
            # The disk survives crash()/shutdown() and start() within a run, as a real one
            # would; with -K it also survives the run.
            self.backend = backends.make(self.name, self.plan, preexec=self.network.preexec(),
                                         keep_disk=self.keep_state or self._disk_made)
            self._disk_made = True
            self.backend.console_callbacks.append(self._on_console)
            self.backend.console_artifact = Path(self.plan["artifacts"]["consoleLog"])  # nixlib names it
            if restore_from is not None:
                self._identity_due = time.monotonic()
                clones.restore(self, restore_from)
            else:
                self.backend.start()
            self.booted = True
            self.log(f"{self.backend.title} running (pid {self.backend.pid})")

    def follow_reboot(self) -> bool:
        """Where the VMM exits on a guest reboot, the backend starts it again (its policy):
        then the connection to the old boot is gone.  Whether that happened."""
        if not self.booted or not self.backend.restart_if_rebooted():
            return False
        self.log(f"guest rebooted: {self.backend.title} started again on the same disk "
                 f"(pid {self.backend.pid})")
        self._drop_client()
        return True

    def connect(self) -> BackdoorClient:
        """Start if needed and wait until the agent has said hello (bounded by the boot timeout)."""
        if self.client is not None and self.client.closed and self.backend.reconnects:
            self.client = None  # a vsock connection ends with the agent: open a new one
        self.follow_reboot()
        if self.client is not None and self.client.agent is not None:
            if self._boot_setup_due:
                self._boot_setup()
            return self.client
        self.start()
        t0 = time.monotonic()
        try:
            client, ack = self._await_hello(t0)
        except (WaitTimeout, ConnectionLost, BackdoorError) as e:
            self.events.emit("boot", self.name, time.monotonic() - t0, "error", error=str(e))
            raise BootError(f"{self.name}: {e}; waited {time.monotonic() - t0:.0f}s for {HELLO} "
                            f"(boot timeout {self.boot_timeout:.0f}s). {self._boot_report()}") from None
        self.note_boot(ack.boot_id)
        if self._identity_due is not None:  # a clone's first hello: give it its identity
            started, self._identity_due = self._identity_due, None
            clones.adopt_identity(self, started)
        self.events.emit("boot", self.name, time.monotonic() - t0, boot_id=ack.boot_id)
        self.log(f"connected to agent {ack.agent_version} (boot {ack.boot_id[:8]}, "
                 f"{time.monotonic() - t0:.1f}s)")
        if self._boot_setup_due:
            self._boot_setup()
        return client

    def _boot_report(self) -> str:
        """What the host knows of a guest that did not say hello: the VMM's and its helpers'
        state, what the agent printed on the console (did it start, where does it listen) and
        the console's last lines."""
        state = "running" if self.backend.alive() else "exited: " + self.backend.stderr_tail()
        helpers = self.backend.helpers_report()
        agent = [line for line in self.backend.get_console_lines() if AGENT_MARK in line]
        return "\n".join([
            f"{self.backend.title}: {state}",
            *([f"helpers:\n{helpers}"] if helpers else []),
            "the agent's last lines on the console:\n"
            + ("\n".join(agent[-AGENT_LINES:]) if agent else "(none: it never printed there)"),
            f"last console lines:\n{self.backend.console_tail()}",
        ])

    def _await_hello(self, t0: float) -> tuple[BackdoorClient, P.HelloAck]:
        """Open the backdoor connection (again, where it ends with the agent) until an agent
        says hello; raises WaitTimeout, ConnectionLost or BackdoorError."""
        deadline = t0 + self.boot_timeout
        next_progress = t0 + PROGRESS_EVERY
        next_hello = t0 + HELLO_AGAIN_AFTER
        while True:
            self.follow_reboot()
            if self.client is None:
                try:
                    sock = self.backend.connect_backdoor(timeout=max(0.1, deadline - time.monotonic()))
                except ConnectionLost:
                    if self.follow_reboot():
                        continue
                    raise
                self.client = BackdoorClient(sock, self.name, on_restart=self._on_agent_restart,
                                             key=backdoorkey.read(self.plan),
                                             direct_writes=emulated_kernel(self.plan))
                next_hello = time.monotonic() + HELLO_AGAIN_AFTER
            if not self.backend.alive():
                if self.follow_reboot():
                    continue
                raise ConnectionLost(f"{self.backend.title} exited")
            try:
                return self.client, self.client.wait_ready(
                    min(2.0, max(0.1, deadline - time.monotonic())), HELLO)
            except WaitTimeout:
                if time.monotonic() >= deadline:
                    raise
                if time.monotonic() >= next_hello:
                    # Connected, but no answer: say HELLO again (a new session, which the
                    # protocol allows at any time).  A HELLO the agent missed, e.g. one read
                    # while it was still starting, would otherwise cost the whole boot timeout.
                    next_hello = time.monotonic() + HELLO_AGAIN_AFTER
                    self.client.hello(unless="answered")
            except ConnectionLost:
                # vsock: the agent we reached went away (a reboot, a restart): reach the next
                if not self.backend.reconnects or time.monotonic() >= deadline:
                    raise
                self.client = None
                time.sleep(0.1)
            if time.monotonic() >= next_progress:
                next_progress = time.monotonic() + PROGRESS_EVERY
                self.log(f"still waiting for {HELLO} ({time.monotonic() - t0:.0f}s of "
                         f"{self.boot_timeout:.0f}s)")

    def _boot_setup(self) -> None:
        self._boot_setup_due = False
        self._on_new_boot()

    def note_boot(self, boot_id: str) -> None:
        self.going_down = False  # a new boot's agent (or the same one, still up) answered
        if boot_id != self.boot_id:
            self._boot_setup_due = True
            if self.boot_id is not None:
                self.reboots_seen += 1
            self.boot_ids.append(boot_id)
        self.boot_id = boot_id

    def _on_agent_restart(self, ack: P.HelloAck, previous: P.HelloAck) -> None:
        if ack.boot_id != previous.boot_id:
            self._boot_setup_due = True  # done by the next command (this is the reader thread)
            self.log(f"guest rebooted (boot id {previous.boot_id[:8]} → {ack.boot_id[:8]})")
        else:
            self.log("backdoor agent restarted (same boot)")

    # -- stopping ------------------------------------------------------------------------------

    def wait_for_shutdown(self, timeout: float | None = None) -> None:
        if not self.booted:
            return
        self.log("waiting for the VM to power off")
        limit = timeout if timeout is not None else self.boot_timeout
        if self.backend.wait_exit(limit) is None:
            raise WaitTimeout(f"{self.name}: the VM did not power off within {limit:.0f}s")
        self.stopped()

    def stopped(self) -> None:
        """The VM is gone: release its backend, finish its console.log artifact (written as it
        arrives, console.CONSOLE_ARTIFACT_BYTES at most), forget the connection."""
        self.backend.release()
        self.backend.close_console_artifact()
        self._drop_client()
        self.booted = False

    def _drop_client(self) -> None:
        if self.client is not None:
            self.client.close()
        self.client = None

    def shutdown(self) -> None:
        """Clean poweroff from inside the guest, then wait for the VMM to exit."""
        if not self.booted:
            return
        client = self.connect()
        self.going_down = True
        try:
            client.execute(P.Exec(argv=["systemctl", "poweroff", "--no-block"]), wait=30)
        except BackdoorError:
            pass
        self.wait_for_shutdown()

    def crash(self) -> None:
        """Simulate a power loss: the VMM quits at once."""
        if not self.booted:
            return
        self.log("forced crash")
        self.backend.quit()
        self.stopped()

    def reboot(self, press_reset: Callable[[], None]) -> None:
        """press_reset() (Ctrl-Alt-Delete), then wait for the agent of the new boot."""
        client = self.connect()
        old_boot = self.boot_id
        self.going_down = True
        press_reset()
        if self.backend.restarts_on_reboot:
            if self.backend.wait_exit(self.boot_timeout) is None:
                raise BootError(f"{self.name}: the guest did not reboot within {self.boot_timeout:.0f}s after "
                                f"ctrl-alt-delete\nlast console lines:\n{self.backend.console_tail()}")
            self.connect()  # the backend starts the VM again: it exited for the reboot
            if self.boot_id == old_boot:
                raise BootError(f"{self.name}: the same boot answered after the restart")
            return
        # The agent of the new boot announces itself; wait until the boot id changes.
        deadline = time.monotonic() + self.boot_timeout
        while True:
            try:
                if self.backend.reconnects:  # the old boot's connection closes; connect anew
                    client = self.connect()
                ack = client.wait_ready(max(0.1, deadline - time.monotonic()))
                if ack.boot_id != old_boot:
                    self.note_boot(ack.boot_id)
                    return
            except WaitTimeout:
                pass
            except ConnectionLost:
                if not self.backend.reconnects:
                    raise
            if time.monotonic() >= deadline:
                raise BootError(f"{self.name}: no new boot within {self.boot_timeout:.0f}s after "
                                f"ctrl-alt-delete\nlast console lines:\n{self.backend.console_tail()}")
            time.sleep(0.2)

    def release(self) -> None:
        """Stop the VM, bounded: the connection is closed first (a call blocked on a silent
        guest returns); the VMM is killed and its threads joined with bounds."""
        if self.client is not None:
            self.client.close()
        if self.booted or self.backend.proc is not None:
            if self.backend.alive():
                self.log(f"kill machine (pid {self.backend.pid})")
            self.stopped()


HELLO = "the backdoor agent's hello"
AGENT_MARK = "ntng-agent: "  # how the agent's own log lines start (backdoor/ntng_agent.py log)
AGENT_LINES = 10  # of them in a boot error: where it served, its key, its restarts
# A connected agent that has not answered our HELLO within this long is sent another one: cheap
# (one frame), and an agent answers the newest HELLO only.
HELLO_AGAIN_AFTER = 10.0
