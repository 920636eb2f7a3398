"""`ntng check`: the quick check, no boot.  Parses the script, validates its nodes through nixlib,
lints it with pyflakes against the driver's globals (undefined names, unused imports, …) and the
Machine API (unknown methods, methods a node's backend lacks: python/ntng/caps.py) and
type-checks it with mypy against the driver's own annotations (python/ntng/typecheck.py), in
seconds.  It imports none of the runtime (machines, backends, networking): the driver's names
come from python/ntng/api_names.py.  mkTest runs it in the driver build unless skipLint."""

from __future__ import annotations

import ast
import builtins
import dataclasses
import functools
import importlib.util
from collections.abc import Iterator
from pathlib import Path

from . import accel, api_names, caps, netem, testspec, typecheck
from .api_names import pythonize_name
from .errors import SetupError, TestScriptError
from .plan import NetworkPlan, NodePlan

ERROR, WARNING, NOTE = "error", "warning", "note"


@dataclasses.dataclass(frozen=True)
class Finding:
    line: int
    message: str
    kind: str  # ERROR fails the check; WARNING and NOTE are printed

    @property
    def error(self) -> bool:
        return self.kind == ERROR

    def render(self, path: Path) -> str:
        """One line of the report: every line has the same `path:line: kind: ` prefix."""
        return f"{path}:{self.line}: {self.kind}: {self.message}"


class CheckFailed(TestScriptError):
    """The check found errors; `findings` holds them with the warnings and notes."""

    def __init__(self, path: Path, findings: list[Finding]) -> None:
        super().__init__("\n".join(f.render(path) for f in findings if f.error))
        self.path = path
        self.findings = findings


def _bound_names(tree: ast.AST) -> set[str]:
    """Every name the script binds anywhere (not a scope analysis: for hints and for which
    node globals the script rebinds)."""
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


# pyflakes messages for code that fails when it runs (or never does what it says): errors.
# The rest (unused imports and variables, redefinitions, …) are warnings.
_PYFLAKES_ERRORS = frozenset({
    "UndefinedName", "UndefinedLocal", "UndefinedExport", "DuplicateArgument", "ReturnOutsideFunction",
    "YieldOutsideFunction", "ContinueOutsideLoop", "BreakOutsideLoop", "DefaultExceptNotLast",
    "TwoStarredExpressions", "TooManyExpressionsInStarredAssignment", "AssertTuple", "IfTuple",
    "ForwardAnnotationSyntaxError", "InvalidPrintSyntax", "FutureFeatureNotDefined", "LateFutureImport",
    "PercentFormatInvalidFormat", "PercentFormatMixedPositionalAndNamed", "PercentFormatUnsupportedFormatCharacter",
    "PercentFormatPositionalCountMismatch", "PercentFormatMissingArgument", "PercentFormatExpectedMapping",
    "PercentFormatExpectedSequence", "PercentFormatStarRequiresSequence", "StringDotFormatInvalidFormat",
    "StringDotFormatMissingArgument", "StringDotFormatMixingAutomatic",
})


def lint(path: Path, script: str, node_names: list[str]) -> list[Finding]:
    """pyflakes (scope-aware, as the NixOS driver lints) with the driver's globals and the
    nodes as builtins; an undefined name gets the closest known one."""
    try:
        from pyflakes import checker as pyflakes_checker
    except ImportError:  # a dependency, but `ntng doctor` should be able to say it is missing
        raise SetupError("pyflakes is not installed: pip install pyflakes (the quick check lints with it)") from None
    testspec.compile_script(path, script)  # syntax errors: file:line
    tree = ast.parse(script, str(path))
    given = set(api_names.DRIVER_GLOBALS) | set(api_names.node_globals(node_names))
    result = pyflakes_checker.Checker(tree, filename=str(path), builtins=given)
    known = given | set(dir(builtins)) | _bound_names(tree)
    findings = []
    for m in result.messages:
        kind = type(m).__name__
        text = m.message % m.message_args
        if kind in ("UndefinedName", "UndefinedLocal"):
            text += caps.closest(m.message_args[0], known - {m.message_args[0]})
        findings.append(Finding(m.lineno, text, ERROR if kind in _PYFLAKES_ERRORS else WARNING))
    return sorted(findings, key=lambda f: f.line)


def declared_impairments(net: NetworkPlan, where: str) -> None:
    """network.declared_impairments' checks, through netem alone (network imports netns, cffi):
    a bad value is the script's error.  tests/unit/test_check_lint.py keeps the two in step."""
    for node, ifaces in net["nodes"].items():
        for i in ifaces:
            decl = i.get("impairment")
            if decl is None:
                continue
            ctx = f"{where}: nodes.{node}.impairments (vlan {i['vlan']})"
            try:
                netem.check_direction(decl.get("direction", "both"))
            except netem.ImpairmentError as e:
                raise netem.ImpairmentError(f"{ctx}: {e}") from None
            netem.Impairment.from_mapping({k: v for k, v in decl.items() if k != "direction"}, where=ctx)


def node_plans_of(path: Path, spec_dir: Path | None) -> dict[str, NodePlan]:
    """Each node's launch plan (it names the backend and its capabilities), in declaration order,
    for the accelerator the node would get: Firecracker and Cloud Hypervisor nodes KVM (they have
    no TCG), QEMU nodes what they declare (TCG when they do not: the plan is the same shape)."""
    if spec_dir is not None:
        data = testspec.read_spec_file(testspec.spec_file(spec_dir, "kvm"))
        declared_impairments(data["network"], str(path))
        return {name: data["nodes"][name] for name in data["nodeNames"]}
    # Validate the `#:` node declarations through nixlib; no file needs to exist for that.
    spec = testspec.load_declared(path)
    declared_impairments(spec.network, str(path))  # values: the runner's rules
    return {name: spec.plans[name] for name in spec.node_names}


def accel_notes(script: str, plans: dict[str, NodePlan], prebuilt: bool) -> list[Finding]:
    """A note for each node that needs KVM when this machine cannot give it.  In a prebuilt
    (mkTest) spec every node is planned for KVM, but a QEMU node also has its TCG spec."""
    kvm_nodes = [n for n, plan in plans.items()
                 if plan.get("accel") == "kvm" and not (prebuilt and plan.get("backend") == "qemu")]
    why = accel.kvm_unusable_reason() if kvm_nodes else None
    if why is None:
        return []
    return [Finding(testspec.declaring_line(script, n) or 1,
                    f"node {n} (backend {plans[n].get('backend', '?')}) needs KVM, which is not usable here "
                    f"({why}): this machine cannot run it", NOTE)
            for n in kvm_nodes]


def check(path: Path, spec_dir: Path | None = None, type_check: bool = True) -> list[Finding]:
    """The findings (warnings, notes) of a script that passes; CheckFailed when one is an error."""
    script = testspec.read_script(path)
    testspec.compile_script(path, script)
    plans = node_plans_of(path, spec_dir)
    names = list(plans)
    findings = lint(path, script, names)
    undefined = [f for f in findings if f.error]
    methods = machine_uses(ast.parse(script, str(path)), plans)
    findings += methods + accel_notes(script, plans, prebuilt=spec_dir is not None)
    if type_check and not undefined:  # undefined names would only be reported twice
        typed = typecheck.type_check(path, script, names)
        if typed is None:
            findings.append(Finding(1, "type check skipped: mypy is not installed (pip install mypy)", WARNING))
        else:
            # An unknown method is reported above, with the closest real one.
            reported = {f.line for f in methods}
            findings += [Finding(line, f"type: {msg}", ERROR) for line, msg in typed
                         if not (line in reported and "has no attribute" in msg)]
    findings.sort(key=lambda f: f.line)
    if any(f.error for f in findings):
        raise CheckFailed(path, findings)
    return findings


# -- Machine methods ----------------------------------------------------------------------------

_LIST_GLOBALS = ("machines", "machines_qemu")  # every node, in Driver.machines' (sorted) order


def machine_uses(tree: ast.AST, plans: dict[str, NodePlan]) -> list[Finding]:
    """`<node>.<method>` where the node is statically known (its global, `machine` for a lone
    node, `machines[i]`, a loop variable over `machines` or over a list of node globals): an
    error for a method Machine does not have and for one the node's backend lacks."""
    attributes = machine_attributes()
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
                                    + caps.closest(node.attr, attributes), ERROR))
            continue
        for name in targets:
            need = caps.lacking(plans[name], node.attr)
            if need is not None:
                where = what if resolve.is_node_global(node.value) else f"{what} on node {name}"
                findings.append(Finding(node.lineno, caps.lacks_message(where, plans[name], need), ERROR))
    return findings


class _Resolver:
    """Which nodes an expression stands for, where that is plain from the script's text."""

    def __init__(self, tree: ast.AST, plans: dict[str, NodePlan]) -> None:
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


# -- Machine's attributes, read from its source (importing machine.py loads the runtime) ---------

@functools.cache
def machine_attributes() -> frozenset[str] | None:
    """Every attribute a Machine has: its class body's and the `self.x = …` of its methods, its
    bases' in ntng (followed through `from .m import Base`) and object's.  None when the source
    cannot be read (then unknown methods are left to the type check)."""
    names: set[str] = set(dir(type("Plain", (), {})))  # object's, __dict__, __module__, …
    return frozenset(names) if _class_attributes("ntng.machine", "Machine", names, set()) else None


def _class_attributes(module: str, cls: str, names: set[str], seen: set[tuple[str, str]]) -> bool:
    if (module, cls) in seen:
        return True
    seen.add((module, cls))
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return False
    try:
        tree = ast.parse(Path(spec.origin).read_text(), spec.origin)
    except (OSError, SyntaxError):
        return False
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), None)
    if node is None:
        return False
    for part in _class_body(node.body):
        if isinstance(part, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(part.name)
        targets = (part.targets if isinstance(part, ast.Assign)
                   else [part.target] if isinstance(part, ast.AnnAssign | ast.AugAssign) else [])
        names.update(t.id for t in targets if isinstance(t, ast.Name))
    for n in ast.walk(node):
        targets = (n.targets if isinstance(n, ast.Assign)
                   else [n.target] if isinstance(n, ast.AnnAssign | ast.AugAssign) else [])
        names.update(t.attr for t in targets
                     if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self")
    imported = {(a.asname or a.name): (n.module, n.level, a.name) for n in tree.body
                if isinstance(n, ast.ImportFrom) for a in n.names}
    for base in node.bases:
        if not isinstance(base, ast.Name):
            continue
        if base.id in imported and imported[base.id][1] > 0:  # a relative import: within ntng
            mod, level, real = imported[base.id]
            package = module.rsplit(".", level)[0]
            if not _class_attributes(f"{package}.{mod}" if mod else package, real, names, seen):
                return False
        elif any(isinstance(n, ast.ClassDef) and n.name == base.id for n in tree.body):
            if not _class_attributes(module, base.id, names, seen):
                return False
        elif base.id != "object":
            return False  # a base from elsewhere: its attributes are unknown here
    return True


def _class_body(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """A class body's statements, with those inside `if`/`try` blocks (`if not TYPE_CHECKING:`)."""
    for part in body:
        yield part
        if isinstance(part, ast.If):
            yield from _class_body(part.body + part.orelse)
        elif isinstance(part, ast.Try):
            yield from _class_body(part.body + part.orelse + part.finalbody
                                   + [s for h in part.handlers for s in h.body])
