"""The run's backdoor secret: written by the runner into the node's private state folder before
the VMM starts, at the path nixlib's plan names (plan["backdoor"]["keyFile"]; QEMU hands the
file to the guest through fw_cfg), read back for the BackdoorClient.  It never goes into the
Nix store, an argv or the environment: only its path does."""

from __future__ import annotations

import os
from pathlib import Path

from . import protocol as P
from .errors import SetupError
from .plan import NodePlan

KEY_BYTES = 32  # the HMAC-SHA256 key size: longer adds nothing, shorter weakens it
_MAX_READ = 4096  # a key file is KEY_BYTES long; never read a planted large file whole


def key_file(plan: NodePlan) -> Path | None:
    """Where the plan keeps the node's key; None: its VMM has no way to hand one to the guest."""
    path = plan.get("backdoor", {}).get("keyFile")
    return None if path is None else Path(path)


def write(plan: NodePlan) -> None:
    """A fresh key for this start of the VMM (new at every start: crash(), -K runs)."""
    path = key_file(plan)
    if path is None:
        return
    try:
        path.unlink(missing_ok=True)  # the previous start's key (or whatever else is there)
        # O_EXCL|O_NOFOLLOW: a file made anew, never through a symlink; 0600 from the start.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(KEY_BYTES))
    except OSError as e:
        raise SetupError(f"cannot write the backdoor key {path}: {e.strerror or e}") from None


def read(plan: NodePlan) -> bytes | None:
    """The key the runner wrote for the plan's node, or None when the plan has none."""
    path = key_file(plan)
    if path is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise SetupError(f"cannot read the backdoor key {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise SetupError(f"the backdoor key {path} is readable by others or not the runner's "
                             f"(mode {st.st_mode & 0o7777:o}, owner uid {st.st_uid}): refusing it")
        key = f.read(_MAX_READ)
    if len(key) < P.MIN_KEY_BYTES:
        raise SetupError(f"the backdoor key {path} has {len(key)} bytes, fewer than {P.MIN_KEY_BYTES}")
    return key
