"""Host-side writes under a root folder that names chosen by a guest cannot lead out of.

The guest is untrusted: it chooses the names in a directory listing and, through a writable
share, can put symlinks into host folders at any moment.  So folders are created and opened one
component at a time relative to a directory fd, never following a symlink (O_NOFOLLOW), and
names are checked before use.  Code that takes a path (client.get_file) gets one through
/proc/self/fd/<fd>: it reaches the folder that was checked, whatever the names around it become.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from .errors import UnsafePath

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Bits a copied file or folder may keep: no setuid/setgid/sticky, not group- or world-writable.
SAFE_MODE_BITS = 0o755


def components(rel: str, what: str) -> list[str]:
    """The components of a relative path from an untrusted source; refuses absolute paths,
    empty, '.' and '..' components and NUL bytes."""
    if "\0" in rel:
        raise UnsafePath(f"{what}: {rel!r} contains a NUL byte")
    if rel.startswith("/"):
        raise UnsafePath(f"{what}: {rel!r} is absolute; only names below the copied folder are accepted")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafePath(f"{what}: {rel!r} has an empty, '.' or '..' component; refused so that "
                         "nothing is written outside the output folder")
    return parts


def source_name(source: str, what: str) -> str:
    """The host-side name of a copied guest path: its basename, which must be a real name."""
    name = os.path.basename(source.rstrip("/"))
    if name in ("", ".", "..") or "\0" in source:
        raise UnsafePath(f"{what}: {source!r} has no usable name (its last component is {name!r}); "
                         "name the file or folder itself, e.g. /var/log rather than /var/log/.")
    return name


def open_dir(path: Path | str) -> int:
    """A folder of our own (the run folder), by path."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def fd_path(dir_fd: int, name: str = "") -> Path:
    """A path that reaches the folder behind dir_fd itself, not whatever now has its name."""
    p = Path(f"/proc/self/fd/{dir_fd}")
    return p / name if name else p


def where(dir_fd: int) -> str:
    try:
        return os.readlink(fd_path(dir_fd))
    except OSError:
        return f"fd {dir_fd}"


def make_dirs(root_fd: int, parts: Sequence[str], what: str, mode: int = 0o755) -> int:
    """Create (or open) root/parts… one component at a time without following symlinks; returns
    an fd of the last folder (the caller closes it)."""
    fd = os.dup(root_fd)
    try:
        for p in parts:
            try:
                os.mkdir(p, mode & SAFE_MODE_BITS, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                nfd = os.open(p, DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                raise UnsafePath(f"{what}: {where(fd)}/{p} is a symlink or not a folder ({e.strerror}); "
                                 "refused: a copy never writes through a symlink") from None
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def check_under(dir_fd: int, root: Path, what: str) -> None:
    """Belt and braces: the folder behind dir_fd is root or below it."""
    here = os.path.realpath(fd_path(dir_fd))
    top = os.path.realpath(root)
    if here != top and not here.startswith(top.rstrip("/") + "/"):
        raise UnsafePath(f"{what}: {here} is outside {top}; refused")


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def open_regular(dir_fd: int, name: str) -> int | None:
    """Open dir_fd/name for reading if it is a regular file: never through a symlink, and a
    FIFO or device node (checked before and after the open) is not read.  None otherwise."""
    st = lstat_at(dir_fd, name)
    if st is None or not stat.S_ISREG(st.st_mode):
        return None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None  # swapped for a symlink (ELOOP) or removed since the lstat
    now = os.fstat(fd)
    if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        return None
    return fd


def write_from_fd(dir_fd: int, name: str, src_fd: int, mode: int, keep: int = SAFE_MODE_BITS) -> None:
    """dir_fd/name gets src_fd's bytes: written to a new file (O_EXCL|O_NOFOLLOW) that is then
    renamed over name, so an existing symlink there is replaced, never written through; the mode
    keeps the bits in `keep` only (SAFE_MODE_BITS for anything that lands on the host)."""
    tmp = f".{name}.ntng-partial"[:255]
    try:
        os.unlink(tmp, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                  dir_fd=dir_fd)
    try:
        try:
            while os.sendfile(out, src_fd, None, 1 << 30) > 0:
                pass
            os.fchmod(out, mode & keep)
        finally:
            os.close(out)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
