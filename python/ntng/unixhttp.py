"""HTTP/1.1 over a unix socket: the REST APIs of Firecracker and Cloud Hypervisor.

stdlib only (http.client on a unix socket).  One connection per request, a timeout on each,
and every error names the machine, the VMM, the request and what the VMM answered.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Callable
from typing import Any

from .errors import SetupError


class ApiError(SetupError):
    """The VMM answered a request with an error status."""

    def __init__(self, message: str, status: int, detail: str) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail  # the VMM's own words (Firecracker's fault_message, CH's error text)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _detail(body: bytes) -> str:
    """What went wrong, in the VMM's words: Firecracker sends {"fault_message": ...}, Cloud
    Hypervisor plain text."""
    text = body.decode(errors="replace").strip()
    try:
        value = json.loads(text)
    except ValueError:
        return text or "(no message)"
    if isinstance(value, dict) and isinstance(value.get("fault_message"), str):
        return str(value["fault_message"])
    return text


class UnixHttpClient:
    """Requests to one VMM's API socket.  `who` prefixes every error ("m1: firecracker")."""

    def __init__(self, socket_path: str, who: str, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.who = who
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        """Send one request; the decoded JSON answer (None when there is none).  An error status
        raises ApiError, a dead or silent socket SetupError."""
        what = f"{method} {path}"
        limit = self.timeout if timeout is None else timeout
        conn = _UnixConnection(self.socket_path, limit)
        headers = {"Accept": "application/json"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except TimeoutError:
            raise SetupError(f"{self.who}: {what}: no answer within {limit:g}s on {self.socket_path}") from None
        except (OSError, http.client.HTTPException) as e:
            raise SetupError(f"{self.who}: {what}: API socket {self.socket_path} failed: {e}") from None
        finally:
            conn.close()
        if resp.status >= 300:
            detail = _detail(data)
            raise ApiError(f"{self.who}: {what} failed with HTTP {resp.status} {resp.reason}: {detail}",
                           resp.status, detail)
        if not data.strip():
            return None
        try:
            return json.loads(data)
        except ValueError:
            raise SetupError(f"{self.who}: {what}: the answer is not JSON: {data[:200]!r}") from None

    def wait_listening(self, timeout: float, alive: Callable[[], bool]) -> None:
        """Wait until the VMM accepts connections on its API socket (it creates the socket
        itself, a moment after it starts); stop early if it exits."""
        deadline = time.monotonic() + timeout
        while True:
            if not alive():
                raise SetupError(f"{self.who}: exited before its API socket {self.socket_path} was up")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.socket_path)
                return
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise SetupError(f"{self.who}: API socket {self.socket_path} not up after {timeout:g}s") from None
                time.sleep(0.02)
            finally:
                sock.close()
