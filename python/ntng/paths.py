"""Where the project's non-Python parts (nixlib, backdoor, modules) and the user's cache live."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import SetupError


def data_root() -> Path:
    """The directory holding nixlib/, backdoor/ and modules/: $NTNG_DATA, the checkout this
    package sits in (editable installs), or the installed package's copy (ntng/_data, which
    setup.py puts in the wheel)."""
    env = os.environ.get("NTNG_DATA")
    if env:
        root = Path(env)
        if not (root / "nixlib" / "default.nix").is_file():
            raise SetupError(f"NTNG_DATA={env} has no nixlib/default.nix: point it at a checkout of "
                             f"nixos-test-ng (the folder with nixlib/, backdoor/, modules/), or unset it")
        return root
    here = Path(__file__).resolve().parent
    candidates = (here.parents[1], here / "_data")
    for candidate in candidates:
        if (candidate / "nixlib" / "default.nix").is_file():
            return candidate
    raise SetupError(f"nixos-test-ng's data (nixlib/, backdoor/, modules/) is in none of "
                     f"{', '.join(str(c) for c in candidates)}: this installation is incomplete "
                     f"(a wheel built without setup.py?). Reinstall it, or set NTNG_DATA to a checkout")


def nixlib_dir() -> Path:
    return data_root() / "nixlib"


def backdoor_dir() -> Path:
    return data_root() / "backdoor"


def protocol_source() -> Path:
    return Path(__file__).resolve().parent / "protocol.py"


def cache_dir() -> Path:
    base = os.environ.get("NTNG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ntng"
    )
    p = Path(base)
    p.mkdir(parents=True, exist_ok=True)
    return p


def private_dir(p: Path) -> Path:
    """`p` as a folder only its owner (the runner's user) can enter: state folders hold the
    VMs' sockets (QMP, console, backdoor, hybrid vsock) and the run's backdoor key."""
    p.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(p)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise SetupError(f"state folder {p} is not a folder of the runner's user (a symlink, or "
                         f"owned by uid {st.st_uid}): refusing to keep sockets and keys there")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(p, 0o700)  # made by an older runner with the default mode
    return p
