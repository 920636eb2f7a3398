"""An unknown node option: the closest one users set, and the list of those (not internal ones)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ntng import check, nixeval, paths
from ntng.errors import NixEvalError


def test_unknown_option_gets_did_you_mean_and_the_user_options(tmp_path: Path) -> None:
    p = tmp_path / "t.py"
    p.write_text("#: nodes.a = { };\n#: nodes.b = { memroy = 512; colour = 1; };\nstart_all()\n")
    with pytest.raises(NixEvalError) as e:
        check.check(p, type_check=False)
    msg = str(e.value)
    assert msg.startswith(f"{p}:2: node declaration rejected: node 'b': unknown option(s) colour, "
                          "memroy (did you mean memory?); the node options are: memory, cores, accel, ")
    options = msg.split("the node options are: ")[1].split(", ")
    listed = subprocess.run([nixeval.nix_instantiate(), "--eval", "--strict", "--json", "--readonly-mode", "-E",
                             f"(import {paths.nixlib_dir()}/node.nix).userOptions"],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    assert options == json.loads(listed)  # the one list, nixlib/node.nix's userOptions
    assert {"memory", "vlans", "sharedDirs", "display", "backend", "accel"} <= set(options)
    assert not {"stateDir", "tscKhz", "name", "interfaces", "restore"} & set(options)


def test_internal_options_are_still_accepted(tmp_path: Path) -> None:
    """The runner sets tscKhz itself; nixlib's list only hides it from users."""
    p = tmp_path / "t.py"
    p.write_text("#: nodes.a = { tscKhz = 2000000; };\nstart_all()\n")
    assert [f for f in check.check(p, type_check=False) if f.error] == []
