"""The real in-guest agent (backdoor/ntng_agent.py) served over a socketpair in a thread, driven by
the real BackdoorClient: every request type end to end, with real host commands, no VM."""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ntng import protocol as P
from ntng.client import SEND_GRACE, BackdoorClient, ExecResult, _Pending
from ntng.errors import AgentRestarted, NtngError, RemoteError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "backdoor"))
import ntng_agent as agent  # noqa: E402

pytestmark = [
    pytest.mark.timeout(60),
    # an exception escaping an agent or client thread fails the test instead of warning
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]

MiB = 1024 * 1024


class HostConnection(agent.Connection):
    """The agent's end of a socketpair; kill() makes it vanish like a restarted agent process:
    reads end and nothing more is written, so late frames of the old session never arrive."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock.fileno(), sock.fileno())
        self.dead = threading.Event()

    def read(self, n: int) -> bytes:
        while not self.dead.is_set():
            if select.select([self.rfd], [], [], 0.05)[0]:
                return b"" if self.dead.is_set() else super().read(n)
        return b""

    def write(self, data: bytes) -> None:
        with self._lock:
            if self.dead.is_set():
                raise agent.Disconnected("agent stopped")
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(self.wfd, view) :]
                except BlockingIOError:  # the agent's reader batches with the fd non-blocking
                    select.select([], [self.wfd], [], 1.0)
                except OSError as e:
                    raise agent.Disconnected(str(e)) from None

    def writev(self, parts: list[bytes]) -> None:  # data frames: the same "nothing once dead"
        self.write(b"".join(parts))

    def kill(self) -> None:
        with self._lock:
            self.dead.set()


class LocalAgent:
    def __init__(self, sock: socket.socket, connection: type[HostConnection] = HostConnection,
                 key_file: str | None = None) -> None:
        self.sock = sock
        self.connection, self.key_file = connection, key_file
        self.conn: HostConnection | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.conn = self.connection(self.sock)
        self.thread = threading.Thread(
            target=agent.serve, args=(self.conn, time.time_ns(), self.key_file), name="ntng-agent", daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        assert self.conn is not None and self.thread is not None
        self.conn.kill()
        self.thread.join(10)
        assert not self.thread.is_alive(), "agent did not stop"

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(params=["cwd-elsewhere", "cwd-root"])
def pair(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[BackdoorClient, LocalAgent]]:
    """The agent and a client on a socketpair.  Twice: with the agent's working directory the
    test's (a command without a cwd, "/", then goes through Popen and a worker thread), and
    as in a guest, "/" (the same command is served inline on the reader's thread,
    Session.serve_inline, and handed to a worker only when it must)."""
    if request.param == "cwd-root":
        monkeypatch.chdir("/")
        monkeypatch.setattr(agent, "_agent_cwd", lambda: "/")  # read once by the agent otherwise
    with local_pair() as both:
        yield both


@contextlib.contextmanager
def local_pair() -> Iterator[tuple[BackdoorClient, LocalAgent]]:
    """The agent on a socketpair in a thread, a client for it; both stopped at the end."""
    host, guest = socket.socketpair()
    local = LocalAgent(guest)
    local.start()
    client = BackdoorClient(host, name="local")
    try:
        client.wait_ready(10)
        yield client, local
    finally:
        client.close()
        local.stop()
        guest.close()


@pytest.fixture
def client(pair: tuple[BackdoorClient, LocalAgent]) -> BackdoorClient:
    return pair[0]


def sh(client: BackdoorClient, script: str, **kw: object) -> ExecResult:
    wait = kw.pop("wait", 30.0)
    stdin = kw.pop("stdin", None)
    return client.execute(P.Exec(shell=script, **kw), stdin=stdin, wait=wait)  # type: ignore[arg-type]


def test_handshake(client: BackdoorClient) -> None:
    ack = client.wait_ready(1)
    assert ack.version == P.VERSION
    assert ack.agent_version == agent.AGENT_VERSION
    assert ack.hostname == socket.gethostname()
    assert ack.window == P.DEFAULT_WINDOW and ack.max_frame == P.DEFAULT_MAX_FRAME
    assert "exec" in ack.capabilities


def test_exit_code_and_stderr_are_separate(client: BackdoorClient) -> None:
    r = sh(client, "echo out; echo err >&2; echo more; exit 3")
    assert (r.status, r.stdout, r.stderr) == (3, b"out\nmore\n", b"err\n")
    assert r.signal == 0 and not r.timed_out and r.duration > 0
    assert sh(client, "true").status == 0


def test_merge_stderr(client: BackdoorClient) -> None:
    r = sh(client, "echo out; echo err >&2", merge_stderr=True)
    assert r.stdout == b"out\nerr\n" and r.stderr == b""


def test_argv_is_not_interpreted_by_a_shell(client: BackdoorClient) -> None:
    r = client.execute(P.Exec(argv=["printf", "%s|", "a b", "$HOME", "*", "; exit 1"]))
    assert r.status == 0
    assert r.stdout == b"a b|$HOME|*|; exit 1|"


def test_shell_is_interpreted(client: BackdoorClient) -> None:
    r = sh(client, "x=$((6*7)); echo $x | tr 4 X")
    assert r.stdout == b"X2\n"


def test_env(client: BackdoorClient) -> None:
    env = [{"key": "NTNG_A", "value": "one two"}, {"key": "NTNG_B", "value": "ü"}]
    r = sh(client, 'printf "%s,%s" "$NTNG_A" "$NTNG_B"', env=env)
    assert r.stdout == "one two,ü".encode()
    os.environ["NTNG_INHERITED"] = "yes"
    agent._agent_env.cache_clear()  # the agent reads its environment once; this one changed it
    try:
        assert sh(client, 'echo "$NTNG_INHERITED"').stdout == b"yes\n"
        r = client.execute(P.Exec(argv=["env"], clear_env=True, env=[{"key": "ONLY", "value": "1"}]))
    finally:
        del os.environ["NTNG_INHERITED"]
        agent._agent_env.cache_clear()
    lines = sorted(r.stdout.decode().splitlines())
    assert "ONLY=1" in lines and not any(x.startswith("NTNG_INHERITED=") for x in lines)
    assert [x for x in lines if not x.startswith(("ONLY=", "PATH="))] == []


def test_cwd(client: BackdoorClient, tmp_path: Path) -> None:
    (tmp_path / "marker").write_text("here")
    r = client.execute(P.Exec(argv=["cat", "marker"], cwd=str(tmp_path)))
    assert r.stdout == b"here"
    assert sh(client, "pwd").stdout == b"/\n"  # no cwd: the root directory


def test_start_failures_are_remote_errors(client: BackdoorClient, tmp_path: Path) -> None:
    with pytest.raises(RemoteError) as e:
        client.execute(P.Exec(argv=["pwd"], cwd=str(tmp_path / "missing")))
    assert e.value.code == P.ErrorCode.EXEC_FAILED and "missing" in e.value.message
    with pytest.raises(RemoteError) as e:
        client.execute(P.Exec(argv=[str(tmp_path / "no-such-binary")]))
    assert e.value.code == P.ErrorCode.EXEC_FAILED and "no-such-binary" in e.value.message
    with pytest.raises(RemoteError) as e:
        client.execute(P.Exec(argv=["true"], user="ntng-no-such-user"))
    assert e.value.code == P.ErrorCode.EXEC_FAILED
    assert sh(client, "echo still alive").stdout == b"still alive\n"


def test_stdin_to_cat(client: BackdoorClient) -> None:
    r = client.execute(P.Exec(argv=["cat"]), stdin=b"hello\x00world")
    assert (r.status, r.stdout) == (0, b"hello\x00world")
    r = client.execute(P.Exec(argv=["cat"]), stdin=[b"a", b"", b"bc"])
    assert r.stdout == b"abc"
    # no stdin: /dev/null, so cat ends at once
    assert client.execute(P.Exec(argv=["cat"])).stdout == b""


def test_stdin_5mb(client: BackdoorClient) -> None:
    data = os.urandom(5 * MiB)
    r = client.execute(P.Exec(shell="cat; echo done >&2"), stdin=data)
    assert r.status == 0 and r.stderr == b"done\n"
    assert len(r.stdout) == len(data) and r.stdout == data


def test_stdin_ignored_by_the_command(client: BackdoorClient) -> None:
    # more stdin than the window, to a command that never reads it: no hang, no error
    r = client.execute(P.Exec(argv=["true"]), stdin=bytes(3 * MiB), wait=20)
    assert r.status == 0
    assert sh(client, "echo ok").stdout == b"ok\n"


def test_50mb_stdout_arrives_complete_with_bounded_memory(client: BackdoorClient, tmp_path: Path) -> None:
    block = os.urandom(MiB)
    (tmp_path / "block").write_bytes(block)
    expected = hashlib.sha256()
    for _ in range(50):
        expected.update(block)

    got = hashlib.sha256()
    size = 0
    max_buffered = 0

    def on_stdout(chunk: bytes) -> None:
        nonlocal size, max_buffered
        got.update(chunk)
        size += len(chunk)
        for p in list(client._pending.values()):
            max_buffered = max(max_buffered, p.recv_window.buffered)

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        r = client.execute(
            P.Exec(shell="for i in $(seq 50); do cat block; done", cwd=str(tmp_path)),
            on_stdout=on_stdout,
            wait=50,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.status == 0 and r.stdout == b""  # the callback took it all
    assert size == 50 * MiB
    assert got.digest() == expected.digest()
    assert 0 < max_buffered <= client.window
    # client and agent together held a few windows' worth, nowhere near the 50 MiB
    assert peak < 16 * MiB, f"peak traced memory {peak / MiB:.1f} MiB"


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # dead, not yet reaped
    except FileNotFoundError:
        return True


def _wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.02)
    return _gone(pid)


def test_timeout_kills_the_process_group(client: BackdoorClient) -> None:
    t0 = time.monotonic()
    r = sh(client, "sleep 1000 & echo $!; wait", timeout_ms=300)
    assert time.monotonic() - t0 < 10
    assert r.timed_out
    assert r.signal == signal.SIGKILL and r.status == 128 + signal.SIGKILL
    child = int(r.stdout)
    assert _wait_gone(child), f"background child {child} survived the timeout"


def test_timeout_with_a_child_holding_stdout(client: BackdoorClient) -> None:
    # the shell exits at once, but its child keeps stdout open: bounded by timeout + grace
    r = sh(client, "sleep 1000 & echo $!", timeout_ms=200, wait=20)
    assert r.timed_out
    assert _wait_gone(int(r.stdout))


def test_exit_by_signal(client: BackdoorClient) -> None:
    r = sh(client, "echo before; kill -TERM $$; echo after")
    assert r.stdout == b"before\n"
    assert r.signal == signal.SIGTERM and r.status == 128 + signal.SIGTERM
    assert not r.timed_out


@pytest.mark.parametrize("fast", [True, False], ids=["posix_spawn", "popen"])
def test_commands_start_with_default_sigpipe_and_no_blocked_signals(client: BackdoorClient, fast: bool) -> None:
    """Python ignores SIGPIPE; a command must not inherit that (`yes | head` would print
    'Broken pipe' errors instead of ending quietly), on either way the agent starts one (the
    fast one serves commands run in the agent's own cwd)."""
    cwd = os.getcwd() if fast else "/tmp"
    r = client.execute(P.Exec(argv=["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"], cwd=cwd), wait=30)
    masks = {line.split(":")[0]: int(line.split()[1], 16) for line in r.output.splitlines()}
    assert not masks["SigIgn"] & (1 << (signal.SIGPIPE - 1)), r.output
    assert masks["SigBlk"] == 0, r.output


def test_signal_frame_reaches_the_process_group(client: BackdoorClient) -> None:
    results = in_background(lambda: sh(client, "sleep 30.125"))
    # Signalled once sleep runs: a SIGINT between bash's fork and the child's exec reaches a
    # child that still has bash's handler, which only notes it; sleep then ran its 30 s (seen
    # in CI, and 8 times in 40 runs here beside a busy loop, when this waited for a file the
    # script touched before it forked).
    _wait_for(lambda: _running(["sleep", "30.125"]))
    [rid] = list(client._pending)
    client._send(P.Signal(signal.SIGINT).frame(rid))
    r = results.get(timeout=10)
    assert isinstance(r, ExecResult)
    assert r.signal == signal.SIGINT and r.status == 128 + signal.SIGINT


@pytest.mark.parametrize("path", ["posix_spawn", "Popen", "pty"])
def test_commands_start_with_no_signal_ignored(client: BackdoorClient, tmp_path: Path, path: str) -> None:
    """An agent started with signals ignored (a background job of a non-interactive shell
    ignores SIGINT and SIGQUIT, nohup ignores SIGHUP) must not pass that on: a SIGNAL frame or
    a timeout's kill would then not stop the command.  Dispositions are the agent's at its
    start, so the test clears what the agent read of them."""
    ignored = (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in ignored}
    _forget_agent_signals()
    try:
        # the fast way serves commands run in the agent's own cwd (the guest's agent runs in /)
        kw: dict[str, object] = {"posix_spawn": {"cwd": os.getcwd()}, "Popen": {"cwd": str(tmp_path)},
                                 "pty": {"pty": True}}[path]
        r = client.execute(P.Exec(argv=["grep", "SigIgn", "/proc/self/status"], **kw))  # type: ignore[arg-type]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _forget_agent_signals()
    assert r.status == 0, r
    mask = int(r.stdout.split()[1], 16)
    # Signals 32 and 33 are glibc's own (not in valid_signals, refused by sigaddset): its
    # posix_spawn child ignores them, and a glibc program sets them up when it uses them.
    assert [s for s in signal.valid_signals() if mask & (1 << (s - 1))] == [], r.stdout


def _forget_agent_signals() -> None:
    forget = getattr(agent, "_ignored_signals", None)
    if forget is not None:
        forget.cache_clear()


@pytest.mark.parametrize("delay", [0.01, 0.3], ids=["within_the_inline_reap", "after_it"])
@pytest.mark.parametrize("how", ["argv", "shell"])
def test_a_command_that_closes_its_output_before_it_exits(client: BackdoorClient, delay: float, how: str) -> None:
    """Its output ends first, its exit comes later: served inline, the agent waits for that
    exit (a pidfd) and must reap it before the EXIT; a longer wait goes to a worker.  An agent
    that reported without reaping crashed on the missing status (found by a bench run)."""
    script = f"exec >&- 2>&-; sleep {delay}; exit 3"
    req = P.Exec(argv=["sh", "-c", script], cwd=os.getcwd()) if how == "argv" else P.Exec(shell=script, cwd=os.getcwd())
    for _ in range(3):
        r = client.execute(req, wait=30)
        assert (r.status, r.signal, r.timed_out, r.output) == (3, 0, False, "")
    assert client.execute(P.Exec(argv=["true"], cwd=os.getcwd()), wait=30).status == 0  # the agent lives


def test_commands_run_under_the_normal_scheduling_policy(pair: tuple[BackdoorClient, LocalAgent]) -> None:
    """The agent waits for a command's output and exit under SCHED_BATCH (no wake-up
    preemption of the command); the command itself and the agent's threads afterwards run
    under SCHED_OTHER, the policy a test's commands expect.  (An inline command's reader
    goes back to SCHED_OTHER just after the EXIT is sent, so the agent gets a moment.)"""
    client, _local = pair
    policy = [sys.executable, "-c", "import os; print(os.sched_getscheduler(0))"]
    # the agent's cwd: inline, posix_spawn; another cwd: Popen, pumped by a worker thread
    for cwd in (os.getcwd(), "/"):
        r = client.execute(P.Exec(argv=policy, cwd=cwd))
        assert r.status == 0 and int(r.stdout) == os.SCHED_OTHER, (cwd, r)

    def policies() -> dict[int, int]:
        return {int(t): os.sched_getscheduler(int(t)) for t in os.listdir("/proc/self/task")}

    _wait_for(lambda: set(policies().values()) == {os.SCHED_OTHER}, 5)  # the agent's threads too


def in_background(fn: Callable[[], object]) -> queue.SimpleQueue[object]:
    """Run fn on a daemon thread; its result or exception arrives on the returned queue."""
    results: queue.SimpleQueue[object] = queue.SimpleQueue()

    def run() -> None:
        try:
            results.put(fn())
        except BaseException as e:
            results.put(e)

    threading.Thread(target=run, daemon=True).start()
    return results


def _wait_for(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.01)


def _running(argv: list[str]) -> bool:
    """A process with this command line exists (its exec done: a forked shell still shows the
    shell's)."""
    want = "\0".join(argv).encode() + b"\0"
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmdline.read_bytes() == want:
                return True
        except OSError:
            continue  # it ended meanwhile
    return False


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_put_and_get_20mb_file(client: BackdoorClient, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(20 * MiB))
    src.chmod(0o640)
    target = tmp_path / "guest" / "deep" / "dir" / "file.bin"
    done = client.put_file(src, str(target), timeout=50)
    assert done.size == 20 * MiB and done.sha256.hex() == _sha(src)
    assert _sha(target) == _sha(src)
    assert target.stat().st_mode & 0o7777 == 0o640
    assert not [p for p in target.parent.iterdir() if p.name != "file.bin"]  # no temp file left

    target.chmod(0o604)
    back = tmp_path / "back.bin"
    done = client.get_file(str(target), back, timeout=50)
    assert done.size == 20 * MiB and done.mode == 0o604
    assert _sha(back) == _sha(src)
    assert back.stat().st_mode & 0o7777 == 0o604
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def _direct_writers(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes the agent's DirectWriters finished with (one entry per O_DIRECT put)."""
    finished: list[int] = []
    real = agent.DirectWriter.finish

    def finish(self: agent.DirectWriter) -> None:
        real(self)
        finished.append(self.size)

    monkeypatch.setattr(agent.DirectWriter, "finish", finish)
    return finished


@pytest.mark.parametrize(("size", "asked"), [
    (agent.DIRECT_FROM + 12345, True), (3 * agent.DIRECT_CHUNK, True), (agent.DIRECT_FROM - 1, True),
    (agent.DIRECT_FROM + 12345, False),
], ids=["unaligned-tail", "whole-chunks", "below-the-threshold", "not-asked"])
def test_large_puts_are_written_direct_with_their_exact_size(
    client: BackdoorClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int, asked: bool
) -> None:
    """In a TCG guest buffered writes into ext4 ran at 58-72 MB/s, O_DIRECT ones at 510-1210:
    asked (FLAG_DIRECT), a file of DIRECT_FROM or more goes through an aligned staging buffer,
    the last page padded and the file cut back to its size."""
    finished = _direct_writers(monkeypatch)
    client.direct_writes = asked
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(size))
    target = tmp_path / "guest" / "big.bin"
    done = client.put_file(src, str(target), timeout=50)
    assert done.size == size == target.stat().st_size
    assert _sha(target) == _sha(src)
    assert finished == ([size] if asked and size >= agent.DIRECT_FROM else [])
    assert [p.name for p in target.parent.iterdir()] == ["big.bin"]


def test_a_filesystem_without_direct_io_gets_plain_writes(
    client: BackdoorClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two refusals, as filesystems give them: O_DIRECT at open (tmpfs before Linux 6.6) and at
    the first write after an open that accepted it (EINVAL both): the put completes either way."""
    real_open, real_write = os.open, os.write
    refused: list[str] = []

    def open_refusing(path: str, flags: int, *args: int, **kw: object) -> int:
        if flags & os.O_DIRECT and "no-open" in str(path):
            refused.append("open")
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args, **kw)  # type: ignore[arg-type]

    def write_refusing(fd: int, data: bytes) -> int:
        if agent._is_direct(fd):
            refused.append("write")
            raise OSError(22, "Invalid argument")
        return real_write(fd, data)

    client.direct_writes = True
    monkeypatch.setattr(os, "open", open_refusing)
    monkeypatch.setattr(os, "write", write_refusing)
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(agent.DIRECT_FROM + agent.DIRECT_CHUNK + 777))
    for name in ("no-open.bin", "no-write.bin"):
        refused.clear()
        done = client.put_file(src, str(tmp_path / name), timeout=50)
        assert done.size == src.stat().st_size
        assert _sha(tmp_path / name) == _sha(src)
        assert refused == (["open"] if name == "no-open.bin" else ["write"])


class TappedConnection(HostConnection):
    """Records the FILE_DATA payload sizes the agent reads and writes."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.taps = {"read": P.Decoder(), "written": P.Decoder()}
        self.sizes: dict[str, list[int]] = {"read": [], "written": []}

    def _tap(self, way: str, data: bytes | memoryview) -> None:
        self.taps[way].feed(data)
        for ev in self.taps[way].events():
            if isinstance(ev, P.Frame) and ev.type == P.FrameType.FILE_DATA and ev.payload:
                self.sizes[way].append(len(ev.payload))

    def read(self, n: int) -> bytes:
        data = super().read(n)
        self._tap("read", data)
        return data

    def write(self, data: bytes) -> None:
        super().write(data)
        self._tap("written", data)


def test_copies_use_frames_as_large_as_both_sides_allow(tmp_path: Path) -> None:
    """Per-frame work is what costs in a TCG guest: put_file's frames were cut at 64 KiB
    (CHUNK) whatever both sides had agreed on."""
    host, guest = socket.socketpair()
    local = LocalAgent(guest, TappedConnection)
    local.start()
    client = BackdoorClient(host, name="local")
    try:
        client.wait_ready(10)
        frame = client._frame_size()
        assert frame == P.DEFAULT_MAX_FRAME > P.CHUNK
        src = tmp_path / "src.bin"
        src.write_bytes(os.urandom(4 * frame + 5))
        client.put_file(src, str(tmp_path / "in-guest.bin"), timeout=30)
        client.get_file(str(tmp_path / "in-guest.bin"), tmp_path / "back.bin", timeout=30)
        assert _sha(tmp_path / "back.bin") == _sha(src)
        tap = local.conn
        assert isinstance(tap, TappedConnection)
        assert tap.sizes["read"] == [frame] * 4 + [5]
        assert tap.sizes["written"] == [frame] * 4 + [5]
    finally:
        client.close()
        local.stop()
        guest.close()


def test_put_file_mode_override_and_empty_file(client: BackdoorClient, tmp_path: Path) -> None:
    src = tmp_path / "empty"
    src.write_bytes(b"")
    done = client.put_file(src, str(tmp_path / "out" / "empty"), mode=0o755)
    assert done.size == 0
    assert (tmp_path / "out" / "empty").stat().st_mode & 0o7777 == 0o755
    back = tmp_path / "empty.back"
    assert client.get_file(str(tmp_path / "out" / "empty"), back).size == 0
    assert back.read_bytes() == b""


@pytest.mark.parametrize("size", [10, 3 * MiB], ids=["small", "larger-than-window"])
def test_put_file_to_an_uncreatable_directory(client: BackdoorClient, tmp_path: Path, size: int) -> None:
    src = tmp_path / "src"
    src.write_bytes(bytes(size))
    (tmp_path / "plain-file").write_text("not a directory")
    target = tmp_path / "plain-file" / "sub" / "x"
    with pytest.raises(RemoteError) as e:
        client.put_file(src, str(target), timeout=20)
    assert e.value.code == P.ErrorCode.FILE_FAILED
    assert "plain-file" in e.value.message
    assert sh(client, "echo ok").stdout == b"ok\n"


def test_get_missing_file(client: BackdoorClient, tmp_path: Path) -> None:
    missing = tmp_path / "does" / "not-exist"
    local = tmp_path / "local"
    with pytest.raises(RemoteError) as e:
        client.get_file(str(missing), local)
    assert e.value.code == P.ErrorCode.FILE_FAILED
    assert str(missing) in e.value.message
    assert not local.exists() and not list(tmp_path.glob(".local*"))


def test_concurrent_executes_from_8_threads(client: BackdoorClient) -> None:
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for j in range(5):
                r = sh(client, f"echo out-{i}-{j}; echo err-{i}-{j} >&2; head -c {i * 7919} /dev/zero; exit {i + j}")
                assert r.status == i + j
                assert r.stdout == f"out-{i}-{j}\n".encode() + bytes(i * 7919)
                assert r.stderr == f"err-{i}-{j}\n".encode()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(50)
    assert not errors, errors
    assert not client._pending


def test_garbage_between_requests_is_skipped(pair: tuple[BackdoorClient, LocalAgent]) -> None:
    client, local = pair
    assert local.conn is not None
    noise = b"[    3.141592] console noise\r\n" * 50 + P.MAGIC + b"forged header" + P.MAGIC[:2]
    # host -> agent: the agent skips it and still answers
    client._send(noise)
    assert sh(client, "echo after host noise").stdout == b"after host noise\n"
    # agent -> host: the client skips it and counts it
    before = client.garbage_bytes
    local.conn.write(noise)
    assert client.ping() >= 0
    assert client.garbage_bytes - before == len(noise)
    assert sh(client, "echo after agent noise").stdout == b"after agent noise\n"


def test_end_of_stream_frames_are_not_handed_to_the_caller(client: BackdoorClient) -> None:
    """A command's EOFs and EXIT arrive together; only the EXIT wakes the caller (every reader
    of data frames skipped the empty ones)."""
    rid = 0x7FFF0002
    pending = _Pending(rid, P.SendWindow(1), P.ReceiveWindow(1 << 20), queue.SimpleQueue())
    client._pending[rid] = pending
    try:
        for ftype in (P.FrameType.STDOUT, P.FrameType.STDERR, P.FrameType.FILE_DATA):
            client._dispatch(P.Frame(ftype, rid, b""))
        assert pending.frames.empty()
        client._dispatch(P.Frame(P.FrameType.STDOUT, rid, b"data"))
        assert pending.frames.get_nowait().payload == b"data"
    finally:
        client._close(pending)
    r = sh(client, "echo out; echo err >&2")
    assert (r.stdout, r.stderr, r.status) == (b"out\n", b"err\n", 0)


def test_a_command_ends_with_its_exit_alone(client: BackdoorClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent sends no end-of-stream frame for a command's STDOUT or STDERR: the EXIT ends
    them (two frames fewer to build, send and decode per command).  Every way a command is
    served: inline or by a worker (the fixture's two working directories), with stdin, on a
    terminal, and output that outlives the inline path."""
    seen: list[P.Frame] = []
    dispatch = client._dispatch

    def record(frame: P.Frame) -> None:
        seen.append(frame)
        dispatch(frame)

    monkeypatch.setattr(client, "_dispatch", record)
    cases = [
        (P.Exec(shell="echo out; echo err >&2"), None, (b"out\n", b"err\n")),
        (P.Exec(shell="cat; echo err >&2"), b"in", (b"in", b"err\n")),
        (P.Exec(shell="echo tty", pty=True), None, (b"tty\r\n", b"")),
        (P.Exec(shell="head -c 3000000 /dev/zero; sleep 0.3; echo end >&2"), None,
         (bytes(3_000_000), b"end\n")),
    ]
    for req, stdin, (out, err) in cases:
        seen.clear()
        r = client.execute(req, stdin=stdin, wait=30)
        assert (r.stdout, r.stderr, r.status) == (out, err, 0), req
        assert seen[-1].type == P.FrameType.EXIT
        empty = [f.type for f in seen if f.type in (P.FrameType.STDOUT, P.FrameType.STDERR) and not f.payload]
        assert empty == [], f"{req}: end-of-stream frames sent: {empty}"


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _fd_targets() -> set[str]:
    targets = set()
    for fd in _open_fds():
        try:
            targets.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass  # closed meanwhile
    return targets


def test_ready_pipes_leak_no_fd_and_reach_no_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent makes the next inline command's pipes ahead (ReadyPipes).  Whatever the
    commands do (fail to start, merge stderr, outlive the inline path, print much), a command
    sees no pipe but its own stdout and stderr, and once the host is gone the agent holds no
    fd it did not hold before (this process is the agent)."""
    monkeypatch.chdir("/")
    monkeypatch.setattr(agent, "_agent_cwd", lambda: "/")  # as in a guest: commands inline
    agent._devnull()  # opened once for the agent's life, on its first command: not a leak
    before = _open_fds()
    inherited = _fd_targets()  # pytest's own pipes, passed on to every child of this process
    with local_pair() as (client, _local):
        for round_ in range(3):
            listing = client.execute(P.Exec(argv=["ls", "-l", "/proc/self/fd"]), wait=30).stdout.decode()
            pipes = {line.split()[-3]: line.split()[-1] for line in listing.splitlines() if "pipe:" in line}
            assert {fd for fd, pipe in pipes.items() if pipe not in inherited} == {"1", "2"}, listing
            with pytest.raises(RemoteError) as e:
                client.execute(P.Exec(argv=["no-such-binary-ntng"]), wait=30)
            assert e.value.code == P.ErrorCode.EXEC_FAILED
            r = client.execute(P.Exec(shell="echo out; echo err >&2", merge_stderr=True), wait=30)
            assert r.stdout == b"out\nerr\n" and r.stderr == b""
            r = sh(client, f"head -c {5 * MiB} /dev/zero; echo {round_} >&2")  # past the window
            assert (len(r.stdout), r.stderr) == (5 * MiB, f"{round_}\n".encode())
            r = sh(client, "sleep 1.2; echo late")  # past INLINE_FOR: a worker ends it
            assert r.stdout == b"late\n"
            assert sh(client, "echo after").stdout == b"after\n"
    deadline = time.monotonic() + 10
    while _open_fds() - before and time.monotonic() < deadline:
        time.sleep(0.05)  # a worker may still be closing a finished command's pipes
    left = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in _open_fds() - before}
    assert left == {}, left


def _bash_c(script: str) -> P.Exec:
    """A command as Machine.run sends a string: `bash -c 'set -euo pipefail; …'`."""
    return P.Exec(argv=["bash", "-c", f"set -euo pipefail; {script}"])


def _children() -> dict[int, str]:
    """This process's child processes (the local agent's commands), pid → command line."""
    found = {}
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            for pid in Path(f"/proc/self/task/{task}/children").read_text().split():
                with contextlib.suppress(OSError):
                    found[int(pid)] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return found


def _state(pid: int) -> str:
    """A process's state letter from /proc ("" when it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def _waiters() -> list[int]:
    return [pid for pid, cmdline in _children().items() if cmdline.startswith("bash -c ") and "__ntng" in cmdline]


KEPT_SHELLS: list[int] = []  # pids of the waiting shells a session took (Session.shell_started)


def _waiting_shell() -> int:
    """The one waiting shell, once the agent holds it: its process exists as soon as it is
    exec'd, but the starter thread (SCHED_IDLE: on a busy machine that can take a while) hands
    it to the session after that, and a command sent in between spawns its own bash (CI)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        waiters = _waiters()
        if len(waiters) == 1 and waiters[0] in KEPT_SHELLS:
            return waiters[0]
        time.sleep(0.02)
    raise AssertionError(f"no single waiting shell held by the agent after a bash -c command: "
                         f"{_children()}, held {KEPT_SHELLS}")


@pytest.fixture
def kept_shells(monkeypatch: pytest.MonkeyPatch) -> None:
    """Record each waiting shell a session keeps (KEPT_SHELLS), for _waiting_shell."""
    started = agent.Session.shell_started

    def recorded(self: agent.Session, shell: agent.ShellWaiter | None, epoch: int) -> None:
        started(self, shell, epoch)
        if shell is not None and self.shell is shell:
            KEPT_SHELLS.append(shell.proc.pid)

    monkeypatch.setattr(agent.Session, "shell_started", recorded)


@pytest.fixture
def inline_pair(monkeypatch: pytest.MonkeyPatch, kept_shells: None) -> Iterator[tuple[BackdoorClient, LocalAgent]]:
    """The agent as in a guest: its cwd "/", commands served inline."""
    monkeypatch.chdir("/")
    monkeypatch.setattr(agent, "_agent_cwd", lambda: "/")
    with local_pair() as both:
        yield both


def test_a_bash_command_runs_in_a_shell_started_before_it(inline_pair: tuple[BackdoorClient, LocalAgent]) -> None:
    """After a `bash -c` command the agent starts the next one's bash (ShellWaiter): the
    next `bash -c` command only hands it its script, and its shell is a process that was
    running before the EXEC was sent (its start time in /proc, in clock ticks since boot)."""
    client, _ = inline_pair
    assert client.execute(_bash_c("true"), wait=30).status == 0
    waiter = _waiting_shell()
    assert os.sched_getscheduler(waiter) == os.SCHED_IDLE, "a waiting shell must take only idle CPU"
    time.sleep(0.3)  # its start time well before the EXEC (clock ticks: 10 ms)
    sent = time.clock_gettime(time.CLOCK_BOOTTIME)
    r = client.execute(_bash_c("echo $$; cut -d ' ' -f 22 /proc/$$/stat"), wait=30)
    pid, ticks = (int(x) for x in r.stdout.split())
    started = ticks / os.sysconf("SC_CLK_TCK")
    assert started < sent - 0.1, f"the command's shell {pid} started {started - sent:+.2f}s after its EXEC was sent"
    assert r.stderr == b""


# Scripts whose status, stdout and stderr must be what `bash -c` gives (run on this machine's
# bash for the comparison): errors of set -e / -u / pipefail, messages with line numbers, $0,
# the fds and the environment a command sees, stdin, traps, quoting, a large script.
SAME_AS_BASH_C = [
    "true", "exit 7", "false; echo not here", "echo $undefined_ntng_var", "false | true; echo piped",
    "no-such-command-ntng", "echo \"$0\" \"$LINENO\" \"$#\" \"${BASH_SOURCE[0]:-none}\"; echo \"$-\"",
    "echo one\necho two >&2\nno-such-command-ntng\necho unreached", "return 3", "(( 1 / 0 ))",
    "ls /proc/self/fd | sort -n | awk '$1 < 10' | tr '\\n' ' '",  # 10 and up: pytest's, inherited
    "env | grep -v '^_=' | sort", "cat; echo \"[stdin ended]\"",
    "echo \"[$_]\"", "trap 'echo trapped $?' EXIT; exit 5", "printf '%s|' \"a b\" 'c\\\\d' \"$((6 * 7))\" 'é ü'",
    "x=" + "y" * 100_000 + "; echo ${#x}", "echo \"$IFS\" | od -c | head -1", "set -o | grep -E 'errexit|nounset|pipefail'",
    "ps -o cls=,ni= -p $$", "shopt | md5sum", "declare -p | grep -v -E '^declare -(-|r|ir|ar) (_|BASH|PPID|SHLVL|RANDOM|SRANDOM|EPOCH|SECONDS|LINENO|BASHPID|COLUMNS|LINES|PIPESTATUS)' | md5sum",
]


@pytest.mark.parametrize("script", SAME_AS_BASH_C, ids=range(len(SAME_AS_BASH_C)))
def test_a_prestarted_shell_runs_a_script_as_bash_c_does(inline_pair: tuple[BackdoorClient, LocalAgent],
                                                          script: str) -> None:
    client, _ = inline_pair
    client.execute(_bash_c("true"), wait=30)  # the next one's shell is started after it
    _waiting_shell()
    r = client.execute(_bash_c(script), wait=30)
    want = subprocess.run(["bash", "-c", f"set -euo pipefail; {script}"], capture_output=True, cwd="/",
                          stdin=subprocess.DEVNULL, env=agent._command_env(), start_new_session=True)
    assert (r.status, r.stdout, r.stderr) == (want.returncode, want.stdout, want.stderr)


def test_a_prestarted_shell_differs_from_bash_c_only_in_these_ways(inline_pair: tuple[BackdoorClient, LocalAgent]) -> None:
    """What a script can tell: a syntax error's message has no `-c: line N` (still status 2,
    nothing run), and the shell's command line is the waiter's (so `pgrep -f` no longer finds
    the command's own shell, as with the NixOS driver's long-running shell)."""
    client, _ = inline_pair
    client.execute(_bash_c("true"), wait=30)
    _waiting_shell()
    r = client.execute(_bash_c("echo ran; if"), wait=30)
    assert r.status == 2 and r.stdout == b"" and b"syntax error" in r.stderr and b"-c:" not in r.stderr, r
    _waiting_shell()
    r = client.execute(_bash_c("pgrep -f 'unique-ntng-marker' || echo none"), wait=30)
    assert r.stdout == b"none\n", r


def test_a_prestarted_shell_that_died_is_replaced(inline_pair: tuple[BackdoorClient, LocalAgent]) -> None:
    """A waiting shell killed from outside (a test's `pkill bash`): the next command starts its
    own bash and gets its right result; the dead one is reaped."""
    client, _ = inline_pair
    for _ in range(3):
        client.execute(_bash_c("true"), wait=30)
        waiters = [_waiting_shell()]
        os.kill(waiters[0], signal.SIGKILL)
        deadline = time.monotonic() + 5
        while _state(waiters[0]) not in ("Z", "") and time.monotonic() < deadline:
            time.sleep(0.01)  # dead (a command sent before it died would be killed with it)
        r = client.execute(_bash_c("echo ok; echo err >&2; exit 3"), wait=30)
        assert (r.status, r.stdout, r.stderr) == (3, b"ok\n", b"err\n")
        deadline = time.monotonic() + 5
        while waiters[0] in _children() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert waiters[0] not in _children(), "the killed shell was not reaped"


def test_commands_unlike_bash_c_keep_the_prestarted_shell(inline_pair: tuple[BackdoorClient, LocalAgent]) -> None:
    """Only `bash -c SCRIPT` with the agent's environment, cwd and user, no stdin and stderr
    apart goes to the waiting shell; the others start as before and leave it waiting."""
    client, _ = inline_pair
    client.execute(_bash_c("true"), wait=30)
    waiter = [_waiting_shell()]
    others = [
        P.Exec(argv=["bash", "-c", "echo $NTNG_X"], env=[{"key": "NTNG_X", "value": "set"}]),
        P.Exec(argv=["bash", "-c", "pwd"], cwd="/tmp"),
        P.Exec(argv=["bash", "-c", "echo out; echo err >&2"], merge_stderr=True),
        P.Exec(argv=["bash", "-c", "cat"], stdin=True),
        P.Exec(argv=["bash", "--norc", "-c", "echo x"]),
        P.Exec(argv=["/bin/echo", "plain"]),
    ]
    outs = [client.execute(e, stdin=b"in" if e.stdin else None, wait=30).stdout for e in others]
    assert outs == [b"set\n", b"/tmp\n", b"out\nerr\n", b"in", b"x\n", b"plain\n"]
    assert _waiters() == waiter, "a command unlike bash -c used or replaced the waiting shell"


def test_a_shell_waits_for_the_host_to_be_quiet_before_it_starts(
        inline_pair: tuple[BackdoorClient, LocalAgent], monkeypatch: pytest.MonkeyPatch) -> None:
    """The next command's shell starts only after the host has sent nothing for SHELL_QUIET:
    one that loads while a request is served costs that request (the twelfth round), and the
    host's next request mostly comes at once.  While PINGs keep coming, none starts; once
    they stop, one does, no sooner than SHELL_QUIET after the last."""
    client, _local = inline_pair
    quiet = 0.5  # the agent's 10 ms, widened: a test thread stalled that long would start it
    monkeypatch.setattr(agent, "SHELL_QUIET", quiet)
    starts: list[float] = []
    start = agent.SHELLS.start

    def recorded(*args: object) -> None:
        starts.append(time.monotonic())
        start(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(agent.SHELLS, "start", recorded)
    assert client.execute(_bash_c("true"), wait=30).status == 0
    busy_until = time.monotonic() + 2 * quiet
    while time.monotonic() < busy_until:
        client.ping()
        last = time.monotonic()
        time.sleep(0.02)
    assert starts == [], "a shell started while the host kept sending"
    _waiting_shell()
    # The agent's quiet period began a little before `last` (its PONG was on the way): a
    # margin for a busy machine's thread wake-ups, and still far from a start at once.
    assert len(starts) == 1 and starts[0] >= last + quiet / 2, (starts, last)


def test_a_prestarted_shell_counts_seconds_from_its_command(inline_pair: tuple[BackdoorClient, LocalAgent]) -> None:
    """$SECONDS counts from the command, not from the shell's start (whole seconds: ≤ 1)."""
    client, _ = inline_pair
    client.execute(_bash_c("true"), wait=30)
    _waiting_shell()
    time.sleep(2.5)
    assert int(client.execute(_bash_c("echo $SECONDS"), wait=30).stdout) <= 1


def test_a_prestarted_shell_obeys_the_timeout_and_signals(inline_pair: tuple[BackdoorClient, LocalAgent]) -> None:
    client, _ = inline_pair
    client.execute(_bash_c("true"), wait=30)
    _waiting_shell()
    t0 = time.monotonic()
    r = client.execute(P.Exec(argv=["bash", "-c", "sleep 30 & wait"], timeout_ms=500), wait=30)
    assert r.timed_out and time.monotonic() - t0 < 10, r
    assert client.execute(_bash_c("echo after"), wait=30).stdout == b"after\n"


def test_no_shell_waits_after_the_session(monkeypatch: pytest.MonkeyPatch, kept_shells: None) -> None:
    """The waiting shell is killed and reaped with its session, and its fds closed."""
    monkeypatch.chdir("/")
    monkeypatch.setattr(agent, "_agent_cwd", lambda: "/")
    agent._devnull()
    before = _open_fds()
    with local_pair() as (client, _local):
        for _ in range(3):
            assert client.execute(_bash_c("echo hi"), wait=30).stdout == b"hi\n"
        _waiting_shell()
    deadline = time.monotonic() + 10
    while (_children() or _open_fds() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _waiters() == [] and _children() == {}, _children()
    left = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in _open_fds() - before}
    assert left == {}, left


def test_a_waiting_shell_is_spawned_with_the_interpreter_free() -> None:
    """The waiting shells' spawn (agent.OpenSpawn, on the starter thread) leaves the GIL to
    the agent's other threads until the child has exec'd: os.posix_spawn holds it, and a PING
    or a command that came then waited for the exec (bench/backdoor.py --idle --ab).  The call
    goes through a CDLL function, around which ctypes releases the lock (a PyDLL one keeps it).
    And a thread that counts while the spawns run counts inside some of them: with the lock
    held through the spawn it never can (0 of 60 in docs/benchmarks.md, the twelfth round).
    It needs a CPU within the spawn's ~0.3 ms to do so, hence a low bar on a busy machine."""
    import ctypes

    spawn = agent._open_spawn()
    assert spawn is not None, "this C library has posix_spawn: the agent must use it"
    assert not spawn._spawn._flags_ & ctypes._FUNCFLAG_PYTHONAPI  # type: ignore[attr-defined]
    stamps: list[float] = []
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            stamps.append(time.perf_counter())

    counter = threading.Thread(target=count)
    counter.start()
    windows = []
    try:
        for _ in range(30):
            t0 = time.perf_counter()
            pid = spawn("/bin/true", ["true"], dict(os.environ), [])
            windows.append((t0, time.perf_counter()))
            os.waitpid(pid, 0)
    finally:
        stop.set()
        counter.join()
    free = sum(bisect.bisect_right(stamps, t0) < bisect.bisect_left(stamps, t1) for t0, t1 in windows)
    assert free >= 3, f"another thread ran inside {free} of 30 spawns"


def test_the_open_spawn_makes_the_child_os_posix_spawn_makes() -> None:
    """Its own session, the signals the agent ignores back to SIG_DFL (Python ignores SIGPIPE
    and SIGXFSZ), nothing blocked, the fds dup'ed where asked, the environment and argv given;
    an exec that fails is OSError."""
    spawn = agent._open_spawn()
    assert spawn is not None
    script = ('read -r sid _ < <(ps -o sess= -p $$); echo "sid=$((sid == $$))"; '
              'grep -E "^Sig(Blk|Ign)" /proc/self/status; echo "$0 $1 $FOO"; ls /proc/self/fd')
    argv, env = ["bash", "-c", script, "zero", "one"], {"FOO": "bar b=c", "PATH": os.defpath}
    outputs = []
    for how in ("open", "os"):
        r, w = os.pipe()
        dups = [(agent._devnull(), 0), (w, 1), (w, 2)]
        if how == "open":
            pid = spawn("/bin/bash", argv, env, dups)
        else:
            pid = os.posix_spawn("/bin/bash", argv, env, setsid=True, setsigdef=agent._ignored_signals(),
                                 setsigmask=(), file_actions=[(os.POSIX_SPAWN_DUP2, f, t) for f, t in dups])
        os.close(w)
        with os.fdopen(r, "rb") as f:
            outputs.append(f.read())
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert outputs[0] == outputs[1]
    lines = outputs[0].decode().splitlines()
    assert lines[:2] == ["sid=1", "SigBlk:\t0000000000000000"], lines
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN  # so the reset is tested
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        assert int(lines[2].split()[1], 16) & (1 << (sig - 1)) == 0, lines
    assert lines[3] == "zero one bar b=c"
    with pytest.raises(OSError):
        spawn("/nonexistent/bash", ["bash"], {}, [])


def test_corrupted_frame_gets_an_error_and_the_connection_continues(client: BackdoorClient) -> None:
    rid = 0x7FFF0001  # far from the ids the client hands out
    pending = _Pending(rid, P.SendWindow(1), P.ReceiveWindow(1), queue.SimpleQueue())
    client._pending[rid] = pending  # listen for the answer to a request we forge by hand
    try:
        wire = bytearray(P.Exec(argv=["true"]).frame(rid))
        wire[-1] ^= 0x55  # payload CRC wrong, header (and its CRC) intact
        client._send(bytes(wire))
        with pytest.raises(RemoteError) as e:
            client._next(pending, time.monotonic() + 10, "the agent's ERROR")
        assert e.value.code == P.ErrorCode.BAD_FRAME
        # an intact frame with an unparsable payload gets BAD_PAYLOAD
        client._send(P.encode_frame(P.FrameType.EXEC, rid, b"\xff\xff\xff"))
        with pytest.raises(RemoteError) as e:
            client._next(pending, time.monotonic() + 10, "the agent's ERROR")
        assert e.value.code == P.ErrorCode.BAD_PAYLOAD
    finally:
        client._close(pending)
    assert sh(client, "echo ok").stdout == b"ok\n"
    assert client.ping() >= 0


def test_ping(client: BackdoorClient) -> None:
    rtts = [client.ping(b"x" * n) for n in (0, 1, 1000)]
    assert all(0 <= t < 5 for t in rtts)


def test_a_plain_connection_is_served(tmp_path: Path) -> None:
    """The agent's own Connection (what a guest runs; the other tests use a subclass): lone
    PINGs, a PING cut across reads, commands, a copy both ways, and the end of the connection
    ending serve()."""
    host, guest = socket.socketpair()
    thread = threading.Thread(target=agent.serve, args=(agent.Connection(guest.fileno(), guest.fileno()),
                                                        time.time_ns()), daemon=True)
    thread.start()
    client = BackdoorClient(host, name="plain")
    try:
        client.wait_ready(10)
        for _ in range(3):
            assert client.ping() < 5
        answered: queue.SimpleQueue[float] = queue.SimpleQueue()
        client._pongs[b"split"] = answered
        with client._write_lock:  # one PING in two writes: the decoder's path
            frame = P.ping_frame(b"split")
            host.sendall(frame[:7])
            time.sleep(0.05)
            host.sendall(frame[7:])
        answered.get(timeout=5)
        assert client.ping(b"x" * 300) < 5  # a PING too long for the lone path
        r = client.execute(P.Exec(argv=["sh", "-c", "echo out; echo err >&2; exit 3"]))
        assert (r.stdout, r.stderr, r.status) == (b"out\n", b"err\n", 3)
        src = tmp_path / "src"
        src.write_bytes(os.urandom(3 * MiB + 5))
        client.put_file(src, str(tmp_path / "in-guest"))
        client.get_file(str(tmp_path / "in-guest"), tmp_path / "back")
        assert (tmp_path / "back").read_bytes() == src.read_bytes()
    finally:
        client.close()
    thread.join(10)
    assert not thread.is_alive(), "serve() did not end with its connection"
    guest.close()


def test_a_late_constructor_hello_does_not_replace_the_readers_session(monkeypatch: pytest.MonkeyPatch) -> None:
    """The constructor's HELLO races the reader's answer to the agent's ANNOUNCE.  Under load
    (seen in CI) the reader's session was acknowledged first and the constructor's HELLO then
    started a second one, reported as an agent restart.  The constructor's HELLO is delayed
    here so the reader always wins."""
    host, guest = socket.socketpair()
    local = LocalAgent(guest)
    local.start()  # its ANNOUNCE is queued before the client exists
    original = BackdoorClient.hello
    main = threading.current_thread()

    def late_in_constructor(self: BackdoorClient, *args: object, **kw: object) -> None:
        if threading.current_thread() is main:
            _wait_for(lambda: self.agent is not None)
        original(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(BackdoorClient, "hello", late_in_constructor)
    restarts: list[object] = []
    client = BackdoorClient(host, name="local", on_restart=lambda new, old: restarts.append(new))
    try:
        first = client.wait_ready(10)
        assert sh(client, "true").status == 0  # the agent has answered every HELLO by now
        assert restarts == [] and client.agent is first
    finally:
        client.close()
        local.stop()
        guest.close()


def test_agent_restart_fails_pending_requests(pair: tuple[BackdoorClient, LocalAgent], tmp_path: Path) -> None:
    client, local = pair
    started = tmp_path / "started"
    restarts: list[tuple[P.HelloAck, P.HelloAck | None]] = []
    client.on_restart = lambda new, old: restarts.append((new, old))
    results = in_background(lambda: sh(client, f"touch {started}; exec sleep 30"))
    _wait_for(started.exists)
    first_ack = client.agent
    local.restart()  # the old agent vanishes without a word; the new one says ANNOUNCE
    outcome = results.get(timeout=10)
    assert isinstance(outcome, AgentRestarted), outcome
    ack = client.wait_ready(10)
    assert ack is not first_ack
    _wait_for(lambda: bool(restarts))
    assert restarts == [(ack, first_ack)]
    assert sh(client, "echo new session").stdout == b"new session\n"


def test_agent_restart_during_put_file_fails_it(pair: tuple[BackdoorClient, LocalAgent], tmp_path: Path) -> None:
    client, local = pair
    src = tmp_path / "src"
    src.write_bytes(bytes(5 * MiB))  # more than the window: the sender must wait for credit
    local.stop()  # the agent vanishes; the client does not know yet
    results = in_background(lambda: client.put_file(src, str(tmp_path / "dst"), timeout=20))
    time.sleep(0.2)
    local.start()  # ANNOUNCE: the copy can never finish and must say why, at once
    outcome = results.get(timeout=15)
    assert isinstance(outcome, AgentRestarted), outcome
    assert not (tmp_path / "dst").exists()
    client.wait_ready(10)
    assert client.put_file(src, str(tmp_path / "dst")).size == 5 * MiB


def _stdin_feeders() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "_feed_stdin" in t.name]


def test_stdin_feeder_ends_with_the_command(client: BackdoorClient) -> None:
    before = len(_stdin_feeders())
    for _ in range(3):
        assert client.execute(P.Exec(argv=["true"]), stdin=bytes(2 * MiB), wait=20).status == 0
    deadline = time.monotonic() + 5
    while len(_stdin_feeders()) > before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(_stdin_feeders()) == before, "the agent leaks a stdin thread per command"


@pytest.mark.timeout(60)
def test_pty_gives_the_command_a_terminal(client: BackdoorClient) -> None:
    r = client.execute(P.Exec(shell="tty; test -t 0 && test -t 1 && echo both-tty", pty=True), wait=30)
    assert r.status == 0
    out = r.stdout.replace(b"\r\n", b"\n")
    assert out.startswith(b"/dev/pts/") and b"both-tty\n" in out
    r = client.execute(P.Exec(shell="read line; echo got:$line", pty=True), stdin=b"hello\n", wait=30)
    assert b"got:hello" in r.stdout


def test_identity_is_set_by_the_agent_without_a_process(
    client: BackdoorClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """IDENTITY (a restored clone's hostname, id, clock, hosts lines): files written, the clock
    and hostname calls made with the host's values, EXIT 0; the host's own clock and name are
    left alone here (the calls are recorded, not made)."""
    calls: list[tuple[str, object]] = []
    monkeypatch.setattr(agent, "set_clock_ns", lambda ns: calls.append(("clock", ns)))
    monkeypatch.setattr(agent, "set_hostname", lambda name: calls.append(("hostname", name)))
    monkeypatch.setattr(agent, "HOSTNAME_FILE", str(tmp_path / "hostname"))
    monkeypatch.setattr(agent, "CLONE_ID_FILE", str(tmp_path / "run" / "ntng" / "clone-id"))
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n")
    monkeypatch.setattr(agent, "HOSTS_FILE", str(tmp_path / "hosts"))
    assert "identity" in client.wait_ready(1).capabilities
    now = time.time_ns()
    took = client.set_identity(P.Identity("c7", "c7-42", now, ["192.168.1.9 c7"]))
    assert 0 <= took < 5
    assert calls == [("clock", now), ("hostname", "c7")]
    assert (tmp_path / "hostname").read_text() == "c7\n"
    assert (tmp_path / "run" / "ntng" / "clone-id").read_text() == "c7-42\n"
    assert (tmp_path / "hosts").read_text() == "127.0.0.1 localhost\n192.168.1.9 c7\n"
    # A failure is an ERROR naming what failed, and the session goes on.
    monkeypatch.setattr(agent, "HOSTNAME_FILE", str(tmp_path))  # a directory: cannot be written
    with pytest.raises(RemoteError, match="setting the clone's identity: Is a directory"):
        client.set_identity(P.Identity("c8", "c8-1", now, []))
    assert sh(client, "true").status == 0


class SlowConnection(HostConnection):
    """An agent that, once `slow` is set, takes 48 KiB every 0.5 s: a guest that takes data,
    but slowly (a loaded TCG guest)."""

    slow = threading.Event()

    def read(self, n: int) -> bytes:
        if self.slow.is_set():
            time.sleep(0.5)
            n = min(n, 48 * 1024)
        return super().read(n)


def test_a_slow_guest_does_not_stretch_put_file_past_its_timeout(tmp_path: Path) -> None:
    """SEND_GRACE is given to the frame under way, not again to every frame after the deadline
    (seen in CI: put_file(timeout=6) took 9.6 s into a guest that was being stopped)."""
    host, guest = socket.socketpair()
    local = LocalAgent(guest, SlowConnection)
    local.start()
    client = BackdoorClient(host, name="slow")
    big = tmp_path / "big"
    big.write_bytes(os.urandom(8 * MiB))
    try:
        client.wait_ready(10)
        SlowConnection.slow.set()
        t0 = time.monotonic()
        with pytest.raises(NtngError):
            client.put_file(big, str(tmp_path / "copy"), timeout=2.0)
        took = time.monotonic() - t0
        assert took < 2.0 + SEND_GRACE + 0.5, f"put_file(timeout=2) took {took:.1f}s"
    finally:
        SlowConnection.slow.clear()
        client.close()
        local.stop()
        guest.close()


def test_a_command_served_inline_does_not_delay_the_next_request(client: BackdoorClient) -> None:
    """A plain command runs on the agent's reader thread until the host sends anything: the
    next request then moves it to a worker, and is answered at once."""
    slow = in_background(lambda: sh(client, "sleep 3; echo slow"))
    time.sleep(0.5)  # the slow command is being served inline by now
    t0 = time.monotonic()
    assert sh(client, "echo quick").stdout == b"quick\n"
    assert time.monotonic() - t0 < 2.0
    r = slow.get(timeout=10)
    assert isinstance(r, ExecResult) and r.stdout == b"slow\n" and r.status == 0


def test_a_command_that_closes_its_output_early_is_still_reaped(client: BackdoorClient) -> None:
    """Its output ends long before it exits: the inline path hands the wait to a worker."""
    t0 = time.monotonic()
    r = sh(client, "echo early; exec >&- 2>&-; sleep 2; exit 3")
    assert (r.stdout, r.status) == (b"early\n", 3)
    assert 2.0 <= time.monotonic() - t0 < 6.0
    assert sh(client, "echo after").stdout == b"after\n"


def _tool(path: Path, says: str, mode: int = 0o755) -> None:
    path.write_text(f"#!/bin/sh\necho {says}\n")
    path.chmod(mode)


def _run_on(client: BackdoorClient, path: str, name: str = "ntng-tool") -> bytes:
    # In the agent's cwd: its posix_spawn path (another cwd goes through Popen, which searches itself)
    r = client.execute(P.Exec(argv=[name], env=[{"key": "PATH", "value": path}], cwd=os.getcwd()))
    return r.stdout


def test_a_command_name_is_found_on_path_like_execvp_while_it_changes(client: BackdoorClient, tmp_path: Path) -> None:
    """argv[0] is looked up in Python and remembered (posix_spawnp's failed execve per earlier
    directory cost ~1 ms under TCG); every change execvp would see is seen."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    path = f"{first}:{second}"
    _tool(second / "ntng-tool", "second")
    agent._PATH_CACHE.clear()
    assert _run_on(client, path) == b"second\n"
    assert ("ntng-tool", path) in agent._PATH_CACHE  # remembered
    assert _run_on(client, path) == b"second\n"
    _tool(first / "ntng-tool", "first")  # an earlier directory gains one
    assert _run_on(client, path) == b"first\n"
    assert _run_on(client, path) == b"first\n"
    (first / "ntng-tool").unlink()  # removed
    assert _run_on(client, path) == b"second\n"
    assert _run_on(client, path) == b"second\n"
    (second / "ntng-tool").chmod(0o644)  # the remembered one stops being executable
    with pytest.raises(RemoteError) as e:
        _run_on(client, path)
    assert e.value.code == P.ErrorCode.EXEC_FAILED and "ntng-tool" in e.value.message
    assert ("ntng-tool", path) not in agent._PATH_CACHE
    (second / "ntng-tool").chmod(0o755)
    _tool(first / "ntng-tool", "first, not executable", 0o644)
    assert _run_on(client, path) == b"second\n"
    assert ("ntng-tool", path) not in agent._PATH_CACHE  # a file of that name before it: always searched
    (first / "ntng-tool").chmod(0o755)
    assert _run_on(client, path) == b"first, not executable\n"
    (first / "ntng-tool").unlink()
    later = tmp_path / "not-yet"  # a PATH directory that does not exist yet
    path = f"{later}:{second}"
    assert _run_on(client, path) == b"second\n" and ("ntng-tool", path) in agent._PATH_CACHE
    later.mkdir()
    (later / "ntng-tool").symlink_to(first / "elsewhere")  # dangling: execvp goes on past it
    assert _run_on(client, path) == b"second\n"
    _tool(first / "elsewhere", "through a link")
    assert _run_on(client, path) == b"through a link\n"


def test_a_remembered_command_that_went_away_is_searched_again(client: BackdoorClient, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A spawn that fails on a remembered path searches again (the file went between the check
    and the spawn)."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    path = f"{first}:{second}"
    _tool(second / "ntng-tool", "second")
    agent._PATH_CACHE[("ntng-tool", path)] = (str(first / "ntng-tool"), ())  # stale on purpose
    assert _run_on(client, path) == b"second\n"
    searches: list[str] = []
    original = agent._search_path
    monkeypatch.setattr(agent, "_search_path", lambda n, p: searches.append(n) or original(n, p))
    agent._PATH_CACHE.clear()
    for _ in range(3):
        assert _run_on(client, path) == b"second\n"
    assert searches == ["ntng-tool"]  # searched once, then remembered
    with pytest.raises(RemoteError) as e:
        _run_on(client, path, "ntng-no-such-tool")
    assert "ntng-no-such-tool" in e.value.message and ("ntng-no-such-tool", path) not in agent._PATH_CACHE


def test_what_the_agent_remembers_of_path_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tool(tmp_path / "ntng-tool", "x")
    monkeypatch.setattr(agent, "PATH_CACHE_MAX", 4)
    agent._PATH_CACHE.clear()
    for i in range(10):
        assert agent._which("ntng-tool", f"{tmp_path}:/nonexistent-{i}") == str(tmp_path / "ntng-tool")
        assert len(agent._PATH_CACHE) <= 4


def test_a_hello_overtaken_by_a_newer_session_is_not_sent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seen in CI: the constructor set its HELLO's nonce, was descheduled, and meanwhile the
    reader answered the agent's ANNOUNCE with a HELLO of its own whose session (with a key:
    challenge, proof, HELLO_ACK) completed.  The constructor's late HELLO then reset that
    session in the agent, which refused every request ("not authenticated").  Here the
    constructor's HELLO waits until the reader's session is acknowledged."""
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    host, guest = socket.socketpair()
    local = LocalAgent(guest, key_file=str(key))
    started = threading.Timer(0.2, local.start)
    main = threading.current_thread()
    original = BackdoorClient._send

    def late_hello(self: BackdoorClient, data: bytes, deadline: float | None = None, what: str = "a frame",
                   *args: object, **kw: object) -> None:
        if what == "HELLO" and threading.current_thread() is main:
            _wait_for(lambda: self.agent is not None)
        original(self, data, deadline, what, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(BackdoorClient, "_send", late_hello)
    started.start()  # the agent starts (and announces itself) after the constructor's HELLO is ready
    client = BackdoorClient(host, name="late", key=key.read_bytes())
    try:
        client.wait_ready(10)
        assert sh(client, "echo ok").stdout == b"ok\n"
    finally:
        client.close()
        started.join(10)
        local.stop()  # before its fd is closed under it
        guest.close()


def test_a_command_started_by_popen_is_not_waited_for_on_the_reader(client: BackdoorClient, tmp_path: Path) -> None:
    """With its own cwd a command is started by Popen, whose exit has no pidfd in the inline
    poll: once its output ends, waiting for it is a worker's job, never the reader's."""
    slow = in_background(lambda: sh(client, "echo early; exec >&- 2>&-; sleep 3; exit 3", cwd=str(tmp_path)))
    time.sleep(0.5)  # its output has ended; it still runs
    t0 = time.monotonic()
    assert sh(client, "echo quick").stdout == b"quick\n"
    assert time.monotonic() - t0 < 1.5, "the reader thread was waiting for the first command"
    r = slow.get(timeout=10)
    assert isinstance(r, ExecResult) and (r.stdout, r.status) == (b"early\n", 3)


def _read_announce(sock: socket.socket, timeout: float = 20.0) -> P.Announce:
    decoder = P.Decoder(P.DEFAULT_MAX_FRAME)
    sock.settimeout(timeout)
    while True:
        data = sock.recv(1 << 16)
        assert data, "the agent closed the connection before its ANNOUNCE"
        decoder.feed(data)
        for ev in decoder.events():
            if not isinstance(ev, P.Garbage) and ev.type == P.FrameType.ANNOUNCE:
                msg = P.parse_message(ev)
                assert isinstance(msg, P.Announce)
                return msg


def test_a_host_that_leaves_during_the_announce_does_not_end_the_agent(tmp_path: Path) -> None:
    """The agent process on a socket, as in a guest with vsock: a host that connects and closes
    while the agent still writes its ANNOUNCE (~256 KiB of resync padding first, more than a
    socket buffer) is a disconnect, not the agent's end; the next host is served by the same
    process (its start time in the ANNOUNCE is unchanged)."""
    path = str(tmp_path / "agent.sock")
    proc = subprocess.Popen([sys.executable, str(Path(agent.__file__)), "--unix", path],
                            stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: os.path.exists(path))
        first = socket.socket(socket.AF_UNIX)
        first.connect(path)
        started = _read_announce(first).started_ns
        first.close()
        for _ in range(3):
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(path)
            except ConnectionRefusedError:
                pytest.fail(f"the agent is gone: {proc.communicate(timeout=5)[1].decode()[-800:]}")
            time.sleep(0.3)  # the agent fills the socket buffer and blocks in its write
            s.close()  # with the ANNOUNCE unread: the agent's write fails (EPIPE)
        assert proc.poll() is None, f"the agent exited: {proc.communicate(timeout=5)[1].decode()[-800:]}"
        last = socket.socket(socket.AF_UNIX)
        last.connect(path)
        assert _read_announce(last).started_ns == started
        last.close()
    finally:
        proc.kill()
        proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()


INLINE_CASES = {
    # what the command does: (script, the worker's reason to take over)
    "quick": ("echo out; echo err >&2; exit 3", None),
    "outlives INLINE_FOR": ("sleep 1.3; echo late", "time"),
    "more output than the window": (f"head -c {3 * P.DEFAULT_WINDOW} /dev/zero", "credit"),
    "ends its output long before its exit": ("echo early; exec >&- 2>&-; sleep 0.5; exit 3", "exit"),
    "times out before INLINE_FOR": ("sleep 5", "time"),
    "gets a SIGNAL": ("sleep 30", "host"),
}


@pytest.mark.parametrize("case", list(INLINE_CASES))
def test_a_command_served_inline_is_handed_to_a_worker_only_when_it_must(
        pair: tuple[BackdoorClient, LocalAgent], monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    """Each way a command started inline (Session.serve_inline) can leave the reader's thread:
    its state goes to a worker (ExecTask.adopt) and the command still ends as it should."""
    client, _local = pair
    inline: list[int] = []
    adopted: list[int] = []
    serve_inline, adopt = agent.Session.serve_inline, agent.ExecTask.adopt
    monkeypatch.setattr(agent.Session, "serve_inline",
                        lambda self, *a: (inline.append(a[0]), serve_inline(self, *a))[1])
    monkeypatch.setattr(agent.ExecTask, "adopt", lambda self, *a: (adopted.append(self.rid), adopt(self, *a))[1])
    script, reason = INLINE_CASES[case]
    timeout_ms = 300 if case == "times out before INLINE_FOR" else 0
    req = P.Exec(argv=["sh", "-c", script], cwd=agent._agent_cwd(), timeout_ms=timeout_ms)
    if case == "gets a SIGNAL":
        results = in_background(lambda: client.execute(req, wait=30))
        _wait_for(lambda: bool(client._pending))
        time.sleep(0.3)  # running inline by now
        [rid] = list(client._pending)
        client._send(P.Signal(signal.SIGTERM).frame(rid))
        r = results.get(timeout=10)
        assert isinstance(r, ExecResult)
    else:
        r = client.execute(req, wait=30)
    assert len(inline) == 1 and adopted == ([] if reason is None else inline), (inline, adopted)
    expected = {
        "quick": lambda: (r.stdout, r.stderr, r.status) == (b"out\n", b"err\n", 3),
        "outlives INLINE_FOR": lambda: (r.stdout, r.status) == (b"late\n", 0),
        "more output than the window": lambda: (len(r.stdout), r.status) == (3 * P.DEFAULT_WINDOW, 0),
        "ends its output long before its exit": lambda: (r.stdout, r.status) == (b"early\n", 3),
        "times out before INLINE_FOR": lambda: r.timed_out,
        "gets a SIGNAL": lambda: r.signal == signal.SIGTERM,
    }[case]
    assert expected(), r
    assert client.execute(P.Exec(argv=["true"]), wait=30).status == 0  # the agent goes on


def _zombie_or_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return bool(f.read())
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("path", ["inline", "worker"])
def test_a_command_whose_link_is_lost_mid_output_is_killed_and_reaped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """The host is gone when the command's output is sent: the command is killed and its
    process reaped, not left a zombie of the agent, even when it is not dead within
    INLINE_REAP (set to 0 here: the agent cannot wait for it there)."""
    monkeypatch.setattr(agent, "INLINE_REAP", 0.0)
    monkeypatch.chdir("/")
    monkeypatch.setattr(agent, "_agent_cwd", lambda: "/" if path == "inline" else "/nowhere")
    host, guest = socket.socketpair()
    conn = HostConnection(guest)
    session = agent.Session(conn)
    session.established = True
    pidfile = tmp_path / "pid"
    req = P.parse_exec(P.Exec(argv=["sh", "-c", f"echo $$ > {pidfile}; sleep 0.3; echo out; exec sleep 30"]).payload())
    conn.kill()  # every write from now on fails: Disconnected
    idle_r, idle_w = os.pipe()  # the host's fd for the inline path: it never sends
    try:
        if path == "inline":
            session.serve_inline(1, req, idle_r)
        else:
            session.inline_fd = None
            session.handle(P.Frame(P.FrameType.EXEC, 1, P.Exec(argv=req.argv).payload(), 0, P.VERSION, None))
        _wait_for(lambda: pidfile.exists() and pidfile.read_text().strip() != "")
        pid = int(pidfile.read_text())
        _wait_for(lambda: not _zombie_or_alive(pid), timeout=10)
    finally:
        os.close(idle_r)
        os.close(idle_w)
        host.close()
        guest.close()
