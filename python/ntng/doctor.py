"""`ntng doctor`: every part a run may need, ok / missing / degraded, and what to install.

The host programs are nixlib/tools.nix (the list the flake's PATH and ./setup.sh come from),
the Python packages are this package's own requirements.  A part the list marks `required`
(and the Python dependencies) is *missing* without it: doctor exits non-zero.  Anything else
absent is *degraded*: the feature it serves does not work, the rest does.

`ntng doctor SCRIPT` also checks what that script's nodes need (`script_parts`): each program
their launch plans start (VMMs, helpers such as virtiofsd or vhost-device-vsock), tesseract
for OCR, vde_switch or CAP_NET_ADMIN for networks, KVM for Firecracker and Cloud Hypervisor.
One of those missing is *missing*, whatever the list says in general.
"""

from __future__ import annotations

import ast
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
from .plan import NodePlan

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


# -- what one script's nodes need -------------------------------------------------------------

OCR_METHODS = ("get_screen_text", "get_screen_text_variants", "wait_for_text")


def _program_uses(plans: dict[str, NodePlan]) -> dict[str, list[str]]:
    """Each program the plans start (argv[0]) → why, one line per use."""
    uses: dict[str, list[str]] = {}
    for node, plan in plans.items():
        steps = [(plan.get("argv"), f"node {node}: its VMM ({plan.get('backend', '?')})")]
        steps += [(h.get("argv"), f"node {node}: helper {h.get('name', '?')}") for h in plan.get("helpers", [])]
        steps += [(argv, f"node {node}: preparing its disk") for argv in plan.get("prepare", [])]
        for argv, why in steps:
            if isinstance(argv, list) and argv and isinstance(argv[0], str):
                reasons = uses.setdefault(argv[0], [])
                if why not in reasons:
                    reasons.append(why)
    return uses


def _program_part(program: str, why: list[str], tools: dict[str, Tool]) -> Part:
    tool = tools.get(os.path.basename(program))
    if "/" in program:  # a path the plan names (mkTest: a store path; a node's virtiofsd option)
        where = program if os.access(program, os.X_OK) else None
    else:
        where = locate(tool) if tool is not None else shutil.which(program)
    if where is not None:
        return Part(OK, program, where, tuple(why))
    if tool is None:
        return Part(MISSING, program, "not found (not in nixlib/tools.nix: install it or fix the node's option)",
                    tuple(why))
    return Part(MISSING, program, f"not found; needed for {tool.needed_for}: {tool.install()}", tuple(why))


def _ocr_uses(script: str) -> list[str]:
    try:
        tree = ast.parse(script)
    except SyntaxError:
        return []
    return [f"line {n.lineno}: {ast.unparse(n)} (OCR)" for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and n.attr in OCR_METHODS]


def script_parts(path: Path, spec_dir: Path | None, tools: dict[str, Tool], kvm: Part,
                 network_mode: Callable[[], str]) -> list[Part]:
    """What `path`'s nodes need, each ok or missing, with one line per node (or line) needing it."""
    from . import check, testspec  # check's imports (pyflakes) only when a script is named

    script = testspec.read_script(path)
    plans = check.node_plans_of(path, spec_dir)
    parts = [_program_part(program, why, tools) for program, why in _program_uses(plans).items()]
    ocr = _ocr_uses(script)
    if ocr and "tesseract" in tools:
        parts.append(_program_part("tesseract", ocr, tools))
    kvm_nodes = [f"node {n}: backend {p.get('backend')} runs on KVM only" if p.get("backend") != "qemu"
                 else f"node {n}: accel = \"kvm\"" for n, p in plans.items() if p.get("accel") == "kvm"]
    if kvm_nodes:
        if kvm.status == OK:
            parts.append(Part(OK, "KVM", kvm.detail, tuple(kvm_nodes)))
        else:  # why KVM is not usable (one line each), then who needs it
            parts.append(Part(MISSING, "KVM", "not usable here", kvm.reasons + tuple(kvm_nodes)))
    vhost = [f"node {n}: backdoor.vhost = true" for n, p in plans.items()
             if isinstance(p.get("backdoor"), dict) and p["backdoor"].get("vhost") is True]
    if vhost:
        ok = os.path.exists("/dev/vhost-vsock")
        parts.append(Part(OK if ok else MISSING, "/dev/vhost-vsock",
                          "present" if ok else "absent: modprobe vhost_vsock (or use hybrid vsock, backdoor.vhost = false)",
                          tuple(vhost)))
    networked = {n: p for n, p in plans.items() if p.get("interfaces")}
    if networked and network_mode() != "tap":
        qemu = [f"node {n}: vlans without CAP_NET_ADMIN" for n, p in networked.items() if p.get("backend") == "qemu"]
        if qemu and "vde_switch" in tools:
            parts.append(_program_part("vde_switch", qemu, tools))
        others = [f"node {n}: backend {p.get('backend')} networks through TAP devices only"
                  for n, p in networked.items() if p.get("backend") != "qemu"]
        if others:
            parts.append(Part(MISSING, "CAP_NET_ADMIN", "not held (or no /dev/net/tun): run as root, or in a "
                                                        "user namespace that has it", tuple(others)))
    return parts


def collect(netem_on_host: Callable[[], bool]) -> list[Part]:
    tools = load_tools()
    parts = tool_parts(tools) + python_parts()
    img, kernel = image_part()
    parts.append(img)
    parts.append(kvm_part(kernel if shutil.which("qemu-system-x86_64") else None))
    parts += network_parts(netem_on_host)
    parts.append(vsock_part(tools))
    return parts


def diagnose(netem_on_host: Callable[[], bool], out: TextIO, script: Path | None = None,
             spec_dir: Path | None = None) -> int:
    """`ntng doctor [SCRIPT]`: the machine's parts, then what the script's nodes need."""
    parts = collect(netem_on_host)
    needs = None
    if script is not None:
        kvm = next(p for p in parts if p.name == "KVM")
        needs = script_parts(script, spec_dir, load_tools(), kvm,
                             lambda: network.choose_mode("auto", lambda _msg: None))
    return report(parts, out, script, needs)


def _print_parts(parts: list[Part], out: TextIO) -> None:
    width = max(len(s) for s in (OK, MISSING, DEGRADED))
    for p in parts:
        print(f"[{p.status:<{width}}] {p.name}: {p.detail}", file=out)
        for reason in p.reasons:
            print(f"{'':{width + 3}}- {reason}", file=out)


def report(parts: list[Part], out: TextIO, script: Path | None = None, needs: list[Part] | None = None) -> int:
    """Print the parts (and what `script` needs); EXIT_SETUP when one is missing."""
    _print_parts(parts, out)
    version = qemu_version()
    if version:
        print(f"QEMU: {version}", file=out)
    print(f"cache: {paths.cache_dir()}", file=out)
    if script is not None:
        print(f"what {script} needs:", file=out)
        _print_parts(needs or [Part(OK, "nothing", "beyond the above")], out)
    missing = [p.name for p in parts if p.status == MISSING]
    degraded = [p.name for p in parts if p.status == DEGRADED]
    lacking = [p.name for p in needs or [] if p.status == MISSING]
    if lacking:
        print(f"ntng doctor: {script} needs {', '.join(lacking)}, missing here", file=out)
    if missing:
        print(f"ntng doctor: missing {', '.join(missing)}: runs cannot work until it is installed", file=out)
    if missing or lacking:
        return EXIT_SETUP
    print("ntng doctor: everything a run needs is here" + (f", and all {script} needs" if script else "")
          + (f" (degraded: {', '.join(degraded)})" if degraded else ""), file=out)
    return EXIT_OK
