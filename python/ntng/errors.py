"""Exceptions and the exit codes they map to.

The exit code tells a failed test from a broken setup: CI can retry infrastructure trouble
and report real regressions.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_TEST_FAILED = 1  # an assertion in the test script failed
EXIT_USAGE = 2  # bad command line or a test script that does not parse / names nothing
EXIT_SETUP = 3  # the machinery broke: image, QEMU, KVM, a guest that never said hello
EXIT_TIMEOUT = 4  # the global timeout expired


class NtngError(Exception):
    """Base of every error this project raises on purpose."""

    exit_code = EXIT_SETUP


class SetupError(NtngError):
    """The environment can't run the test (missing image or binary, unusable accelerator)."""


class UsageError(NtngError):
    exit_code = EXIT_USAGE


class TestScriptError(UsageError):
    """The test script does not compile or refers to something that does not exist."""


class TestFailure(NtngError):
    """A test-level assertion failed (succeed() of a failing command, a wait that gave up)."""

    exit_code = EXIT_TEST_FAILED


class GlobalTimeout(NtngError):
    exit_code = EXIT_TIMEOUT


class BootError(SetupError):
    """A guest did not come up: names the machine, what was awaited and the console tail."""


class NixEvalError(SetupError):
    """nixlib refused a node description (its `throw` message is the first line)."""


class BackdoorError(NtngError):
    """The backdoor connection broke or the agent reported a failure."""


class ConnectionLost(BackdoorError):
    pass


class AgentRestarted(BackdoorError):
    """The agent said hello again while requests were in flight (agent restart or reboot)."""


class RemoteError(BackdoorError):
    """An ERROR frame from the agent."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class WaitTimeout(NtngError, TimeoutError):
    """A bounded wait expired; the message says what was awaited."""

    exit_code = EXIT_TEST_FAILED


class UnsafePath(TestFailure):
    """A copy was refused: a name would lead outside the output folder or through a symlink."""


class AuthenticationFailed(BackdoorError):
    """The backdoor session was refused: the agent and the runner do not share the run's key
    (or one of them has none), or the agent speaks another protocol version."""


class MachineExited(TestFailure):
    """The VM exited while the test waited for it (e.g. for console text): a crash, a panic,
    a poweroff; the message names the machine, what was awaited and the console's last lines."""


class GuestStoppedReading(ConnectionLost):
    """A frame could not be sent before its deadline, so the host closed the connection: not a
    reboot or an agent restart, and not retried as one."""


class SendTimeout(GuestStoppedReading, WaitTimeout):
    """A frame could not be sent before its deadline: the guest stopped reading.  Half a frame
    may be on the wire, so the connection is closed."""


class MalformedFrame(BackdoorError):
    """The guest answered a request with a frame whose payload does not parse."""


class GuestMisbehaved(BackdoorError):
    """The guest broke the protocol past what the host tolerates (a flood of control frames,
    too many bytes that failed their CRC): the connection is closed."""


class GuestLimitExceeded(BackdoorError):
    """The guest sent more than a stated host-side limit allows; the message names the limit
    and how to raise it."""


class OutputLimitExceeded(GuestLimitExceeded):
    """A command printed more than execute(max_output=...) keeps in memory; it was killed."""


class FileTooLarge(GuestLimitExceeded):
    """A file copied from the guest grew past get_file(max_size=...)."""


class MissingCapability(TestScriptError):
    """The script asked for something this machine's backend (nixlib's effective capabilities of
    the node) or this run's network mode cannot do; the message names the capability."""


class RequestedAssertionFailed(TestFailure):
    """Same name as the NixOS driver's: a test assertion failed."""


class PlanError(SetupError):
    """A plan from nixlib (or a spec file) is not of the shape python/ntng/plan.py types: the
    message names where it came from, the field's path and what was expected."""
