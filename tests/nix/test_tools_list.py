"""One source of truth for dependencies: nixlib/tools.nix (host programs) and pyproject.toml
(Python packages).  Fails when the Python starts a program the list lacks, or when the flake's
package (nixlib/pkgs/ntng.nix) disagrees with either."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from nixpkgs_lib import NIXPKGS_LIB, requires_nixpkgs_lib

from ntng.protocol import PACKAGE_VERSION

ROOT = Path(__file__).resolve().parents[2]
pytestmark = requires_nixpkgs_lib[1]  # nix-instantiate reads nixlib/tools.nix
NIX = ["nix-instantiate", "--eval", "--strict", "--json", "--readonly-mode", "--option", "build-users-group", ""]

# Calls that start their first argument (a list) as a program: subprocess's, and the runner's
# own helpers that pass argv on to them (pdeathsig.spawn, image._run).
STARTERS = {"run", "Popen", "check_output", "check_call", "call", "spawn", "_run"}
# Calls whose first argument is the name of a program looked up on PATH.
LOOKUPS = {"which", "_need"}


def nix_eval(*args: str) -> Any:
    r = subprocess.run([*NIX, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def tools() -> dict[str, Any]:
    return nix_eval(str(ROOT / "nixlib/tools.nix"))


def _callee(call: ast.Call) -> str | None:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


def _literal_head(node: ast.AST) -> str | None:
    """"x" of a list literal ["x", ...]."""
    if isinstance(node, ast.List) and node.elts:
        head = node.elts[0]
        if isinstance(head, ast.Constant) and isinstance(head.value, str):
            return head.value
    return None


def _argv_variables(scope: ast.AST) -> dict[str, set[str]]:
    """Variable → program names of the literal argv lists bound to it in `scope`:
    `cmd = ["x", ...]` and `for cmd in (["x", ...], ["y", ...])`."""
    bound: dict[str, set[str]] = {}
    for node in ast.walk(scope):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            values: list[ast.AST] = [node.value]
            target = node.targets[0].id
        elif isinstance(node, ast.For) and isinstance(node.target, ast.Name) \
                and isinstance(node.iter, ast.Tuple | ast.List):
            values, target = list(node.iter.elts), node.target.id
        else:
            continue
        for v in values:
            head = _literal_head(v)
            if head is not None:
                bound.setdefault(target, set()).add(head)
    return bound


def started_programs(source: str) -> set[str]:
    """Program names the code starts or looks up: the first element of a literal argv list
    given to a STARTERS call (directly or through a variable of the same function), and the
    literal name given to a LOOKUPS call."""
    found: set[str] = set()
    tree = ast.parse(source)
    scopes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))]
    for scope in scopes:
        variables = _argv_variables(scope)
        for node in ast.walk(scope):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name, first = _callee(node), node.args[0]
            if name in STARTERS:
                head = _literal_head(first)
                if head is not None:
                    found.add(head)
                elif isinstance(first, ast.Name):
                    found |= variables.get(first.id, set())
            elif name in LOOKUPS and isinstance(first, ast.Constant) and isinstance(first.value, str):
                found.add(first.value)
    return found


def python_programs() -> dict[str, set[str]]:
    """Program → the files of python/ntng that start it."""
    where: dict[str, set[str]] = {}
    for path in sorted((ROOT / "python/ntng").rglob("*.py")):
        for prog in started_programs(path.read_text()):
            where.setdefault(prog, set()).add(str(path.relative_to(ROOT)))
    return where


def test_the_scan_finds_programs_started_every_way() -> None:
    src = """
import shutil, subprocess
subprocess.run(["a", "x"]); subprocess.Popen(["b"]); subprocess.check_output(["c"])
shutil.which("d"); pdeathsig.spawn(["e", "--flag"]); _run(["f"], log); _need("g", "pkg")
subprocess.run([exe, "y"]); other(["h"])
def f():
    for cmd in (["i"], ["j", "-k"]):
        subprocess.run(cmd)
    argv = ["l"]
    subprocess.Popen(argv)
"""
    assert started_programs(src) == {"a", "b", "c", "d", "e", "f", "g", "i", "j", "l"}


def test_the_scan_sees_what_the_runner_is_known_to_start() -> None:
    found = python_programs()
    for prog in ("qemu-system-x86_64", "nix-instantiate", "tesseract", "debootstrap", "dmesg"):
        assert prog in found, (prog, sorted(found))


def test_every_program_the_python_starts_is_in_the_tools_list(tools: dict[str, Any]) -> None:
    missing = {p: sorted(files) for p, files in python_programs().items() if p not in tools}
    assert not missing, f"add these to nixlib/tools.nix (program: files that start it): {missing}"


def test_every_program_nixlibs_plans_name_is_in_the_tools_list(tools: dict[str, Any]) -> None:
    # node.nix's executable defaults (by their base name: virtiofsd is a path on Debian) and the
    # literal programs of every plan's `prepare` steps.
    defaults = nix_eval("-E", "(import ./nixlib/node.nix).defaults")
    keys = re.search(r"executables = \[([^]]*)\]", (ROOT / "nixlib/node.nix").read_text())
    assert keys, "nixlib/node.nix: no `executables = [ ... ]` list"
    names = {Path(defaults[k.strip('"')]).name for k in keys.group(1).split()}
    for plan in ("qemu.nix", "firecracker.nix", "cloud-hypervisor.nix", "node.nix"):  # node.nix: copyArgv
        for m in re.finditer(r'\[ "([a-z][a-z0-9_.-]*)" ', (ROOT / "nixlib" / plan).read_text()):
            if m.group(1) in ("rm", "cp", "touch"):  # prepare steps; other literals are QEMU flags
                names.add(m.group(1))
    # The network plan's programs (the rootless mode's switch).
    names.update(m.group(1) for m in re.finditer(r'Argv = [a-z]+: \[ "([a-z][a-z0-9_.-]*)" ',
                                                 (ROOT / "nixlib/network.nix").read_text()))
    assert names >= {"qemu-system-x86_64", "qemu-img", "firecracker", "cloud-hypervisor", "vhost-device-vsock",
                     "virtiofsd", "rm", "cp", "touch", "vde_switch"}
    assert not names - tools.keys(), f"add these to nixlib/tools.nix: {sorted(names - tools.keys())}"


def test_the_image_scripts_tools_are_listed(tools: dict[str, Any]) -> None:
    text = (ROOT / "nixlib/scripts/mkext4.sh").read_text()
    assert "mkfs.ext4" in text and "truncate" in text
    assert {"mkfs.ext4", "truncate", "od", "gzip", "xz", "zstd"} <= tools.keys()


def test_each_tool_says_where_it_comes_from_and_why(tools: dict[str, Any]) -> None:
    for name, t in tools.items():
        assert t["neededFor"], name
        assert t["nixpkgs"] or t["debian"], f"{name}: neither a nixpkgs attribute nor a Debian package"
        assert t["debianSuite"] in (None, "sid"), name
    required = {n for n, t in tools.items() if t["required"]}
    assert {"qemu-system-x86_64", "qemu-img", "nix-instantiate"} <= required


def test_setup_installs_the_lists_debian_packages_and_bootstraps_nix_first(tools: dict[str, Any]) -> None:
    own = nix_eval(str(ROOT / "nixlib/debian-packages.nix"), "-A", "own")
    sid = nix_eval(str(ROOT / "nixlib/debian-packages.nix"), "-A", "sid")
    wanted = {p for t in tools.values() for p in t["debian"]}
    assert set(own) | set(sid) == wanted and not set(own) & set(sid)
    assert sid == ["vhost-device-vsock"]
    setup = (ROOT / "setup.sh").read_text()
    assert "nixlib/debian-packages.nix" in setup
    # The one package named in setup.sh before the list can be read is the list's nix-instantiate.
    boot = re.search(r"^BOOTSTRAP=\(([^)]*)\)", setup, re.M)
    assert boot, "setup.sh: no BOOTSTRAP=(...) line"
    assert tools["nix-instantiate"]["debian"][0] in boot.group(1).split()
    assert setup.index("BOOTSTRAP=") < setup.index("nixlib/debian-packages.nix")


def needs_nixpkgs_lib(f: Any) -> Any:
    for mark in requires_nixpkgs_lib:
        f = mark(f)
    return f


@needs_nixpkgs_lib
def test_the_flake_package_takes_pyprojects_dependencies_and_the_tools_lists_path(tools: dict[str, Any]) -> None:
    app = nix_eval(str(ROOT / "tests/nix/eval-ntng-package.nix"), "--argstr", "libPath", NIXPKGS_LIB)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pypi = [re.match(r"[A-Za-z0-9._-]+", r).group(0).lower()  # type: ignore[union-attr]
            for r in project["dependencies"] + project["optional-dependencies"]["typecheck"]]
    assert app["pythonDependencies"] == pypi
    assert {"pyroute2", "mypy", "construct", "cffi"} <= set(app["pythonDependencies"])
    assert app["dependencies"] == pypi  # fake-nixpkgs' python3Packages.<name>.pname
    # The version is dynamic in pyproject: protocol.PACKAGE_VERSION is its one source.
    assert (app["pname"], app["version"]) == (project["name"], PACKAGE_VERSION)
    wrapped = {t["nixpkgs"] for t in tools.values() if t["wrapped"] and t["nixpkgs"]}
    assert set(app["toolPackages"]) == wrapped
    path = app["path"].split(":")
    assert len(path) == len(wrapped) and all(p.endswith("/bin") for p in path)
    for pkg in ("qemu_kvm", "nix", "vde2", "vhost-device-vsock", "virtiofsd", "tesseract4"):
        assert pkg in wrapped


def test_pypi_names_become_python3packages_attributes() -> None:
    project = ('{ dependencies = [ "PyYAML>=6" "typing_extensions ; python_version < \\"3.12\\"" "zope.interface" ]; '
               'optional-dependencies.typecheck = [ "mypy[reports]>=1" ]; }')
    deps = nix_eval("-E", f"import ./nixlib/pkgs/python-deps.nix {{ project = {project}; }}")
    assert deps["attributes"] == ["pyyaml", "typing-extensions", "zope-interface", "mypy"]
