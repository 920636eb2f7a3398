"""A test script and the nodes it declares.

Without Nix, a script declares its nodes in `#:` comment lines, NixOS-style Nix:

    #: nodes.server = { memory = 1024; };
    #: nodes.client = { };
    #: globalTimeout = 600;

No `#:` lines means one node called `machine`.  The lines are evaluated by nixlib (test.nix),
which validates them and returns the launch plan of every node.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from pathlib import Path
from typing import Any

from . import nixeval
from .errors import NixEvalError, TestScriptError


@dataclasses.dataclass
class TestSpec:
    script_path: Path
    script: str
    name: str
    global_timeout: float
    node_names: list[str]
    plans: dict[str, dict[str, Any]]


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
    return TestSpec(
        script_path=path,
        script=script,
        name=data["name"] if data["name"] != "test" else path.stem,
        global_timeout=float(data["globalTimeout"]),
        node_names=data["nodeNames"],
        plans=data["nodes"],
    )


def _header_error(path: Path, header: Path, stderr: str, show_trace: bool) -> NixEvalError:
    """Point at the script line: Nix names positions in the header file we wrote."""
    msg = nixeval.nix_message(stderr)
    m = re.search(re.escape(str(header)) + r":(\d+):(\d+)", stderr)
    line = int(m.group(1)) if m else _declaring_line(header.read_text(), msg)
    where = f"{path}:{line}" if line else str(path)
    err = NixEvalError(f"{where}: node declaration rejected: {msg.removeprefix('nixlib: ')}"
                       + (f"\n{stderr}" if show_trace else ""))
    err.exit_code = TestScriptError.exit_code
    return err


def _declaring_line(header: str, msg: str) -> int | None:
    """For errors thrown inside nixlib: the header line that declares the node named in it."""
    m = re.search(r"node '([^']+)'", msg)
    if not m:
        return None
    pat = re.compile(rf"\b(nodes\.)?{re.escape(m.group(1))}(\.[\w-]+)*\s*=")
    for i, line in enumerate(header.splitlines()):
        if pat.search(line):
            return i + 1  # header lines map one to one onto script lines
    return None
