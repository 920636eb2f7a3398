"""What the fake VMMs share: the API server on a unix socket, a request journal, and a "guest"
whose backdoor is the REAL agent (backdoor/ntng_agent.py) running in the fake's process, reached
through hybrid vsock or a pty exactly as the real VMMs offer it.

Pausing the guest stops the bytes between host and agent (a paused guest neither reads nor
writes), so tests see a paused VM as one.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "python"), str(ROOT / "backdoor"), str(Path(__file__).resolve().parent)]

from vmmspec import Api  # noqa: E402

import ntng_agent as agent  # noqa: E402

AGENT_PORT = int(os.environ.get("NTNG_FAKE_AGENT_PORT", "1234"))
BOOT_DELAY = float(os.environ.get("NTNG_FAKE_BOOT_DELAY", "0.3"))  # kernel start to agent listening
JOURNAL = os.environ.get("NTNG_FAKE_JOURNAL")  # JSON lines: every API request and its answer

Answer = tuple[int, Any]  # (status, body: a JSON value, text, or None)


def load_spec(name: str) -> Api:
    return Api(Path(os.environ["NTNG_SPECS"]) / f"{name}.yaml")  # the tests set it (tests/thirdparty.py)


def journal(**entry: Any) -> None:
    if JOURNAL:
        with open(JOURNAL, "a") as f:
            f.write(json.dumps(entry) + "\n")


def die(message: str, code: int = 1) -> None:
    """Exit as a VMM does on a fatal error: the message on stderr, no clean-up."""
    print(message, file=sys.stderr, flush=True)
    os._exit(code)


# -- the API server ------------------------------------------------------------------------------

class ApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, handle: Callable[[str, str, bytes | None], Answer], vmm: str) -> None:
        self.handle = handle
        self.vmm = vmm
        self.lock = threading.Lock()  # the VMMs process one API request at a time
        if os.path.exists(path):
            die(f"{vmm}: API socket {path} already exists (address in use)")
        super().__init__(path, _Handler)

    def serve_in_background(self) -> None:
        threading.Thread(target=self.serve_forever, name="api", daemon=True).start()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ApiServer

    def _any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else None
        with self.server.lock:
            status, body = self.server.handle(self.command, self.path, raw)
        try:
            logged = json.loads(raw) if raw else None
        except ValueError:
            logged = raw.decode(errors="replace") if raw else None
        journal(vmm=self.server.vmm, method=self.command, path=self.path, body=logged, status=status,
                answer=body)
        self.send_response(status)
        if body is None:
            data = b""
        elif isinstance(body, str):
            data = body.encode()
            self.send_header("Content-Type", "text/plain")
        else:
            data = json.dumps(body).encode()
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_PATCH = do_POST = do_DELETE = _any

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
        pass  # the journal has it; a unix peer has no address for the default format


def parse_json(raw: bytes | None) -> tuple[bool, Any, str]:
    """(has_body, value, error) of a request body."""
    if raw is None or not raw.strip():
        return False, None, ""
    try:
        return True, json.loads(raw), ""
    except ValueError as e:
        return True, None, f"invalid JSON: {e}"


# -- the guest -------------------------------------------------------------------------------------

class Guest:
    """The guest's side: boots (the agent listens after BOOT_DELAY), pauses, and serves the
    real agent on every backdoor connection."""

    def __init__(self, console: Callable[[str], None]) -> None:
        self.console = console
        self.running = threading.Event()  # set: vCPUs run (cleared by pause)
        self.listening = threading.Event()  # the agent listens (the guest has booted far enough)
        self.started_ns = time.time_ns()

    def boot(self, restored: bool = False, paused: bool = False) -> None:
        if not paused:
            self.running.set()

        def run() -> None:
            if not restored:
                self.console("[    0.000000] Linux version 6.1.0-fake (fake VMM guest)")
                time.sleep(BOOT_DELAY)
                self.console("Welcome to the fake guest")
                self.console(f"ntng-agent: serving on vsock port {AGENT_PORT}")
            self.listening.set()

        threading.Thread(target=run, name="guest-boot", daemon=True).start()

    def pause(self) -> None:
        self.running.clear()

    def resume(self) -> None:
        self.running.set()

    def serve(self, read: Callable[[], bytes], write: Callable[[bytes], None]) -> None:
        """Bridge a host connection (read/write) to a new agent session, until either end goes."""
        host_end, agent_end = socket.socketpair()
        threading.Thread(target=self._pump, args=(read, host_end.sendall, host_end), daemon=True).start()
        threading.Thread(target=self._pump, args=(lambda: host_end.recv(65536), write, None),
                         daemon=True).start()

        def run_agent() -> None:
            conn = agent.Connection(agent_end.fileno(), agent_end.fileno())
            agent.serve(conn, self.started_ns)
            conn.let_go()  # as accept_forever: no late write reaches the fd number's next owner
            agent_end.close()

        threading.Thread(target=run_agent, name="agent", daemon=True).start()

    def _pump(self, read: Callable[[], bytes], write: Callable[[bytes], None],
              end: socket.socket | None) -> None:
        try:
            while True:
                data = read()
                if not data:
                    break
                self.running.wait()  # a paused guest takes and gives nothing
                write(data)
        except OSError:
            pass
        if end is not None:
            try:
                end.shutdown(socket.SHUT_RDWR)  # the host left: the agent sees the end
            except OSError:
                pass


class HybridVsock:
    """Firecracker's hybrid vsock: a unix socket where the host writes "CONNECT <port>\\n" and
    gets "OK <host port>\\n" if the guest listens on the port; else the connection is closed."""

    def __init__(self, path: str, guest: Guest) -> None:
        self.path = path
        self.guest = guest
        self.next_port = 1 << 30  # Firecracker numbers host-side ports from 2^30
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)  # fails (EADDRINUSE) on a leftover socket, as the real ones do
        self.sock.listen(16)
        threading.Thread(target=self._accept, name="vsock", daemon=True).start()

    def close(self) -> None:
        self.sock.close()
        os.unlink(self.path)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handshake, args=(conn,), daemon=True).start()

    def _handshake(self, conn: socket.socket) -> None:
        line = b""
        conn.settimeout(5)
        try:
            while not line.endswith(b"\n") and len(line) < 64:
                b = conn.recv(1)
                if not b:
                    break
                line += b
        except OSError:
            conn.close()
            return
        m = re.fullmatch(rb"CONNECT (\d+)\n", line)
        if not m or int(m.group(1)) != AGENT_PORT or not self.guest.listening.is_set():
            conn.close()  # nobody listens there (yet): the connection is reset
            return
        conn.settimeout(None)
        self.next_port += 1
        conn.sendall(f"OK {self.next_port}\n".encode())
        self.guest.serve(lambda: conn.recv(65536), conn.sendall)
