"""`ntng check`: the quick check, no boot.  Parses the script, validates its nodes through nixlib,
lints it against the driver's globals (undefined names, unused imports) and the Machine API
(unknown methods, methods a node's backend lacks: python/ntng/caps.py) and type-checks it with
mypy against the driver's own annotations (python/ntng/typecheck.py), in seconds.
mkTest runs it in the driver build unless skipLint."""

from __future__ import annotations

import ast
import builtins
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import caps, network, testspec, typecheck
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
            hint = caps.closest(node.id, known)
            findings.append(Finding(node.lineno, f"undefined name '{node.id}'{hint}", True))
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


def node_plans_of(path: Path, spec_dir: Path | None) -> dict[str, dict[str, Any]]:
    """Each node's launch plan (it names the backend and its capabilities), in declaration order."""
    if spec_dir is not None:
        data = json.loads(testspec.spec_file(spec_dir, "kvm").read_text())
        network.declared_impairments(data["network"], str(path))
        return {name: data["nodes"][name] for name in data["nodeNames"]}
    # Validate the `#:` node declarations through nixlib; no file needs to exist for that.
    spec = testspec.load_declared(path)
    network.declared_impairments(spec.network, str(path))  # values: the runner's rules
    return {name: spec.plans[name] for name in spec.node_names}


def check(path: Path, spec_dir: Path | None = None, type_check: bool = True) -> list[Finding]:
    script = testspec.read_script(path)
    testspec.compile_script(path, script)
    plans = node_plans_of(path, spec_dir)
    names = list(plans)
    findings = lint(path, script, names)
    undefined = [f for f in findings if f.error]
    methods = machine_uses(ast.parse(script, str(path)), plans)
    findings = sorted(findings + methods, key=lambda f: f.line)
    if type_check and not undefined:  # undefined names would only be reported twice
        typed = typecheck.type_check(path, script, names)
        if typed is None:
            findings.append(Finding(1, "type check skipped: mypy is not installed (pip install mypy)", False))
        else:
            # An unknown method is reported above, with the closest real one.
            reported = {f.line for f in methods}
            findings += [Finding(line, f"type: {msg}", True) for line, msg in typed
                         if not (line in reported and "has no attribute" in msg)]
        findings.sort(key=lambda f: f.line)
    errors = [f for f in findings if f.error]
    if errors:
        raise TestScriptError("\n".join(f"{path}:{f.line}: {f.message}" for f in errors))
    return findings


# -- Machine methods ----------------------------------------------------------------------------

_LIST_GLOBALS = ("machines", "machines_qemu")  # every node, in Driver.machines' (sorted) order


def machine_uses(tree: ast.AST, plans: dict[str, dict[str, Any]]) -> list[Finding]:
    """`<node>.<method>` where the node is statically known (its global, `machine` for a lone
    node, `machines[i]`, a loop variable over `machines` or over a list of node globals): an
    error for a method Machine does not have and for one the node's backend lacks."""
    attributes = caps.machine_attributes()
    if attributes is not None:  # what the script sets on a machine itself is no typo
        attributes |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)}
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    resolve = _Resolver(tree, plans)
    findings = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not isinstance(node.ctx, ast.Load) or node.attr.startswith("_"):
            continue
        targets = resolve.nodes(node)
        if not targets:
            continue
        what = f"{ast.unparse(node.value)}.{node.attr}" + ("()" if id(node) in called else "")
        if attributes is not None and node.attr not in attributes:
            findings.append(Finding(node.lineno, f"{what.removesuffix('()')}: no such Machine method"
                                    + caps.closest(node.attr, attributes), True))
            continue
        for name in targets:
            need = caps.lacking(plans[name], node.attr)
            if need is not None:
                where = what if resolve.is_node_global(node.value) else f"{what} on node {name}"
                findings.append(Finding(node.lineno, caps.lacks_message(where, plans[name], need), True))
    return findings


class _Resolver:
    """Which nodes an expression stands for, where that is plain from the script's text."""

    def __init__(self, tree: ast.AST, plans: dict[str, dict[str, Any]]) -> None:
        rebound = _bound_names(tree)
        names = {pythonize_name(n): n for n in plans} | ({"machine": next(iter(plans))} if len(plans) == 1 else {})
        # A script that assigns a node's name itself (or `machines`) makes it anything.
        self.globals = {k: v for k, v in names.items() if k not in rebound}
        self.ordered = sorted(plans) if not set(_LIST_GLOBALS) & rebound else []
        self.loop_vars: dict[int, list[str]] = {}  # id(ast.Name use) → the nodes it runs over
        for var, nodes, body in self._loops(tree):
            if any(isinstance(n, ast.Name) and n.id == var and not isinstance(n.ctx, ast.Load)
                   for part in body for n in ast.walk(part)):
                continue  # reassigned inside the loop
            for part in body:
                for n in ast.walk(part):
                    if isinstance(n, ast.Name) and n.id == var and isinstance(n.ctx, ast.Load):
                        self.loop_vars[id(n)] = nodes  # walked outer loops first: inner ones win

    def _loops(self, tree: ast.AST) -> Iterator[tuple[str, list[str], list[ast.AST]]]:
        for node in ast.walk(tree):
            if isinstance(node, ast.For) and isinstance(node.target, ast.Name):
                nodes = self._many(node.iter)
                if nodes:
                    yield node.target.id, nodes, list(node.body)
            elif isinstance(node, ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp):
                parts: list[ast.AST] = ([node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt])
                for gen in node.generators:
                    nodes = self._many(gen.iter)
                    if isinstance(gen.target, ast.Name) and nodes:
                        yield gen.target.id, nodes, parts + [c for g in node.generators for c in g.ifs]

    def _many(self, expr: ast.expr) -> list[str]:
        if isinstance(expr, ast.Name) and expr.id in _LIST_GLOBALS:
            return self.ordered
        if isinstance(expr, ast.List | ast.Tuple):
            each = [self.globals.get(e.id) if isinstance(e, ast.Name) else None for e in expr.elts]
            return [n for n in each if n is not None] if all(each) else []
        return []

    def is_node_global(self, expr: ast.expr) -> bool:
        return isinstance(expr, ast.Name) and expr.id in self.globals and id(expr) not in self.loop_vars

    def nodes(self, attr: ast.Attribute) -> list[str]:
        v = attr.value
        if isinstance(v, ast.Name):
            if id(v) in self.loop_vars:
                return self.loop_vars[id(v)]
            return [self.globals[v.id]] if v.id in self.globals else []
        if (isinstance(v, ast.Subscript) and isinstance(v.value, ast.Name) and v.value.id in _LIST_GLOBALS
                and isinstance(v.slice, ast.Constant) and type(v.slice.value) is int):
            i = v.slice.value
            return [self.ordered[i]] if -len(self.ordered) <= i < len(self.ordered) else []
        return []
