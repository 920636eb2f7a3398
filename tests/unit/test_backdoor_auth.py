"""Authentication of the backdoor with the run's secret: the REAL agent (backdoor/ntng_agent.py)
served over a socketpair, driven by the real BackdoorClient or by hand-made frames (an
attacker who reaches the agent's socket, e.g. another local user on AF_VSOCK)."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ntng import protocol as P
from ntng.client import BackdoorClient
from ntng.errors import AuthenticationFailed, BackdoorError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "backdoor"))
import ntng_agent as agent  # noqa: E402

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]

REFUSED_WITHIN = 5.0  # seconds: a refusal is an answer, not a wait for the boot timeout


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "backdoor.key"
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    return path


class Agent:
    """The real agent serving one end of a socketpair in a thread (key_file: its key)."""

    def __init__(self, key_file: Path | None) -> None:
        self.host, self.guest = socket.socketpair()
        self.conn = conn = agent.Connection(self.guest.fileno(), self.guest.fileno())
        key = None if key_file is None else str(key_file)
        self.thread = threading.Thread(target=agent.serve, args=(conn, time.time_ns()),
                                       kwargs={"key_file": key}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        for s in (self.host, self.guest):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.thread.join(10)
        self.conn.let_go()  # as accept_forever: no late write reaches the fd number's next owner
        self.host.close()
        self.guest.close()


@pytest.fixture
def make_agent() -> Iterator[type[Agent]]:
    made: list[Agent] = []

    class Tracked(Agent):
        def __init__(self, key_file: Path | None) -> None:
            super().__init__(key_file)
            made.append(self)

    yield Tracked
    for a in made:
        a.close()


class Raw:
    """An attacker's (or a replaying) peer: frames by hand, answers read back."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = P.Decoder()
        self.frames: list[P.Frame] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next(self, timeout: float = 5.0, skip: frozenset[int] = frozenset({P.FrameType.ANNOUNCE})) -> P.Frame:
        deadline = time.monotonic() + timeout
        while True:
            while self.frames:
                f = self.frames.pop(0)
                if f.type not in skip:
                    return f
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no frame from the agent")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                raise AssertionError("no frame from the agent") from None
            assert data, "the agent closed the connection"
            self.decoder.feed(data)
            self.frames += [e for e in self.decoder.events() if isinstance(e, P.Frame)]

    def hello(self, nonce: bytes = b"n" * 16) -> P.Frame:
        self.send(P.Hello(P.MIN_SESSION_VERSION, P.VERSION, nonce).frame(P.HANDSHAKE_REQUEST_ID))
        return self.next()

    def request_refused(self, marker: Path) -> P.Error:
        """An EXEC that would create `marker`: it must be refused, and nothing run."""
        self.send(P.Exec(argv=["touch", str(marker)]).frame(7))
        f = self.next()
        assert (f.type, f.request_id) == (P.FrameType.ERROR, 7), f
        err = P.Error.parse(f.payload)
        time.sleep(0.2)
        assert not marker.exists(), "the agent ran a command for an unauthenticated peer"
        return err


def test_right_key_authenticates_and_commands_run(make_agent: type[Agent], key_file: Path) -> None:
    a = make_agent(key_file)
    client = BackdoorClient(a.host, "auth", key=key_file.read_bytes())
    ack = client.wait_ready(10)
    assert "auth" in ack.capabilities
    r = client.execute(P.Exec(argv=["echo", "in"]), wait=20)
    assert (r.status, r.stdout) == (0, b"in\n")
    assert client.ping() >= 0


@pytest.mark.parametrize("client_key", [None, b"w" * 32], ids=["no-key", "wrong-key"])
def test_missing_or_wrong_key_is_refused_at_once_and_nothing_runs(
        make_agent: type[Agent], key_file: Path, tmp_path: Path, client_key: bytes | None) -> None:
    a = make_agent(key_file)
    client = BackdoorClient(a.host, "auth", key=client_key)
    t0 = time.monotonic()
    with pytest.raises(AuthenticationFailed, match=r"^auth: the agent refused authentication: ") as e:
        client.wait_ready(30)
    assert time.monotonic() - t0 < REFUSED_WITHIN
    if client_key is None:
        assert "no key" in str(e.value)
    else:
        assert "does not match" in str(e.value)
    # The refusal is the client's answer to every request, not a hang.
    with pytest.raises(AuthenticationFailed):
        client.execute(P.Exec(argv=["touch", str(tmp_path / "ran")]), wait=30)
    assert not (tmp_path / "ran").exists()


def test_unauthenticated_requests_get_an_auth_error_and_run_nothing(
        make_agent: type[Agent], key_file: Path, tmp_path: Path) -> None:
    raw = Raw(make_agent(key_file).host)
    # before any HELLO
    err = raw.request_refused(tmp_path / "before-hello")
    assert err.code == P.ErrorCode.AUTH and "not authenticated" in err.message
    # after HELLO, the challenge unanswered
    challenge = raw.hello()
    assert challenge.type == P.FrameType.AUTH_CHALLENGE
    assert raw.request_refused(tmp_path / "after-hello").code == P.ErrorCode.AUTH
    # a wrong proof: refused, and requests still are
    raw.send(P.Auth(b"n" * 16, b"\0" * 32).frame(P.HANDSHAKE_REQUEST_ID))
    f = raw.next()
    assert f.type == P.FrameType.ERROR and P.Error.parse(f.payload).code == P.ErrorCode.AUTH
    assert raw.request_refused(tmp_path / "after-bad-proof").code == P.ErrorCode.AUTH
    # PING is answered before authentication: a PONG echoes the peer's own bytes only
    raw.send(P.ping_frame(b"x"))
    assert raw.next().type == P.FrameType.PONG


class Recorder:
    """Relays host ↔ agent and records what the host sends (an eavesdropper's copy)."""

    def __init__(self, agent_side: socket.socket) -> None:
        self.host, self._mine = socket.socketpair()
        self.sent = bytearray()
        self._agent = agent_side
        threading.Thread(target=self._pump, args=(self._mine, self._agent, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self._agent, self._mine, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if record:
                    self.sent += data
                dst.sendall(data)
        except OSError:
            pass


def test_a_replayed_proof_is_refused(make_agent: type[Agent], key_file: Path, tmp_path: Path) -> None:
    first = make_agent(key_file)
    rec = Recorder(first.host)
    client = BackdoorClient(rec.host, "auth", key=key_file.read_bytes())
    client.wait_ready(10)
    sent = [e for e in P.decode_all(bytes(rec.sent)) if isinstance(e, P.Frame)]
    hellos = [f for f in sent if f.type == P.FrameType.HELLO]
    auths = [f for f in sent if f.type == P.FrameType.AUTH]
    assert auths, "the client sent no proof"
    # Another connection to an agent with the same key (a reconnect, or the next vsock
    # connection): the recorded HELLO (same nonce) and proof are replayed.
    raw = Raw(make_agent(key_file).host)
    raw.send(auths[-1].encode())  # a proof without a challenge first: no session
    assert raw.request_refused(tmp_path / "proof-alone").code == P.ErrorCode.AUTH
    raw.send(hellos[-1].encode())
    assert raw.next().type == P.FrameType.AUTH_CHALLENGE  # a new challenge: the old proof is stale
    raw.send(auths[-1].encode())
    f = raw.next()
    assert f.type == P.FrameType.ERROR and P.Error.parse(f.payload).code == P.ErrorCode.AUTH
    assert raw.request_refused(tmp_path / "replayed").code == P.ErrorCode.AUTH
    # On one connection too: each HELLO gets a new challenge, and a proof answers one only.
    key = key_file.read_bytes()
    raw = Raw(make_agent(key_file).host)
    nonce = b"s" * 16
    ch1 = P.AuthChallenge.parse(raw.hello(nonce).payload).challenge
    raw.send(P.Auth(nonce, P.auth_proof(key, P.AUTH_HOST, ch1, nonce)).frame(P.HANDSHAKE_REQUEST_ID))
    assert raw.next().type == P.FrameType.HELLO_ACK  # the legitimate host's session
    ch2 = P.AuthChallenge.parse(raw.hello(nonce).payload).challenge
    assert ch2 != ch1
    raw.send(P.Auth(nonce, P.auth_proof(key, P.AUTH_HOST, ch1, nonce)).frame(P.HANDSHAKE_REQUEST_ID))
    f = raw.next()
    assert f.type == P.FrameType.ERROR and P.Error.parse(f.payload).code == P.ErrorCode.AUTH
    assert raw.request_refused(tmp_path / "same-connection").code == P.ErrorCode.AUTH


def test_an_agent_without_a_key_accepts_sessions(make_agent: type[Agent]) -> None:
    client = BackdoorClient(make_agent(None).host, "nokey")
    ack = client.wait_ready(10)
    assert "auth" not in ack.capabilities
    assert client.execute(P.Exec(argv=["echo", "ok"]), wait=20).stdout == b"ok\n"


def test_a_client_with_a_key_refuses_an_agent_without_one(make_agent: type[Agent]) -> None:
    """The run gave the guest a key: an agent that does not prove it has it is not ours (or
    cannot read it, e.g. a kernel without qemu_fw_cfg), and the backdoor would be open."""
    client = BackdoorClient(make_agent(None).host, "m", key=os.urandom(32))
    with pytest.raises(AuthenticationFailed, match=r"^m: the agent did not authenticate: .*qemu_fw_cfg"):
        client.wait_ready(30)


def test_an_unreadable_key_is_a_refusal_naming_it(make_agent: type[Agent], tmp_path: Path) -> None:
    missing = tmp_path / "gone.key"
    client = BackdoorClient(make_agent(missing).host, "m", key=os.urandom(32))
    with pytest.raises(AuthenticationFailed, match=f"cannot read the backdoor key {missing}"):
        client.wait_ready(30)


def test_an_agent_of_another_protocol_version_is_reported_not_waited_for() -> None:
    """An old agent answers a HELLO it cannot speak with ERROR VERSION (frame version 1)."""
    host, guest = socket.socketpair()

    def old_agent() -> None:
        d = P.Decoder()
        while True:
            d.feed(guest.recv(1 << 16))
            for ev in d.events():
                if isinstance(ev, P.Frame) and ev.type == P.FrameType.HELLO:
                    msg = "no common protocol version: peer speaks 2..2, we speak 1..1"
                    guest.sendall(P.encode_frame(P.FrameType.ERROR, 0, P.Error(P.ErrorCode.VERSION, msg).payload(),
                                                 version=1))
                    return

    threading.Thread(target=old_agent, daemon=True).start()
    client = BackdoorClient(host, "m")
    t0 = time.monotonic()
    with pytest.raises(BackdoorError, match=r"^m: the agent refused the session: no common protocol version"):
        client.wait_ready(30)
    assert time.monotonic() - t0 < REFUSED_WITHIN
    client.close()
    guest.close()


def test_proofs_bind_role_challenge_and_nonce() -> None:
    key, ch, nonce = b"k" * 32, b"c" * 32, b"n" * 16
    host = P.auth_proof(key, P.AUTH_HOST, ch, nonce)
    assert len(host) == 32
    assert host != P.auth_proof(key, P.AUTH_AGENT, ch, nonce)  # no reflection
    assert host != P.auth_proof(key, P.AUTH_HOST, b"d" * 32, nonce)
    assert host != P.auth_proof(key, P.AUTH_HOST, ch, b"m" * 16)
    assert host != P.auth_proof(b"j" * 32, P.AUTH_HOST, ch, nonce)
    # length-prefixed: moving bytes between challenge and nonce changes the proof
    assert P.auth_proof(key, P.AUTH_HOST, ch + b"x", nonce) != P.auth_proof(key, P.AUTH_HOST, ch, b"x" + nonce)


def test_the_client_answers_one_challenge_per_hello() -> None:
    """A hostile agent repeating challenges gets one proof per HELLO, not an HMAC oracle."""
    host, guest = socket.socketpair()
    client = BackdoorClient(host, "m", key=os.urandom(32))
    raw = Raw(guest)
    hello = P.Hello.parse(raw.next().payload)
    for i in range(3):
        raw.send(P.AuthChallenge(hello.nonce, bytes([i]) * 32).frame(P.HANDSHAKE_REQUEST_ID))
    first = raw.next()
    assert first.type == P.FrameType.AUTH
    with pytest.raises(AssertionError, match="no frame"):
        raw.next(timeout=0.5)
    client.close()
    guest.close()
