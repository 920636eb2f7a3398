"""docs/nixos-fidelity.md against the stand-ins and the code.

Every NixOS option, nixpkgs attribute and lib function that modules/, nixlib/mkTest.nix and
nixlib/pkgs/ use has a row naming the nixpkgs source its declaration was read from; every
stand-in declaration (tests/nix/nixos-stand-ins.nix, tests/nix/fake-nixpkgs/) has a row, and the
row's `file:line` is where evalModules (or unsafeGetAttrPos) finds it.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from nixpkgs_lib import NIXPKGS_LIB, requires_nixpkgs_lib

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DOC = ROOT / "docs" / "nixos-fidelity.md"
pytestmark = requires_nixpkgs_lib

# A nixpkgs path, then the commit read_file reported or the id of a find_string hit.
SOURCE = re.compile(r"`(nixos|pkgs)/[\w./-]+`[^|]*?(@ ([0-9a-f]{40}|id \d+))")
# fake-nixpkgs attributes that are test helpers, not nixpkgs names the code uses.
HELPERS = {"pkgs.storePath", "pkgs.stdenv"}
# nixlib/pkgs/*.nix arguments that callers pass, not pkgs attributes.
CALLER_ARGS = {"toplevel", "size", "label", "kernel", "kernelFile", "project", "extras"}
USERS = [*sorted((ROOT / "modules").glob("*.nix")), ROOT / "nixlib/mkTest.nix", *sorted((ROOT / "nixlib/pkgs").glob("*.nix"))]


def tables() -> dict[str, list[list[str]]]:
    """Rows of the doc's tables by section heading: cells without the outer pipes."""
    sections: dict[str, list[list[str]]] = {}
    heading = ""
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            heading = line[3:].strip()
        elif line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            sections.setdefault(heading, []).append(cells)
    return sections


def name_of(cell: str) -> str:
    m = re.fullmatch(r"`([^`]+)`", cell)
    assert m, cell
    return m.group(1)


@functools.cache
def stand_ins() -> Any:
    cmd = ["nix-instantiate", "--eval", "--strict", "--json", "--readonly-mode",
           "--option", "build-users-group", "", str(HERE / "eval-stand-ins.nix"), "--argstr", "libPath", NIXPKGS_LIB]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def rows(section: str) -> dict[str, list[str]]:
    found = tables()[section]
    names = [name_of(r[0]) for r in found]
    assert len(names) == len(set(names)), f"duplicate rows in {section}"
    return dict(zip(names, found, strict=True))


def test_the_doc_has_the_three_tables() -> None:
    assert {"NixOS options", "nixpkgs attributes", "nixpkgs `lib` functions"} <= set(tables())


def test_every_stand_in_option_has_a_row() -> None:
    declared = {o for o in stand_ins()["options"] if "_module" not in o}
    assert declared - set(rows("NixOS options")) == set()


@pytest.mark.parametrize("section", ["NixOS options", "nixpkgs attributes"])
def test_every_row_names_a_nixpkgs_source_and_the_stand_ins_declaration(section: str) -> None:
    where = stand_ins()["options" if section == "NixOS options" else "packages"]
    for name, cells in rows(section).items():
        assert SOURCE.search(cells[2]), f"{name}: no nixpkgs file @ commit (or id) in {cells[2]!r}"
        assert name in where, f"{name}: the stand-ins do not declare it"
        stand_in = name_of(cells[-2] if section == "NixOS options" else cells[-1])
        declared = where[name] if isinstance(where[name], list) else [where[name]]
        assert stand_in in declared, f"{name}: the doc says {stand_in}, it is declared at {declared}"
        assert (ROOT / stand_in.split(":")[0]).is_file()


def test_every_fake_nixpkgs_attribute_has_a_row() -> None:
    fake = set(stand_ins()["packages"]) - HELPERS - {"pkgs.lib"}
    assert fake - set(rows("nixpkgs attributes")) == set()


def used_pkgs_attributes() -> set[str]:
    """pkgs.<name> in the code, the tools list's attributes and nixlib/pkgs' callPackage arguments."""
    used = {m for f in USERS for m in re.findall(r"\bpkgs\.([A-Za-z0-9_-]+(?:\.hostPlatform)?)", f.read_text())}
    for f in sorted((ROOT / "nixlib/pkgs").glob("*.nix")):
        head = re.search(r"^\{([^}]*)\}:", f.read_text(), re.M)
        assert head, f
        used |= {a.split("?")[0].strip() for a in head.group(1).split(",")} - CALLER_ARGS - {"", "lib", "pkgs"}
    tools = subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", str(ROOT / "nixlib/tools.nix")],
                           capture_output=True, text=True, timeout=60, check=True)
    used |= {t["nixpkgs"] for t in json.loads(tools.stdout).values() if t["nixpkgs"]}
    return {f"pkgs.{u}" for u in used}


def test_every_nixpkgs_attribute_the_code_uses_has_a_row() -> None:
    used = used_pkgs_attributes()
    assert {"pkgs.qemu_kvm", "pkgs.vde2", "pkgs.kmod", "pkgs.closureInfo", "pkgs.python3Packages"} <= used
    assert used - set(rows("nixpkgs attributes")) == set()


def test_every_python_dependency_is_a_python3packages_row() -> None:
    deps = subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", "--expr",
                           f"(import {ROOT}/nixlib/pkgs/python-deps.nix {{ project = (builtins.fromTOML "
                           f"(builtins.readFile {ROOT}/pyproject.toml)).project; }}).attributes"],
                          capture_output=True, text=True, timeout=60, check=True)
    names = {f"pkgs.python3Packages.{n}" for n in json.loads(deps.stdout)} | {"pkgs.python3Packages.setuptools"}
    assert names - set(rows("nixpkgs attributes")) == set()


def test_every_lib_function_the_code_uses_has_a_row_and_exists_in_nixpkgs_lib() -> None:
    used = set()
    for f in USERS:
        text = f.read_text()
        used |= set(re.findall(r"\blib\.((?:types\.ints\.|types\.|trivial\.)?[A-Za-z_][\w']*)", text))
        if re.search(r"inherit \(lib\)[^;]*\btypes\b", text):
            used |= {f"types.{t}" for t in re.findall(r"(?<![\w.])types\.((?:ints\.)?\w+)", text)}
        for names in re.findall(r"inherit \(lib\)([^;]*);", text):
            used |= {n for n in names.split() if n != "types"}
    used -= {"mkTest"}  # lib.mkTest in comments: ours
    documented = {n.removeprefix("lib.") for n in rows("nixpkgs `lib` functions")}
    assert used - documented == set()
    assert documented - set(stand_ins()["lib"]) == set()


@pytest.mark.parametrize(("line", "problem"), [
    ("| `boot.kernelParams` | x | read somewhere | t | `tests/nix/nixos-stand-ins.nix:44` | yes |", "no nixpkgs file"),
    ("| `boot.kernelParams` | x | `nixos/modules/system/boot/kernel.nix` @ id 1 | t | `tests/nix/nixos-stand-ins.nix:1` | yes |", "declared at"),
])
def test_the_check_catches_a_bad_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: str, problem: str) -> None:
    doc = re.sub(r"^\| `boot\.kernelParams` .*$", lambda _: line, DOC.read_text(), flags=re.M)
    (tmp_path / "doc.md").write_text(doc)
    monkeypatch.setattr(__import__(__name__), "DOC", tmp_path / "doc.md")
    with pytest.raises(AssertionError, match=problem):
        test_every_row_names_a_nixpkgs_source_and_the_stand_ins_declaration("NixOS options")
