"""The backdoor wire protocol, shared verbatim by the host runner and the in-guest agent.

Only the stdlib and `construct` may be imported here: the guest image copies this file next to
the agent.  A frame is

    magic(4) version(1) type(1) flags(2) request_id(4) length(4) header_crc(4)
    payload(length) crc32(4)

header_crc covers the 16 bytes before it, so noise that happens to contain the magic is
rejected at once instead of stalling the decoder on a forged length; crc32 covers header and
payload.  The decoder resynchronises on the next magic after
garbage (console noise, half a frame left by a guest reset) and reports what it skipped, so a
receiver can answer a bad frame with ERROR and go on.

Bulk data (STDIN/STDOUT/STDERR/FILE_DATA) is credit-based per request: a sender may have at
most `window` unacknowledged payload bytes in flight; the receiver returns credit with CREDIT
frames as its consumer drains the data.  An empty data frame is end-of-stream (STDIN,
FILE_DATA); a command's STDOUT and STDERR end with its EXIT, which follows all their frames on
the one ordered connection, so they carry none (earlier agents sent one: receivers skip it).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any, ClassVar, NamedTuple

from construct import (
    Const,
    ConstructError,
    Flag,
    GreedyBytes,
    Int8ub,
    Int16ub,
    Int32sb,
    Int32ub,
    Int64ub,
    PascalString,
    Prefixed,
    PrefixedArray,
    Struct,
    VarInt,
)

# The release of nixos-test-ng: the one place it is written.  pyproject.toml reads it (the
# wheel's version), `ntng --version` prints it, and the agent reports it in HELLO_ACK: this file
# travels into the guest next to the agent, the package does not.
PACKAGE_VERSION = "0.1.0"

MAGIC = b"\xe2NTG"
# 2: HELLO is answered by AUTH_CHALLENGE when the agent has the run's key (see "Authentication"
# below); HELLO_ACK carries the agent's proof.
VERSION = 2
# The lowest frame-header version the decoder reads.  Headers are unchanged since 1, so an old
# peer's ERROR VERSION still arrives and the user reads why instead of waiting for a timeout.
MIN_VERSION = 1
MIN_SESSION_VERSION = 2  # the lowest version a session may be negotiated at (both peers)
HEADER_SIZE = 20
TRAILER_SIZE = 4
DEFAULT_MAX_FRAME = 256 * 1024  # payload bytes
# Unacknowledged data bytes per request and direction.  4 MiB, not 1: under TCG a credit's
# round trip (the receiver's thread wake-ups on a busy host) left senders waiting; on one VM,
# interleaved, 1 → 4 MiB took get 79 → 100, put 31 → 43 and stdout 54 → 72 MB/s.
DEFAULT_WINDOW = 4 * 1024 * 1024
DEFAULT_MAX_IN_FLIGHT = 64
CHUNK = 64 * 1024  # data frames are cut at this size
HANDSHAKE_REQUEST_ID = 0  # HELLO/ANNOUNCE/PING use no request slot

Header = Struct(
    "magic" / Const(MAGIC),
    "version" / Int8ub,
    "type" / Int8ub,
    "flags" / Int16ub,
    "request_id" / Int32ub,
    "length" / Int32ub,
    "header_crc" / Int32ub,
)
# The same 20 bytes as `Header` for the per-frame hot path: construct's parser costs ~15 µs a
# header here and ~40x that in a TCG guest; struct ~0.3 µs.  Property tests keep them equal.
HEADER_STRUCT = struct.Struct(">4sBBHIII")
_HEAD_NO_CRC = struct.Struct(">4sBBHII")


class ProtocolError(Exception):
    """Anything wrong on the wire.  The only exception decoding may raise."""


class FrameError(ProtocolError):
    """A frame whose header, CRC or payload is invalid."""


class LimitExceeded(ProtocolError):
    """A peer broke a negotiated limit (frame size, in-flight requests, flow-control window)."""


class FrameType(enum.IntEnum):
    HELLO = 1  # host → agent: start a session
    HELLO_ACK = 2  # agent → host: session accepted
    ANNOUNCE = 3  # agent → host: "I (re)started", sent unsolicited
    AUTH_CHALLENGE = 4  # agent → host: answer HELLO with a proof of the run's key first
    AUTH = 5  # host → agent: the proof; answered by HELLO_ACK or ERROR AUTH
    EXEC = 10
    STDIN = 11
    STDOUT = 12
    STDERR = 13
    EXIT = 14
    SIGNAL = 15
    IDENTITY = 16  # host → agent: a restored clone's new identity; answered by EXIT or ERROR
    FILE_PUT = 20
    FILE_GET = 21
    FILE_DATA = 22
    FILE_DONE = 23
    CREDIT = 30
    PING = 31
    PONG = 32
    ERROR = 33


# Frame flags.  FLAG_CRC32 on FILE_PUT / FILE_GET (agents with the "crc32" capability): the
# request's and FILE_DONE's `sha256` fields carry a CRC-32 (zlib's, 4 bytes big-endian) of the
# whole file instead of its sha256.  Without it the check is sha256, as in every version.
FLAG_CRC32 = 0x0001
# FLAG_DIRECT on FILE_PUT: write a large file with direct I/O where the guest's filesystem allows
# (the host sets it for a guest whose kernel runs emulated, where the page cache's copy and
# writeback are the slow part).  Agents without it ignore the bit.
FLAG_DIRECT = 0x0002
CHECKSUMS = ("crc32", "sha256")  # what put_file/get_file's `verify=` accepts


class Crc32:
    """zlib.crc32 (C) with hashlib's update/digest interface: a whole-file check at a
    fraction of sha256's cost in a TCG guest."""

    name = "crc32"

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes | memoryview, crc: int | None = None) -> None:
        """Extend by `data`; `crc` is zlib.crc32(data) when the caller has it already."""
        if crc is None:
            self.value = zlib.crc32(data, self.value)
        else:
            self.value = crc32_combine(self.value, crc, len(data))

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


# CRC-32 of a concatenation from the CRCs of its parts (zlib's crc32_combine, which Python's
# zlib does not expose): a receiver that has the CRC of a large payload (computed once to check
# its frame) extends a whole-file CRC with it instead of running the bytes through CRC-32 again.
# In a TCG guest a CRC-32 pass over 256 KiB costs ~0.6 ms; a combine ~0.02 ms.
_CRC_POLY = 0xEDB88320  # reflected CRC-32 polynomial, as zlib


def _crc_multiply(a: int, b: int) -> int:
    """a * b modulo the CRC polynomial (reflected bit order, x^0 in the top bit)."""
    product = 0
    m = 1 << 31
    while m:
        if a & m:
            product ^= b
            if not a & (m - 1):
                break
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1
    return product


def _x_powers() -> list[int]:
    powers = [1 << 30]  # x^1; then x^2, x^4, … x^(2^31)
    for _ in range(31):
        powers.append(_crc_multiply(powers[-1], powers[-1]))
    return powers


_X_POWERS = _x_powers()
# length -> [x^(8*length) mod P, its byte tables (built on the second use), uses so far]
_SHIFTS: dict[int, list[Any]] = {}
_SHIFT_TABLES_AFTER = 2  # uses of one length before its tables are built (most are one-offs)


def _shift_for(length: int) -> int:
    """x^(8*length) mod P, the operator that moves a CRC past `length` bytes."""
    op, n, k = 1 << 31, length, 3  # x^0; length bytes are 2^3 * length bits
    while n:
        if n & 1:
            op = _crc_multiply(_X_POWERS[k & 31], op)
        n >>= 1
        k += 1
    return op


def _byte_tables(op: int) -> list[int]:
    """op * c for every c with one byte set, as 4 tables of 256 (flattened): the product is
    linear in c, so a multiply becomes 4 lookups (a loop of 32 costs ~0.07 ms under TCG)."""
    tables = []
    for shift in (0, 8, 16, 24):
        basis = [_crc_multiply(op, 1 << (shift + bit)) for bit in range(8)]
        table = [0] * 256
        for v in range(1, 256):
            low = v & -v
            table[v] = table[v ^ low] ^ basis[low.bit_length() - 1]
        tables += table
    return tables


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """zlib.crc32(a + b) from crc1 = zlib.crc32(a), crc2 = zlib.crc32(b) and len(b)."""
    if not len2:
        return crc1
    entry = _SHIFTS.get(len2)
    if entry is None:
        if len(_SHIFTS) >= 64:  # bounded: a peer choosing odd lengths cannot grow it
            _SHIFTS.clear()
        entry = _SHIFTS[len2] = [_shift_for(len2), None, 0]
    op, tables, uses = entry
    if tables is None:
        if uses + 1 < _SHIFT_TABLES_AFTER:
            entry[2] = uses + 1
            return _crc_multiply(op, crc1) ^ crc2
        tables = entry[1] = _byte_tables(op)
    return (tables[crc1 & 0xFF] ^ tables[256 + (crc1 >> 8 & 0xFF)]
            ^ tables[512 + (crc1 >> 16 & 0xFF)] ^ tables[768 + (crc1 >> 24)] ^ crc2)


class Sha256:
    """hashlib's sha256 with Crc32's update signature (a payload's CRC is of no use to it)."""

    name = "sha256"

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def update(self, data: bytes | memoryview, crc: int | None = None) -> None:
        self._hash.update(data)

    def digest(self) -> bytes:
        return self._hash.digest()


def file_checksum(flags: int) -> Crc32 | Sha256:
    """The whole-file checksum a FILE_PUT / FILE_GET with these flags asks for."""
    return Crc32() if flags & FLAG_CRC32 else Sha256()


DATA_TYPES = frozenset({FrameType.STDIN, FrameType.STDOUT, FrameType.STDERR, FrameType.FILE_DATA})


class ErrorCode(enum.IntEnum):
    BAD_FRAME = 1  # CRC or header damaged; request id may be unreliable
    BAD_PAYLOAD = 2  # frame intact but its payload does not parse
    UNKNOWN_TYPE = 3
    UNKNOWN_REQUEST = 4
    TOO_MANY_REQUESTS = 5
    WINDOW_EXCEEDED = 6
    NO_SESSION = 7  # request before HELLO
    VERSION = 8
    AUTH = 9  # request before authentication, or a proof that does not match the key
    EXEC_FAILED = 20  # command could not be started (no such file, bad user, bad cwd)
    FILE_FAILED = 21  # open/write/rename failed
    CHECKSUM = 22  # sha256 mismatch on FILE_PUT
    INTERNAL = 99


Str = PascalString(VarInt, "utf8")
Blob = Prefixed(VarInt, GreedyBytes)
StrList = PrefixedArray(VarInt, Str)


class Frame(NamedTuple):
    """One decoded frame.  A NamedTuple, not a frozen dataclass: it is built for every frame,
    and a frozen dataclass's __init__ costs ~3x as much (it counts under TCG)."""

    type: int
    request_id: int
    payload: bytes = b""
    flags: int = 0
    version: int = VERSION
    # zlib.crc32(payload) alone, when the decoder computed it to check a large frame
    # (COMBINED_CHECK_FROM): a receiver extends a whole-file CRC with it (Crc32.update).
    payload_crc: int | None = None

    def encode(self) -> bytes:
        return encode_frame(self.type, self.request_id, self.payload, self.flags, self.version)


def encode_frame(
    ftype: int, request_id: int, payload: bytes = b"", flags: int = 0, version: int = VERSION
) -> bytes:
    try:
        head = _HEAD_NO_CRC.pack(MAGIC, version, ftype, flags, request_id, len(payload))
    except struct.error as e:  # a field out of range: say which, as construct would have
        raise FrameError(f"cannot encode frame header (type {ftype}, request {request_id}): {e}") from None
    head += zlib.crc32(head).to_bytes(4, "big")
    crc = zlib.crc32(payload, zlib.crc32(head))
    return b"".join((head, payload, crc.to_bytes(4, "big")))


def frame_parts(
    ftype: int, request_id: int, payload: bytes | memoryview, payload_crc: int | None = None
) -> tuple[bytes, bytes]:
    """(header, trailer) of the frame around `payload`, for a gathering write (os.writev) that
    sends a large payload without copying it into a frame first.  With `payload_crc`
    (zlib.crc32(payload), which the sender also needs for a whole-file CRC) the payload is not
    run through CRC-32 a second time."""
    head = _HEAD_NO_CRC.pack(MAGIC, VERSION, ftype, 0, request_id, len(payload))
    head += zlib.crc32(head).to_bytes(4, "big")
    if payload_crc is None:
        crc = zlib.crc32(payload, zlib.crc32(head))
    else:
        crc = crc32_combine(zlib.crc32(head), payload_crc, len(payload))
    return head, crc.to_bytes(4, "big")


# ---------------------------------------------------------------------------------------------
# Typed messages.  Each is a dataclass whose fields match its construct declaration one to one.


_SCALARS = frozenset({int, bool, bytes, str})


class Message:
    TYPE: ClassVar[FrameType]
    _names: ClassVar[tuple[str, ...] | None] = None
    SCHEMA: ClassVar[Any]
    _compiled: ClassVar[Any] = None
    COMPILE: ClassVar[bool] = True  # False: a message used once, where compiling costs more

    @classmethod
    def codec(cls) -> Any:
        """The schema compiled to Python on first use: several times faster per message (it
        matters for round trips under TCG) without paying for all schemas at agent start."""
        if cls.__dict__.get("_compiled") is None:
            if not cls.COMPILE:
                cls._compiled = cls.SCHEMA
                return cls._compiled
            try:
                cls._compiled = cls.SCHEMA.compile()
            except Exception:  # a construct the compiler does not support: stay interpreted
                cls._compiled = cls.SCHEMA
        return cls._compiled

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        names = cls.__dict__.get("_names")
        if names is None:
            names = tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
            cls._names = names
        return names  # type: ignore[no-any-return]

    def payload(self) -> bytes:
        # A shallow dict, not dataclasses.asdict(): that deep-copies every field, which made
        # building an EXIT cost more than sending it.
        values = {n: getattr(self, n) for n in self.field_names()}
        return bytes(self.codec().build(values))

    def frame(self, request_id: int) -> bytes:
        return encode_frame(self.TYPE, request_id, self.payload())

    @classmethod
    def parse(cls, payload: bytes) -> Any:
        try:
            c = cls.codec().parse(payload)
        except (ConstructError, UnicodeDecodeError, ValueError, OverflowError, struct.error,
                IndexError, TypeError) as e:  # compiled parsers raise struct.error on short input
            raise FrameError(f"bad {cls.TYPE.name} payload: {e}") from None
        return cls(*(_plain(c[n]) for n in cls.field_names()))


def _plain(v: Any) -> Any:
    if v.__class__ in _SCALARS:
        return v
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):  # construct Containers
        return {k: _plain(x) for k, x in v.items() if not k.startswith("_")}
    return v


@dataclasses.dataclass(frozen=True)
class Hello(Message):
    TYPE = FrameType.HELLO
    SCHEMA = Struct(
        "min_version" / Int8ub,
        "max_version" / Int8ub,
        "nonce" / Blob,
        "max_frame" / Int32ub,
        "window" / Int32ub,
        "max_in_flight" / Int16ub,
        "capabilities" / StrList,
    )
    min_version: int
    max_version: int
    nonce: bytes
    max_frame: int = DEFAULT_MAX_FRAME
    window: int = DEFAULT_WINDOW
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    capabilities: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class HelloAck(Message):
    TYPE = FrameType.HELLO_ACK
    SCHEMA = Struct(
        "version" / Int8ub,
        "nonce" / Blob,
        "agent_version" / Str,
        "boot_id" / Str,
        "hostname" / Str,
        "max_frame" / Int32ub,
        "window" / Int32ub,
        "max_in_flight" / Int16ub,
        "capabilities" / StrList,
        "proof" / Blob,
    )
    version: int
    nonce: bytes
    agent_version: str
    boot_id: str
    hostname: str
    max_frame: int
    window: int
    max_in_flight: int
    capabilities: list[str]
    proof: bytes = b""  # auth_proof(key, AUTH_AGENT, challenge, nonce); empty: no key


@dataclasses.dataclass(frozen=True)
class AuthChallenge(Message):
    """A keyed agent's answer to HELLO: `challenge` is fresh for each HELLO and good for one
    AUTH.  `nonce` echoes the HELLO's, so a host ignores the challenge of an older HELLO."""

    TYPE = FrameType.AUTH_CHALLENGE
    COMPILE = False  # once per session: compiling costs more than it saves
    SCHEMA = Struct("nonce" / Blob, "challenge" / Blob)
    nonce: bytes
    challenge: bytes


@dataclasses.dataclass(frozen=True)
class Auth(Message):
    """The host's answer to AUTH_CHALLENGE: auth_proof(key, AUTH_HOST, challenge, nonce)."""

    TYPE = FrameType.AUTH
    COMPILE = False
    SCHEMA = Struct("nonce" / Blob, "proof" / Blob)
    nonce: bytes
    proof: bytes


@dataclasses.dataclass(frozen=True)
class Announce(Message):
    TYPE = FrameType.ANNOUNCE
    SCHEMA = Struct("boot_id" / Str, "agent_version" / Str, "started_ns" / Int64ub)
    boot_id: str
    agent_version: str
    started_ns: int


EnvEntry = Struct("key" / Str, "value" / Str)


@dataclasses.dataclass(frozen=True)
class Exec(Message):
    """Run argv (when `shell` is empty) or `shell` through /bin/sh -c."""

    TYPE = FrameType.EXEC
    SCHEMA = Struct(
        "argv" / StrList,
        "shell" / Str,
        "env" / PrefixedArray(VarInt, EnvEntry),
        "clear_env" / Flag,
        "cwd" / Str,
        "user" / Str,
        "timeout_ms" / Int32ub,
        "stdin" / Flag,
        "pty" / Flag,
        "merge_stderr" / Flag,
    )
    argv: list[str] = dataclasses.field(default_factory=list)
    shell: str = ""
    env: list[dict[str, str]] = dataclasses.field(default_factory=list)
    clear_env: bool = False
    cwd: str = ""
    user: str = ""
    timeout_ms: int = 0  # 0: no timeout
    stdin: bool = False  # False: stdin is /dev/null
    pty: bool = False
    merge_stderr: bool = False


    def payload(self) -> bytes:
        """SCHEMA's bytes, hand-written: one EXEC per command, and construct's build took
        ~60 us of the host's part of each (property-tested equal; anything the hand-written
        path cannot take, such as an out-of-range field, goes to construct for its error)."""
        try:
            return b"".join((
                _varint(len(self.argv)), *map(_text, self.argv), _text(self.shell),
                _varint(len(self.env)), *(_text(e["key"]) + _text(e["value"]) for e in self.env),
                b"\x01" if self.clear_env else b"\x00", _text(self.cwd), _text(self.user),
                _EXEC_END.pack(self.timeout_ms, bool(self.stdin), bool(self.pty), bool(self.merge_stderr)),
            ))
        except (struct.error, AttributeError, TypeError, KeyError, ValueError):
            return super().payload()

    @classmethod
    def parse(cls, payload: bytes) -> Any:
        """SCHEMA's reading, hand-written: one EXEC per command, and the compiled construct
        parser costs 1-2 ms of a command's round trip in a TCG guest (property-tested equal,
        errors included)."""
        return parse_exec(payload)


_ONE_BYTE_VARINTS = [bytes((n,)) for n in range(0x80)]


def _varint(n: int) -> bytes:
    """construct's VarInt bytes of n >= 0 (ValueError below 0)."""
    if 0 <= n < 0x80:  # every count and short text's length: an EXEC has eight
        return _ONE_BYTE_VARINTS[n]
    if n < 0:
        raise ValueError(f"VarInt of {n}")
    out = bytearray()
    while n > 0x7F:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    out.append(n)
    return bytes(out)


def _text(text: str) -> bytes:
    """construct's PascalString(VarInt, "utf8") bytes of `text`."""
    data = text.encode("utf-8")
    return _varint(len(data)) + data


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """construct's VarInt at `pos`: (value, the position after it); IndexError when short."""
    b = buf[pos]
    if b < 0x80:  # every count and length below 128: one byte, the common case
        return b, pos + 1
    n, shift = 0, 0
    while True:
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return n, pos


def _read_text(buf: bytes, pos: int) -> tuple[str, int]:
    """construct's PascalString(VarInt, "utf8") at `pos`: (text, the position after it)."""
    n = buf[pos]
    if n < 0x80:
        pos += 1
    else:
        n, pos = _read_varint(buf, pos)
    end = pos + n
    if end > len(buf):
        raise ValueError(f"string of {n} bytes past the end of the payload")
    return buf[pos:end].decode("utf-8"), end


_PLAIN_TAIL = bytes(5)  # shell, env count, clear_env, cwd, user: all empty or false
_PLAIN_TAIL_SIZE = len(_PLAIN_TAIL) + 4 + 3  # and timeout_ms, stdin, pty, merge_stderr


def parse_exec(buf: bytes) -> Exec:
    """Exec.SCHEMA's reading (Exec.parse; the agent calls it directly: a Python call costs the
    guest ~20-30 us under TCG) with the position in a local, one-byte lengths inline and the
    usual tail (argv only: no shell, environment, cwd or user) in one comparison: in a TCG
    guest each interpreted line of the agent costs guest CPU (3-15 us, docs/benchmarks.md),
    and a cursor object's method per field was ~100 lines per EXEC.  FrameError where
    construct fails (property-tested)."""
    try:
        count, pos = buf[0], 1
        if count >= 0x80:
            count, pos = _read_varint(buf, 0)
        argv = []
        for _ in range(count):
            end = pos + 1 + buf[pos]
            if buf[pos] < 0x80 and end <= len(buf):
                argv.append(buf[pos + 1 : end].decode("utf-8"))
                pos = end
            else:
                arg, pos = _read_text(buf, pos)
                argv.append(arg)
        env: list[dict[str, str]] = []
        if len(buf) - pos == _PLAIN_TAIL_SIZE and buf[pos : pos + len(_PLAIN_TAIL)] == _PLAIN_TAIL:
            shell, clear_env, cwd, user = "", False, "", ""
            pos += len(_PLAIN_TAIL)
        else:
            shell, pos = _read_text(buf, pos)
            count, pos = _read_varint(buf, pos)
            for _ in range(count):
                key, pos = _read_text(buf, pos)
                value, pos = _read_text(buf, pos)
                env.append({"key": key, "value": value})
            clear_env = buf[pos] != 0
            cwd, pos = _read_text(buf, pos + 1)
            user, pos = _read_text(buf, pos)
        timeout_ms, stdin, pty_, merge_stderr = _EXEC_END.unpack_from(buf, pos)
        # Made without the frozen dataclass's __init__ (an object.__setattr__ per field, ten
        # interpreted lines): the values go into the instance's dict in one call.
        exec_ = object.__new__(Exec)
        exec_.__dict__.update(zip(_EXEC_FIELDS, (argv, shell, env, clear_env, cwd, user, timeout_ms, stdin != 0,
                                                 pty_ != 0, merge_stderr != 0), strict=True))
        return exec_
    except (IndexError, UnicodeDecodeError, ValueError, struct.error) as e:
        raise FrameError(f"bad EXEC payload: {e}") from None


_EXEC_END = struct.Struct(">IBBB")  # timeout_ms, stdin, pty, merge_stderr
_EXEC_FIELDS = tuple(f.name for f in dataclasses.fields(Exec))


@dataclasses.dataclass(frozen=True)
class Identity(Message):
    """A restored clone's own hostname, clone id, clock and /etc/hosts lines, set by the agent
    itself: starting a process in a freshly restored TCG guest (empty translation cache) costs
    more than the rest of a restore.  Agents that can say "identity" in HELLO_ACK."""

    TYPE = FrameType.IDENTITY
    COMPILE = False  # parsed once, in a just-restored guest where compiling the codec is slow
    SCHEMA = Struct("hostname" / Str, "clone_id" / Str, "epoch_ns" / Int64ub, "hosts" / StrList)
    hostname: str
    clone_id: str
    epoch_ns: int
    hosts: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Exit(Message):
    TYPE = FrameType.EXIT
    SCHEMA = Struct(
        "code" / Int32sb, "signal" / Int8ub, "timed_out" / Flag, "duration_us" / Int64ub
    )
    code: int  # -1 when killed by a signal
    signal: int
    timed_out: bool
    duration_us: int

    @classmethod
    def parse(cls, payload: bytes) -> Any:
        """SCHEMA's reading of the usual 14 bytes by struct (one EXIT per command: construct
        took ~30 us of the host's part of each); anything else as declared (property-tested)."""
        if len(payload) != _EXIT_STRUCT.size:
            return super().parse(payload)
        code, signal, timed_out, duration_us = _EXIT_STRUCT.unpack(payload)
        return cls(code, signal, timed_out != 0, duration_us)


_EXIT_STRUCT = struct.Struct(">iBBQ")  # Exit.SCHEMA's bytes (property-tested)
_EXIT_TYPE = int(FrameType.EXIT)


def exec_end(request_id: int, code: int, signal: int, timed_out: bool, duration_us: int) -> bytes:
    """`Exit(...).frame(request_id)` without the typed codec: one per command in the guest,
    where each interpreted line counts (property-tested equal).  The EXIT ends the command's
    STDOUT and STDERR: no end-of-stream frame goes before it."""
    try:
        payload = _EXIT_STRUCT.pack(code, signal, bool(timed_out), duration_us)
    except struct.error as e:
        raise FrameError(f"cannot encode EXIT: {e}") from None
    head = _HEAD_NO_CRC.pack(MAGIC, VERSION, _EXIT_TYPE, 0, request_id, _EXIT_STRUCT.size)
    head += zlib.crc32(head).to_bytes(4, "big")
    return head + payload + zlib.crc32(payload, zlib.crc32(head)).to_bytes(4, "big")


def credit_frame(request_id: int, amount: int) -> bytes:
    """`Credit(amount).frame(request_id)` without the typed codec: a receiver sends one per
    window's worth of data (construct built it in ~0.6 ms under TCG)."""
    try:
        payload = amount.to_bytes(4, "big")
    except OverflowError as e:
        raise FrameError(f"cannot encode CREDIT: {e}") from None
    return encode_frame(FrameType.CREDIT, request_id, payload)


@dataclasses.dataclass(frozen=True)
class Signal(Message):
    TYPE = FrameType.SIGNAL
    SCHEMA = Struct("signum" / Int8ub)
    signum: int


@dataclasses.dataclass(frozen=True)
class FilePut(Message):
    """Write a file; FILE_DATA frames follow, then an empty FILE_DATA; answered by FILE_DONE."""

    TYPE = FrameType.FILE_PUT
    SCHEMA = Struct(
        "path" / Str,
        "mode" / Int32ub,
        "owner" / Str,
        "size" / Int64ub,
        "sha256" / Blob,
        "mkdirs" / Flag,
    )
    path: str
    mode: int = 0o644
    owner: str = ""  # "user" or "user:group"; empty keeps the agent's
    size: int = 0
    sha256: bytes = b""
    mkdirs: bool = True


@dataclasses.dataclass(frozen=True)
class FileGet(Message):
    """Read a file; answered by FILE_DATA frames, an empty FILE_DATA, then FILE_DONE."""

    TYPE = FrameType.FILE_GET
    SCHEMA = Struct("path" / Str)
    path: str


@dataclasses.dataclass(frozen=True)
class FileDone(Message):
    TYPE = FrameType.FILE_DONE
    SCHEMA = Struct("size" / Int64ub, "sha256" / Blob, "mode" / Int32ub)
    size: int
    sha256: bytes
    mode: int


@dataclasses.dataclass(frozen=True)
class Credit(Message):
    TYPE = FrameType.CREDIT
    SCHEMA = Struct("amount" / Int32ub)
    amount: int

    @classmethod
    def parse(cls, payload: bytes) -> Any:
        """SCHEMA's reading of the usual 4 bytes without construct (one CREDIT per
        CREDIT_BATCH of a stream's window; construct took ~0.2 ms each under TCG); anything else as declared."""
        if len(payload) == 4:
            return cls(int.from_bytes(payload, "big"))
        return super().parse(payload)


@dataclasses.dataclass(frozen=True)
class Ping(Message):
    TYPE = FrameType.PING
    SCHEMA = Struct("data" / Blob)
    data: bytes = b""


@dataclasses.dataclass(frozen=True)
class Pong(Message):
    TYPE = FrameType.PONG
    SCHEMA = Struct("data" / Blob)
    data: bytes = b""


@dataclasses.dataclass(frozen=True)
class Error(Message):
    TYPE = FrameType.ERROR
    SCHEMA = Struct("code" / Int16ub, "message" / Str)
    code: int
    message: str


MESSAGES: dict[int, type[Message]] = {
    m.TYPE: m
    for m in (
        Hello, HelloAck, AuthChallenge, Auth, Announce, Exec, Identity, Exit, Signal, FilePut, FileGet, FileDone,
        Credit, Ping, Pong, Error,
    )
}


def _blob_data(payload: bytes) -> bytes | None:
    """The data of `payload` when it is exactly one `Blob` (VarInt length, then that many
    bytes), else None."""
    length, shift = 0, 0
    for i, byte in enumerate(payload[:10]):
        length |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return payload[i + 1:] if len(payload) == i + 1 + length else None
    return None


def ping_frame(data: bytes) -> bytes:
    """`Ping(data).frame(HANDSHAKE_REQUEST_ID)` without the typed codec (the same bytes)."""
    return encode_frame(FrameType.PING, HANDSHAKE_REQUEST_ID, _varint(len(data)) + data)


def pong_data(pong: Frame) -> bytes | None:
    """`Pong.parse(pong.payload).data` without the typed codec, or None when malformed."""
    return _blob_data(pong.payload)


def pong_frame(ping: Frame) -> bytes | None:
    """The PONG answering `ping`, built without the typed codec (PING and PONG payloads are the
    same `Blob`, so the payload is echoed once checked): under TCG the codec round trip costs
    more than the transport does.  None when the payload is malformed (the caller reports it)."""
    if _blob_data(ping.payload) is None:
        return None
    return encode_frame(FrameType.PONG, ping.request_id, ping.payload)


PING_FAST_MAX = 64  # payload bytes of a PING answered by pong_for_ping (ping() sends 9)
_PONG_PREFIX = MAGIC + bytes((VERSION, FrameType.PONG, 0, 0))  # a PONG header up to the request id


def pong_for_ping(data: bytes | memoryview) -> bytes | None:
    """The PONG answering `data` when it is exactly one intact PING with a short, minimally
    encoded payload (what pong_frame gives for the frame a Decoder yields from it), else None:
    the caller goes on with lone_frame or its decoder.  The agent's reader tries it first: a
    PING answered in ~10 interpreted lines where the frame path runs 45, and each cost ~15 us of
    the guest's CPU under TCG (docs/benchmarks.md, the sixth round)."""
    size = len(data)
    if not HEADER_SIZE + TRAILER_SIZE < size <= HEADER_SIZE + PING_FAST_MAX + TRAILER_SIZE or data[5] != _PING:
        return None
    if (data[:4] != MAGIC or data[4] < MIN_VERSION
            or data[HEADER_SIZE] != size - HEADER_SIZE - TRAILER_SIZE - 1  # the Blob's one-byte length
            or int.from_bytes(data[12:16], "big") != size - HEADER_SIZE - TRAILER_SIZE
            or zlib.crc32(data[: HEADER_SIZE - 4]) != int.from_bytes(data[HEADER_SIZE - 4 : HEADER_SIZE], "big")
            or zlib.crc32(data[: size - TRAILER_SIZE]) != int.from_bytes(data[size - TRAILER_SIZE :], "big")):
        return None
    head = _PONG_PREFIX + data[8:16]  # the request id and the payload's length, echoed
    head += zlib.crc32(head).to_bytes(4, "big")
    payload = data[HEADER_SIZE : size - TRAILER_SIZE]
    return head + payload + zlib.crc32(payload, zlib.crc32(head)).to_bytes(4, "big")


_PING = int(FrameType.PING)


def lone_frame(data: bytes | memoryview, max_frame: int = DEFAULT_MAX_FRAME) -> Frame | None:
    """The frame `data` holds when it is exactly one intact frame with a payload below
    COMBINED_CHECK_FROM (the one event a fresh Decoder yields for it), else None: the caller
    feeds its decoder.  The agent's reader takes a lone request (a PING, an EXEC) this way: the
    decoder's generator and buffer run ~30 interpreted lines more per frame, and under TCG each
    line costs the guest CPU (docs/benchmarks.md, the sixth round)."""
    size = len(data)
    if not HEADER_SIZE + TRAILER_SIZE <= size < HEADER_SIZE + COMBINED_CHECK_FROM + TRAILER_SIZE:
        return None
    magic, version, ftype, flags, request_id, length, header_crc = HEADER_STRUCT.unpack_from(data)
    if (magic != MAGIC or version < MIN_VERSION or length > max_frame or size != HEADER_SIZE + length + TRAILER_SIZE
            or zlib.crc32(data[: HEADER_SIZE - 4]) != header_crc
            or zlib.crc32(data[: size - TRAILER_SIZE]) != int.from_bytes(data[size - TRAILER_SIZE :], "big")):
        return None
    # The tuple made in C: Frame(...) runs NamedTuple's generated __new__, a Python call
    return _new_tuple(Frame, (ftype, request_id, bytes(data[HEADER_SIZE : size - TRAILER_SIZE]), flags, version, None))


_new_tuple = tuple.__new__


def parse_message(frame: Frame) -> Any:
    """The typed message of a control frame (raises FrameError), or raw bytes for data frames."""
    cls = MESSAGES.get(frame.type)  # control frames first: an EXEC per command
    if cls is not None:
        return cls.parse(frame.payload)
    if frame.type in DATA_TYPES:
        return frame.payload
    raise FrameError(f"unknown frame type {frame.type}")


# A (re)starting agent cannot know whether the host's decoder holds half a frame of the
# previous session (a guest reset mid-frame), whose intact header makes the decoder wait for up
# to a frame's length more.  Zeros (never a magic) longer than any frame complete that wait;
# the damaged frame then fails its CRC and the decoder finds the ANNOUNCE after the padding.
RESYNC_PADDING = bytes(DEFAULT_MAX_FRAME + HEADER_SIZE + TRAILER_SIZE)


def announce_bytes(announce: Announce) -> bytes:
    """What an agent writes when it starts serving a connection: padding, then ANNOUNCE."""
    return RESYNC_PADDING + announce.frame(HANDSHAKE_REQUEST_ID)


def negotiate_version(min_version: int, max_version: int) -> int:
    """The highest version both sides speak, or ProtocolError."""
    best = min(max_version, VERSION)
    if best < max(min_version, MIN_SESSION_VERSION):
        raise ProtocolError(
            f"no common protocol version: peer speaks {min_version}..{max_version}, "
            f"we speak {MIN_SESSION_VERSION}..{VERSION}"
        )
    return best


# ---------------------------------------------------------------------------------------------
# Authentication.  The runner writes a per-run secret into the node's private state folder and
# the VMM hands it to the guest (QEMU: a fw_cfg file).  A keyed agent answers HELLO with a fresh
# challenge and serves nothing (ERROR AUTH) until the host proves it knows the key:
#
#   host → HELLO(nonce)   agent → AUTH_CHALLENGE(nonce, challenge)
#   host → AUTH(nonce, HMAC(key, host ‖ challenge ‖ nonce))
#   agent → HELLO_ACK(..., proof = HMAC(key, agent ‖ challenge ‖ nonce))  or ERROR AUTH
#
# One extra round trip per session.  The challenge is used once, so a recorded proof is worth
# nothing; the roles differ, so the agent's proof cannot be reflected as the host's.  An agent
# without a key answers HELLO with HELLO_ACK at once (empty proof), as before.

AUTH_HOST = b"host"
AUTH_AGENT = b"agent"
CHALLENGE_BYTES = 32  # as long as the HMAC: guessing one is no easier than guessing the key
MIN_KEY_BYTES = 16  # a shorter key is refused by both sides (the runner writes 32)
_AUTH_CONTEXT = b"ntng-backdoor-auth-v2"


def auth_proof(key: bytes, role: bytes, challenge: bytes, nonce: bytes) -> bytes:
    """HMAC-SHA256 over role, challenge and nonce, each length-prefixed (no ambiguity)."""
    parts = (_AUTH_CONTEXT, role, challenge, nonce)
    msg = b"".join(len(p).to_bytes(4, "big") + p for p in parts)
    return hmac.new(key, msg, hashlib.sha256).digest()


def proof_matches(expected: bytes, got: bytes) -> bool:
    return hmac.compare_digest(expected, got)


# ---------------------------------------------------------------------------------------------
# Stream decoding with resynchronisation.


@dataclasses.dataclass(frozen=True)
class Garbage:
    """Bytes the decoder skipped, and why (noise before a magic, bad CRC, oversized length)."""

    size: int
    reason: str
    request_id: int | None = None  # set when a damaged frame's header looked plausible


# Frames at least this long are checked as CRC(header) combined with CRC(payload), the latter
# kept on the Frame; below it one CRC over both is cheaper than the combine (pure Python).
COMBINED_CHECK_FROM = 64 * 1024


class Decoder:
    """Incremental frame decoder.  feed() bytes, iterate events(): Frame or Garbage.

    Never raises on input: damaged data is reported as Garbage and skipped up to the next
    magic.  Memory is bounded by max_frame plus one read.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        # Bytes run through a payload CRC that failed: each fake header with a valid header CRC
        # costs a whole frame's CRC, so a receiver may bound this per connection.
        self.crc_failed_bytes = 0
        self._buf = bytearray()
        self._pending_garbage = 0
        self._need = 0  # bytes needed before the next parse attempt is worth it

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def events(self) -> Iterator[Frame | Garbage]:
        buf = self._buf
        if len(buf) < self._need:
            return  # the frame whose header we checked is still incomplete: skip re-parsing
        self._need = 0
        while True:
            if not buf and not self._pending_garbage:
                return  # all taken (a batch usually ends at a frame's end): nothing to search
            start = buf.find(MAGIC)
            if start < 0:
                # Keep a tail that may be the beginning of a magic split across reads.
                keep = _magic_prefix_len(buf)
                self._skip(len(buf) - keep, buf)
                if self._pending_garbage and not buf:
                    yield self._flush_garbage("noise without frame magic")
                return
            if start:
                self._skip(start, buf)
            if len(buf) < HEADER_SIZE:
                return
            _magic, version, ftype, flags, request_id, length, header_crc = HEADER_STRUCT.unpack_from(buf)
            if zlib.crc32(buf[: HEADER_SIZE - 4]) != header_crc:
                self._skip(1, buf)
                continue  # the magic was noise: keep counting it as garbage
            if version < MIN_VERSION or length > self.max_frame:
                if self._pending_garbage:
                    yield self._flush_garbage("noise before frame")
                why = (
                    f"unsupported version {version}"
                    if version < MIN_VERSION
                    else f"length {length} exceeds limit {self.max_frame}"
                )
                self._skip(1, buf)
                yield self._flush_garbage(f"bad header ({why})")
                continue
            total = HEADER_SIZE + length + TRAILER_SIZE
            if len(buf) < total:
                self._need = total
                return
            if self._pending_garbage:
                yield self._flush_garbage("noise before frame")
            # CRC over a view and one copy of the payload: under TCG every copy costs.  A large
            # payload's own CRC is kept (payload_crc) so a whole-file CRC needs no second pass.
            payload_crc = None
            with memoryview(buf) as view:
                trailer = int.from_bytes(view[total - TRAILER_SIZE : total], "big")
                if length >= COMBINED_CHECK_FROM:
                    payload_crc = zlib.crc32(view[HEADER_SIZE : total - TRAILER_SIZE])
                    crc = crc32_combine(zlib.crc32(view[:HEADER_SIZE]), payload_crc, length)
                else:
                    crc = zlib.crc32(view[: total - TRAILER_SIZE])
                crc_ok = crc == trailer
                payload = bytes(view[HEADER_SIZE : total - TRAILER_SIZE]) if crc_ok else b""
            if not crc_ok:
                self.crc_failed_bytes += total
                # Skip only the magic: a real frame may start inside this fake one.
                self._skip(1, buf)
                yield self._flush_garbage("bad CRC", request_id)
                continue
            del buf[:total]
            yield Frame(ftype, request_id, payload, flags, version, payload_crc)

    def _skip(self, n: int, buf: bytearray) -> None:
        if n > 0:
            del buf[:n]
            self._pending_garbage += n

    def _flush_garbage(self, reason: str, request_id: int | None = None) -> Garbage:
        g = Garbage(self._pending_garbage, reason, request_id)
        self._pending_garbage = 0
        return g


def _magic_prefix_len(buf: bytearray) -> int:
    for n in range(min(len(MAGIC) - 1, len(buf)), 0, -1):
        if buf.endswith(MAGIC[:n]):
            return n
    return 0


def decode_all(data: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> list[Frame | Garbage]:
    d = Decoder(max_frame)
    d.feed(data)
    return list(d.events())


# ---------------------------------------------------------------------------------------------
# Flow control.


class SendWindow:
    """Credit held by a data sender.  take() blocks until the peer has granted enough.

    The Condition a waiting take() needs is made on first wait: there is a window per
    request, and most commands never wait for credit (threading.Condition() runs ~14
    interpreted lines per request, each guest CPU under TCG)."""

    _closed: str | None = None
    _cond: threading.Condition | None = None

    def __init__(self, window: int) -> None:
        self._credit = window
        self._lock = threading.Lock()

    @property
    def credit(self) -> int:
        return self._credit

    def grant(self, amount: int) -> None:
        with self._lock:
            self._credit += amount
            if self._cond is not None:
                self._cond.notify_all()

    def close(self, reason: str) -> None:
        with self._lock:
            self._closed = reason
            if self._cond is not None:
                self._cond.notify_all()

    def take(self, wanted: int, timeout: float | None = None) -> int:
        """Reserve up to `wanted` bytes (at least 1); returns how many may be sent."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._credit <= 0:
                if self._closed is not None:
                    raise ProtocolError(self._closed)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError("no flow-control credit from the peer")
                if self._cond is None:
                    self._cond = threading.Condition(self._lock)
                self._cond.wait(remaining)
            if self._closed is not None:
                raise ProtocolError(self._closed)
            n = min(wanted, self._credit)
            self._credit -= n
            return n


CREDIT_BATCH = 0.5  # of the window: a receiver returns credit in batches this large


class ReceiveWindow:
    """Receiver-side accounting: data buffered but not yet consumed must stay within window."""

    buffered = 0  # received, not yet consumed (class defaults: one window per request)
    _unacked = 0  # consumed, credit not yet returned

    def __init__(self, window: int) -> None:
        self.window = window
        self._lock = threading.Lock()  # received() and consumed() run on different threads

    def received(self, n: int) -> None:
        with self._lock:
            outstanding = self.buffered + self._unacked
            if outstanding + n > self.window:
                raise LimitExceeded(
                    f"peer sent {n} bytes with {self.window - outstanding} bytes of window left"
                )
            self.buffered += n

    def consumed(self, n: int) -> int:
        """Mark n bytes consumed; returns credit to send back now, batched to CREDIT_BATCH of
        the window: the sender keeps at least the rest in flight (2 MiB at the default window,
        ~10 ms of a copy here), so batching never stalls it, and each CREDIT costs the sender a
        wake-up of its reader (~2 ms in a TCG guest: 0.10-0.14 s of a 64 MB get's 0.5-0.7 s
        at a quarter window)."""
        with self._lock:
            self.buffered -= n
            self._unacked += n
            if self._unacked >= max(1, int(self.window * CREDIT_BATCH)):
                out, self._unacked = self._unacked, 0
                return out
            return 0
