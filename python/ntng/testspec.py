"""A test script and the nodes it declares.

Without Nix, a script declares its nodes in `#:` comment lines, NixOS-style Nix:

    #: nodes.server = { memory = 1024; };
    #: nodes.client = { };
    #: globalTimeout = 600;

No `#:` lines means one node called `machine`; `#: nodes = { };` means no VM at all (a
host-side script: it still gets the driver's globals, reports and a place in a suite).  The lines are evaluated by nixlib (test.nix),
which validates them and returns the launch plan of every node.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import tempfile
import typing
from pathlib import Path
from typing import Any, TypeVar

from . import nixeval
from . import plan as plan_types
from .errors import NixEvalError, PlanError, TestScriptError
from .plan import NetworkPlan, NodePlan

T = TypeVar("T")


@dataclasses.dataclass
class TestSpec:
    script_path: Path
    script: str
    name: str
    global_timeout: float
    node_names: list[str]
    plans: dict[str, NodePlan]
    network: NetworkPlan = dataclasses.field(default_factory=plan_types.no_network)


def read_script(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise TestScriptError(f"{path}: no such test script") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TestScriptError(f"{path}: cannot read the test script: {e}") from None


def header_source(script: str) -> str:
    """The `#:` lines as a Nix attribute set, other lines blank so line numbers match."""
    out = []
    for line in script.splitlines():
        m = re.match(r"^\s*#:(.*)$", line)
        out.append(m.group(1) if m else "")
    return "{" + "\n".join(out) + "\n}\n"


def compile_script(path: Path, script: str) -> Any:
    try:
        return compile(script, str(path), "exec")
    except SyntaxError as e:
        raise TestScriptError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None


def load(path: Path, defaults: dict[str, Any], show_trace: bool = False) -> TestSpec:
    script = read_script(path)
    with tempfile.TemporaryDirectory(prefix="ntng-header-") as tmp:
        header = Path(tmp) / "header.nix"
        header.write_text(header_source(script))
        data, stderr = nixeval.evaluate(
            "eval-test.nix",
            ["--arg", "headerFile", str(header), "--argstr", "defaults", json.dumps(defaults)],
            show_trace,
        )
        if stderr is not None:
            raise _header_error(path, header, stderr, show_trace)
    spec = plan_types.spec(data, f"{path}: nixlib's test spec")
    return TestSpec(
        script_path=path,
        script=script,
        name=spec["name"] if spec["name"] != "test" else path.stem,
        global_timeout=float(spec["globalTimeout"]),
        node_names=spec["nodeNames"],
        plans=spec["nodes"],
        network=spec["network"],
    )


# Stand-ins for what only a real run knows: nixlib validates and plans the nodes with them (no
# file needs to exist), for the quick check, the suite's memory budget, and node-less scripts.
# No accelerator: each node gets the one it would get (nixlib/node.nix: what it declares, else
# KVM for Firecracker and Cloud Hypervisor, which have no TCG, and TCG for QEMU).
PLACEHOLDER_DEFAULTS = {"kernel": "/check/kernel", "vmlinux": "/check/vmlinux", "initrd": "/check/initrd",
                        "image": "/check/root.ext4", "imageFormat": "raw", "stateRoot": "/check/state"}


def load_declared(path: Path, show_trace: bool = False) -> TestSpec:
    """The script's nodes as declared (validated, planned with placeholder paths): enough to
    know names, memory and cores without an image, an accelerator or a VM."""
    return load(path, PLACEHOLDER_DEFAULTS, show_trace)


STATE_ROOT_MARKER = "@stateRoot@"
ARTIFACTS_MARKER = "@artifacts@"  # nixlib/shares.nix: the run's artifact folder


def substitute(value: T, marker: str, replacement: str) -> T:
    """`value` with `marker` replaced in every string (the same JSON shape: a plan stays a plan)."""
    return typing.cast(T, _substitute(value, marker, replacement))


def _substitute(value: object, marker: str, replacement: str) -> object:
    if isinstance(value, str):
        return value.replace(marker, replacement)
    if isinstance(value, list):
        return [_substitute(v, marker, replacement) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, marker, replacement) for k, v in value.items()}
    return value


def spec_file(spec_dir: Path, accel: str) -> Path:
    """mkTest's driver holds one evaluated spec per accelerator it can run on."""
    path = spec_dir / f"spec-{accel}.json"
    if not path.exists():
        have = sorted(p.stem.removeprefix("spec-") for p in spec_dir.glob("spec-*.json"))
        if not have:
            raise TestScriptError(f"{spec_dir}: no spec-<accel>.json here (is this a mkTest driver's share/ntng?)")
        raise TestScriptError(
            f"{spec_dir}: this test has no spec for {accel} (it has: {', '.join(have)}); "
            "Firecracker and Cloud Hypervisor nodes need KVM")
    return path


def load_prebuilt(path: Path, spec_path: Path, state_root: Path) -> TestSpec:
    """A spec nixlib evaluated at build time (mkTest): only the state directory is filled in."""
    script = read_script(path)
    spec = substitute(read_spec_file(spec_path), STATE_ROOT_MARKER, str(state_root))
    return TestSpec(
        script_path=path,
        script=script,
        name=spec["name"],
        global_timeout=float(spec["globalTimeout"]),
        node_names=list(spec["nodeNames"]),
        plans=dict(spec["nodes"]),
        network=spec["network"],
    )


def read_spec_file(spec_path: Path) -> plan_types.Spec:
    """A spec file nixlib evaluated (mkTest's spec-<accel>.json), validated."""
    try:
        data = json.loads(spec_path.read_text())
    except (OSError, ValueError) as e:
        raise TestScriptError(f"{spec_path}: not a readable test spec: {e}") from None
    try:
        return plan_types.spec(data, str(spec_path))
    except PlanError as e:  # a file given on the command line: the user's to fix (exit 2)
        raise TestScriptError(f"{spec_path}: not a test spec: {str(e).removeprefix(f'{spec_path}: ')}") from None


def first_kernel(spec_dir: Path) -> Path:
    """A kernel of the test, for the KVM boot probe."""
    path = spec_file(spec_dir, "kvm")
    for plan in read_spec_file(path)["nodes"].values():
        if plan["kernel"] is not None:
            return Path(plan["kernel"])
    raise TestScriptError(f"{path}: no node with a kernel to probe KVM with")


def _header_error(path: Path, header: Path, stderr: str, show_trace: bool) -> NixEvalError:
    """Point at the script line: Nix names positions in the header file we wrote."""
    # The header file is ours and temporary: its positions are the script's lines.
    msg = re.sub(re.escape(str(header)) + r":(\d+):\d+", lambda m: f"line {m.group(1)}",
                 nixeval.nix_message(stderr))
    msg = _UNKNOWN_OPTIONS.sub(_suggest_options, msg)
    # For a redefinition Nix names the first definition in the message and the second one
    # (the line at fault) in the trace's last position.
    positions = re.findall(re.escape(str(header)) + r":(\d+):(\d+)", stderr)
    line = int(positions[-1][0]) if positions else _declaring_line(header.read_text(), msg)
    where = f"{path}:{line}" if line else str(path)
    err = NixEvalError(f"{where}: node declaration rejected: {msg.removeprefix('nixlib: ')}"
                       + (f"\n{stderr}" if show_trace else ""))
    err.exit_code = TestScriptError.exit_code
    return err


# nixlib/node.nix's message for options it does not know; `known` is its userOptions.
_UNKNOWN_OPTIONS = re.compile(r"(?P<node>node '[^']+': )unknown option\(s\) (?P<unknown>[^()]+?) "
                              r"\(known: (?P<known>[^()]*)\)")


def _suggest_options(m: re.Match[str]) -> str:
    """Each unknown option with the closest one users set ("did you mean"), then those options."""
    known = m["known"].split(", ")
    named = []
    for option in m["unknown"].split(", "):
        close = difflib.get_close_matches(option, known, n=1, cutoff=0.6)
        named.append(option + (f" (did you mean {close[0]}?)" if close else ""))
    return f"{m['node']}unknown option(s) {', '.join(named)}; the node options are: {m['known']}"


def _declaring_line(header: str, msg: str) -> int | None:
    """For errors thrown inside nixlib: the header line that declares the node named in it."""
    m = re.search(r"node '([^']+)'", msg)
    return _line_declaring(header.splitlines(), m.group(1)) if m else None


def declaring_line(script: str, node: str) -> int | None:
    """The `#:` line of the script that declares `node`."""
    return _line_declaring([ln if re.match(r"^\s*#:", ln) else "" for ln in script.splitlines()], node)


def _line_declaring(lines: list[str], node: str) -> int | None:
    pat = re.compile(rf"\b(nodes\.)?{re.escape(node)}(\.[\w-]+)*\s*=")
    for i, line in enumerate(lines):
        if pat.search(line):
            return i + 1  # header lines map one to one onto script lines
    return None
