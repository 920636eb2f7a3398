"""Copies through a share (python/ntng/shares.py), with the "guest" a local shell whose mount of
the share is the host folder itself."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from ntng import shares


class LocalShell:
    def __init__(self) -> None:
        self.commands: list[str] = []

    def succeed(self, *commands: str, timeout: int | None = None) -> str:
        out = ""
        for c in commands:
            self.commands.append(c)
            out += subprocess.run(["sh", "-c", c], check=True, capture_output=True, text=True).stdout
        return out


def share(path: Path, tag: str = "shared", read_only: bool = False) -> dict[str, Any]:
    path.mkdir(exist_ok=True)
    return {"tag": tag, "type": "9p", "source": str(path), "target": str(path), "readOnly": read_only}


def test_writable_share_prefers_the_artifacts_share(tmp_path: Path) -> None:
    a, b, c = share(tmp_path / "a", "data", True), share(tmp_path / "b", "rw"), share(tmp_path / "c")
    assert shares.writable_share({"shares": [a, b, c]}, "m")["tag"] == "shared"
    assert shares.writable_share({"shares": [a, b]}, "m")["tag"] == "rw"
    with pytest.raises(shares.ShareError, match=r"m: via=\"share\" needs a writable shared directory.*"
                                                r"nodes\.m = \{ shareArtifacts = true; \}"):
        shares.writable_share({"shares": [a]}, "m")
    with pytest.raises(shares.ShareError):
        shares.writable_share({}, "m")  # a hand-made plan without shares


def test_check_via() -> None:
    shares.check_via("share", "copy")
    with pytest.raises(ValueError, match="copy: via must be one of 'protocol', 'share', got 'nfs'"):
        shares.check_via("nfs", "copy")


def test_to_guest_file_and_directory_leave_nothing_staged(tmp_path: Path) -> None:
    sh, s = LocalShell(), share(tmp_path / "share")
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_text("deep\n")
    (src / "top").write_text("top\n")
    guest = tmp_path / "guest"
    shares.to_guest(sh, s, src, str(guest / "tree"))
    assert (guest / "tree" / "d" / "f").read_text() == "deep\n"
    shares.to_guest(sh, s, src / "top", str(guest / "new" / "dir" / "top.txt"))
    assert (guest / "new" / "dir" / "top.txt").read_text() == "top\n"
    assert list(Path(s["source"]).iterdir()) == []


def test_from_guest_moves_into_place_and_merges_directories(tmp_path: Path) -> None:
    sh, s = LocalShell(), share(tmp_path / "share")
    guest = tmp_path / "guest"
    (guest / "logs").mkdir(parents=True)
    (guest / "logs" / "a").write_text("a\n")
    dest = tmp_path / "out"
    dest.mkdir()
    shares.from_guest(sh, s, str(guest / "logs") + "/", dest)
    (guest / "logs" / "b").write_text("b\n")
    shares.from_guest(sh, s, str(guest / "logs"), dest)  # again, into the existing folder
    assert sorted(p.name for p in (dest / "logs").iterdir()) == ["a", "b"]
    shares.from_guest(sh, s, str(guest / "logs" / "a"), dest)
    assert (dest / "a").read_text() == "a\n"
    assert list(Path(s["source"]).iterdir()) == []
