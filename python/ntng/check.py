"""`ntng check`: the quick check, no boot.  Parses the script, validates its nodes through nixlib,
lints it against the driver's globals (undefined names, unused imports) and type-checks it with
mypy against the driver's own annotations (python/ntng/typecheck.py), in seconds.
mkTest runs it in the driver build unless skipLint."""

from __future__ import annotations

import ast
import builtins
import dataclasses
import json
from pathlib import Path

from . import network, testspec, typecheck
from .driver import DRIVER_GLOBALS, pythonize_name
from .errors import TestScriptError


@dataclasses.dataclass(frozen=True)
class Finding:
    line: int
    message: str
    error: bool  # errors fail the check; warnings are printed


def _bound_names(tree: ast.AST) -> set[str]:
    """Every name the script binds anywhere (a typo check, not a scope analysis)."""
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            bound.update(node.names)
        elif isinstance(node, ast.MatchAs | ast.MatchStar) and node.name:
            bound.add(node.name)
    return bound


def lint(path: Path, script: str, node_names: list[str]) -> list[Finding]:
    code = testspec.compile_script(path, script)  # syntax errors: file:line
    del code
    tree = ast.parse(script, str(path))
    known = (_bound_names(tree) | set(dir(builtins)) | set(DRIVER_GLOBALS)
             | {pythonize_name(n) for n in node_names}
             | ({"machine"} if len(node_names) == 1 else set()))
    findings = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in known:
            findings.append(Finding(node.lineno, f"undefined name '{node.id}'", True))
    loaded = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    loaded |= {n.value.id for n in ast.walk(tree)
               if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                name = (a.asname or a.name).split(".")[0]
                if name != "*" and name not in loaded:
                    findings.append(Finding(node.lineno, f"'{name}' imported but unused", False))
    return sorted(findings, key=lambda f: f.line)


def node_names_of(path: Path, script: str, spec_dir: Path | None) -> list[str]:
    if spec_dir is not None:
        data = json.loads(testspec.spec_file(spec_dir, "kvm").read_text())
        network.declared_impairments(data["network"], str(path))
        return list(data["nodeNames"])
    # Validate the `#:` node declarations through nixlib; no file needs to exist for that.
    defaults = {"kernel": "/check/kernel", "vmlinux": "/check/vmlinux", "initrd": "/check/initrd",
                "image": "/check/root.ext4", "imageFormat": "raw", "accel": "tcg",
                "stateRoot": "/check/state"}
    spec = testspec.load(path, defaults)
    network.declared_impairments(spec.network, str(path))  # values: the runner's rules
    return spec.node_names


def check(path: Path, spec_dir: Path | None = None, type_check: bool = True) -> list[Finding]:
    script = testspec.read_script(path)
    testspec.compile_script(path, script)
    names = node_names_of(path, script, spec_dir)
    findings = lint(path, script, names)
    errors = [f for f in findings if f.error]
    if type_check and not errors:  # undefined names would only be reported twice
        typed = typecheck.type_check(path, script, names)
        if typed is None:
            findings.append(Finding(1, "type check skipped: mypy is not installed (pip install mypy)", False))
        else:
            findings += [Finding(line, f"type: {msg}", True) for line, msg in typed]
        findings.sort(key=lambda f: f.line)
    errors = [f for f in findings if f.error]
    if errors:
        raise TestScriptError("\n".join(f"{path}:{f.line}: {f.message}" for f in errors))
    return findings
