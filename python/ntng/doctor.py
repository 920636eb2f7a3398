"""`ntng doctor`: every part a run may need, ok / missing / degraded, and what to install.

The host programs are nixlib/tools.nix (the list the flake's PATH and ./setup.sh come from),
the Python packages are this package's own requirements.  A part the list marks `required`
(and the Python dependencies) is *missing* without it: doctor exits non-zero.  Anything else
absent is *degraded*: the feature it serves does not work, the rest does.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from . import accel, image, network, nixeval, paths
from .errors import EXIT_OK, EXIT_SETUP, NtngError, SetupError

OK, MISSING, DEGRADED = "ok", "missing", "degraded"
DISTRIBUTION = "nixos-test-ng"
# Off PATH for ordinary users on Debian, where debootstrap and mkfs.ext4 live.
SBIN = ("/usr/sbin", "/sbin")


@dataclasses.dataclass(frozen=True)
class Tool:
    """One entry of nixlib/tools.nix."""
    name: str
    required: bool
    debian: tuple[str, ...]
    debian_suite: str | None
    nixpkgs: str | None
    paths: tuple[str, ...]
    needed_for: str

    @staticmethod
    def from_nix(name: str, t: dict[str, Any]) -> Tool:
        return Tool(name, t["required"], tuple(t["debian"]), t["debianSuite"], t["nixpkgs"], tuple(t["paths"]),
                    t["neededFor"])

    def install(self) -> str:
        ways = []
        if self.debian:
            ways.append("apt-get install " + " ".join(self.debian)
                        + (f" (Debian {self.debian_suite})" if self.debian_suite else ""))
        if self.nixpkgs:
            ways.append(f"Nix: pkgs.{self.nixpkgs}")
        return "; ".join(ways) or "see its project's releases"


# Needed to read the list itself: what doctor says when nix-instantiate is not there
# (tests check it against nixlib/tools.nix).
NIX_INSTANTIATE = Tool("nix-instantiate", True, ("nix-bin",), None, "nix", (),
                       "every run: nixlib plans each VM's command line")


@dataclasses.dataclass(frozen=True)
class Part:
    status: str  # OK, MISSING or DEGRADED
    name: str
    detail: str
    reasons: tuple[str, ...] = ()  # one line each, below the part


def load_tools() -> dict[str, Tool]:
    """nixlib/tools.nix, evaluated; only nix-instantiate when it cannot be evaluated."""
    try:
        value, stderr = nixeval.evaluate("tools.nix", [])
    except FileNotFoundError as e:  # no nixlib/ at all: an incomplete install
        raise SetupError(str(e)) from None
    except NtngError:
        return {NIX_INSTANTIATE.name: NIX_INSTANTIATE}
    if stderr is not None:
        why = nixeval.nix_message(stderr).removeprefix("nixlib: ")
        raise SetupError(f"the tool list {paths.nixlib_dir() / 'tools.nix'} cannot be read: {why}")
    return {name: Tool.from_nix(name, t) for name, t in value.items()}


def locate(tool: Tool) -> str | None:
    """Where the program is: on PATH, in sbin, or at a path the list names."""
    found = shutil.which(tool.name)
    if found:
        return found
    for candidate in (*tool.paths, *(f"{d}/{tool.name}" for d in SBIN)):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def tool_part(tool: Tool) -> Part:
    where = locate(tool)
    if where is not None:
        return Part(OK, tool.name, where)
    return Part(MISSING if tool.required else DEGRADED, tool.name,
                f"not found; needed for {tool.needed_for}: {tool.install()}")


def tool_parts(tools: dict[str, Tool]) -> list[Part]:
    parts = [tool_part(t) for t in sorted(tools.values(), key=lambda t: (not t.required, t.name))]
    if set(tools) == {NIX_INSTANTIATE.name}:
        parts.append(Part(MISSING, "tool list", "nixlib/tools.nix needs nix-instantiate to be read: "
                                                "install it and run doctor again"))
    return parts


def _requirement_name(req: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    return m.group(1) if m else req


def _extra_of(req: str) -> str | None:
    m = re.search(r"""extra\s*==\s*["']([^"']+)["']""", req)
    return m.group(1) if m else None


def requirements() -> list[str] | None:
    """This package's requirements as in its metadata (`name; extra == "x"` for extras): from
    pyproject.toml in a source tree (the installed metadata may be older), else installed."""
    try:
        pyproject = paths.data_root() / "pyproject.toml"
    except FileNotFoundError:
        pyproject = None
    if pyproject is not None and pyproject.is_file():
        project = tomllib.loads(pyproject.read_text())["project"]
        extras = project.get("optional-dependencies", {})
        return list(project.get("dependencies", [])) + [
            f'{req}; extra == "{extra}"' for extra, reqs in extras.items() for req in reqs]
    try:
        return importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return None


def python_parts(requires: list[str] | None = None) -> list[Part]:
    """This package's requirements: a runtime one missing is MISSING, the typecheck extra's
    DEGRADED (the quick check then skips typing)."""
    if requires is None:
        requires = requirements()
        if requires is None:
            return [Part(DEGRADED, "python packages", f"neither pyproject.toml nor an installed {DISTRIBUTION}: "
                                                      "its requirements cannot be checked")]
    parts = []
    for req in requires:
        extra = _extra_of(req)
        if extra not in (None, "typecheck"):
            continue  # dev tools
        name = _requirement_name(req)
        try:
            parts.append(Part(OK, f"{name} (Python)", importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            if extra is None:
                parts.append(Part(MISSING, f"{name} (Python)", f"not installed: pip install {name} "
                                                              "(a dependency of the runner)"))
            else:
                parts.append(Part(DEGRADED, f"{name} (Python)",
                                  f"not installed: `ntng check` skips the type check: "
                                  f"pip install '{DISTRIBUTION}[{extra}]'"))
    return parts


def image_part() -> tuple[Part, Path | None]:
    try:
        img = image.find_image()
    except NtngError as e:
        return Part(DEGRADED, "guest image", f"{e} (scripts run with --spec-dir, e.g. mkTest's, "
                                             "do not need it)"), None
    return Part(OK, "guest image", str(img.directory)), img.kernel


def kvm_part(kernel: Path | None) -> Part:
    tcg = "runs use TCG (about 10x slower)"
    problem = accel.kvm_device_problem()
    if problem:
        return Part(DEGRADED, "KVM", tcg, tuple(kvm_device_reasons(problem)))
    if kernel is None:
        return Part(DEGRADED, "KVM", "/dev/kvm is usable; not probed: the boot probe needs the guest image")
    works, why = accel.probe_kvm(kernel)
    if works:
        return Part(OK, "KVM", why)
    return Part(DEGRADED, "KVM", "not usable here: " + tcg, tuple(why.split("; ")))


def kvm_device_reasons(problem: str) -> list[str]:
    reasons = [problem]
    if not os.path.exists("/dev/kvm"):
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            flags = ""
        if not re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.M):
            reasons.append("the CPU shows no vmx/svm flag: no hardware virtualisation (in a VM: nested "
                           "virtualisation is off)")
        elif not Path("/sys/module/kvm").exists():
            reasons.append("the CPU can virtualise but the kvm module is not loaded: modprobe kvm_intel "
                           "(or kvm_amd)")
    return reasons


def network_parts(netem_on_host: Callable[[], bool]) -> list[Part]:
    mode = network.choose_mode("auto", lambda _msg: None)
    if mode != "tap":
        return [Part(DEGRADED, "networks", "no CAP_NET_ADMIN or /dev/net/tun: rootless VDE switches "
                                           "(no link counters, no forward_port)")]
    parts = [Part(OK, "networks", "bridges + TAP devices in a private namespace")]
    if netem_on_host():
        parts.append(Part(OK, "impairment", "sch_netem on the host's taps"))
    else:
        parts.append(Part(DEGRADED, "impairment", "the host kernel has no sch_netem: applied with tc "
                                                  "inside the guests"))
    return parts


def vsock_part(tools: dict[str, Tool]) -> Part:
    if os.path.exists("/dev/vhost-vsock"):
        return Part(OK, "vsock", "/dev/vhost-vsock")
    hybrid = tools.get("vhost-device-vsock")
    if hybrid is not None and locate(hybrid):
        return Part(OK, "vsock", "no /dev/vhost-vsock: hybrid vsock through vhost-device-vsock")
    return Part(DEGRADED, "vsock", "no /dev/vhost-vsock and no vhost-device-vsock: vsock backdoors on QEMU "
                                   "cannot start (virtio-serial, the default, works)")


def qemu_version() -> str | None:
    exe = shutil.which("qemu-system-x86_64")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.splitlines()[0] if out else None


def collect(netem_on_host: Callable[[], bool]) -> list[Part]:
    tools = load_tools()
    parts = tool_parts(tools) + python_parts()
    img, kernel = image_part()
    parts.append(img)
    parts.append(kvm_part(kernel if shutil.which("qemu-system-x86_64") else None))
    parts += network_parts(netem_on_host)
    parts.append(vsock_part(tools))
    return parts


def report(parts: list[Part], out: TextIO) -> int:
    """Print the parts; EXIT_SETUP when one is missing."""
    width = max(len(p.status) for p in parts)
    for p in parts:
        print(f"[{p.status:<{width}}] {p.name}: {p.detail}", file=out)
        for reason in p.reasons:
            print(f"{'':{width + 3}}- {reason}", file=out)
    version = qemu_version()
    if version:
        print(f"QEMU: {version}", file=out)
    print(f"cache: {paths.cache_dir()}", file=out)
    missing = [p.name for p in parts if p.status == MISSING]
    degraded = [p.name for p in parts if p.status == DEGRADED]
    if missing:
        print(f"ntng doctor: missing {', '.join(missing)}: runs cannot work until it is installed", file=out)
        return EXIT_SETUP
    print("ntng doctor: everything a run needs is here"
          + (f" (degraded: {', '.join(degraded)})" if degraded else ""), file=out)
    return EXIT_OK
