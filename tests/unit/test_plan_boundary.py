"""Nix computes, Python runs: a scan of python/ntng (ast, no import) for names, paths, argv and
API calls that the runner would build itself instead of reading them from nixlib's plan.

The rules are narrow on purpose (each one names the shapes the project has had):
  argv    a list literal starting with a VMM, helper or guest network tool ("qemu-img", "ip", ...)
  fstring an f-string that builds a device/file name or an API path or command from plan data
          (`f"net{n}"`, `f"{x}.sock"`, `f"ifb-{dev}"`, "/api/v1", "link set dev", "exec:cat")
  path    `<dir> / "console.log"` (a per-node file name joined in Python), or a folder taken
          as the parent of a plan path (`Path(plan["files"][...]).parent`)
  api     a VMM API request whose method/path is a literal (`api.request("PUT", "/vm")`),
          a QMP command whose argument is an f-string (a migration URI)
What stays in Python on purpose is ALLOWED below, each with its reason.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import ntng

PACKAGE = Path(ntng.__file__).parent

# Programs whose argv is the plan's (nixlib's VMM argv, prepare steps, helpers, the identity and
# tc commands are rendered there or come from the plan's records).
PROGRAMS = {"qemu-system-x86_64", "qemu-img", "firecracker", "cloud-hypervisor", "vde_switch",
            "vhost-device-vsock", "virtiofsd", "ip", "tc", "cp", "rm", "touch", "mkdir"}
FSTRING_ANYWHERE = re.compile(r"/api/v1|link set dev |addr (add|flush) |exec:cat|/run/ntng")
FSTRING_BEFORE_VALUE = re.compile(r"(^|[^A-Za-z])(net|tap|ifb-|br)$")  # f"net{n}", f"ifb-{dev}"
FSTRING_AFTER_VALUE = re.compile(r"^\.(sock|stderr|log|qcow2|raw|key|pid)\b")  # f"{name}.sock"
NODE_FILE = re.compile(r"^[\w.-]+\.(sock|stderr|log|qcow2|raw|key)$|^(memory|ram|vmstate|ntng-snapshot\.json|ctl)$")

# module (relative to python/ntng) -> rules that do not apply there, and why.
ALLOWED: dict[str, set[str]] = {
    "image.py": {"argv", "path", "fstring"},  # builds the guest image: Python's job, not a plan
    "doctor.py": {"argv"},  # probes installed tools by name (`ip -V`, ...), runs no VM
    "netem.py": {"fstring"},  # tc/ip commands from the script's run-time impairment values
    "suite/run.py": {"path"},  # `ntng test`'s own report folder (output.log per test), no node's
}


def violations(root: Path) -> Iterator[str]:
    for file in sorted(root.rglob("*.py")):
        rel = file.relative_to(root).as_posix()
        skip = ALLOWED.get(rel, set())
        tree = ast.parse(file.read_text(), str(file))
        for node in ast.walk(tree):
            for rule, why in _check(node):
                if rule not in skip:
                    yield f"{rel}:{node.lineno}: {rule}: {why}"


def _check(node: ast.AST) -> Iterator[tuple[str, str]]:
    if isinstance(node, ast.List) and node.elts and isinstance(first := node.elts[0], ast.Constant) \
            and first.value in PROGRAMS:
        yield "argv", f"argv of {first.value!r} built in Python"
    elif isinstance(node, ast.JoinedStr):
        yield from _fstring(node)
    elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant) \
            and isinstance(node.right.value, str) and NODE_FILE.match(node.right.value.rsplit("/", 1)[-1]):
        yield "path", f"file name {node.right.value!r} joined in Python"
    elif isinstance(node, ast.Attribute) and node.attr == "parent" and _reads_plan_files(node.value):
        yield "path", "a folder derived from a plan path (name the folder in the plan)"
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        args = [*node.args, *(k.value for k in node.keywords)]
        if node.func.attr == "request" and len(node.args) >= 2 and \
                any(isinstance(a, (ast.Constant, ast.JoinedStr)) for a in node.args[:2]):
            yield "api", "a VMM API call with a literal method/path (use the plan's calls)"
        elif node.func.attr == "command" and any(isinstance(a, ast.JoinedStr) for a in args):
            yield "api", "a QMP command argument built in Python"


def _fstring(node: ast.JoinedStr) -> Iterator[tuple[str, str]]:
    parts = node.values
    for k, part in enumerate(parts):
        if not (isinstance(part, ast.Constant) and isinstance(part.value, str)):
            continue
        text = part.value
        if FSTRING_ANYWHERE.search(text):
            yield "fstring", f"{text.strip()[:40]!r}: a guest command or API path rendered in Python"
        if k + 1 < len(parts) and isinstance(parts[k + 1], ast.FormattedValue) and FSTRING_BEFORE_VALUE.search(text):
            yield "fstring", f"a name built as {text!r}{{...}}"
        if k > 0 and isinstance(parts[k - 1], ast.FormattedValue) and FSTRING_AFTER_VALUE.match(text):
            yield "fstring", f"a file name built as {{...}}{text!r}"


def _reads_plan_files(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Subscript) and isinstance(n.slice, ast.Constant) and n.slice.value == "files"
               for n in ast.walk(node))


def test_python_builds_no_name_path_argv_or_api_call_that_nixlib_could() -> None:
    found = list(violations(PACKAGE))
    assert not found, "computed in Python, belongs in nixlib's plan:\n" + "\n".join(found)


BAD = '''
import subprocess
from pathlib import Path
def f(plan, api, qmp, n, dev, name, directory, who):
    subprocess.run(["qemu-img", "create", plan["files"]["disk"]])
    netdev = f"net{n}"
    sock = f"{directory}/{name}.sock"
    ifb = f"ifb-{dev}"
    lines = [f"link set dev {dev} down"]
    state = Path(plan["files"]["disk"]).parent
    log = directory / who / "console.log"
    api.request("PUT", "/api/v1/vm.pause")
    qmp.command("migrate", uri=f"exec:cat > {directory}")
'''
GOOD = '''
from pathlib import Path
def f(plan, api, qmp, n, name, log, tap):
    subprocess.run(plan["prepare"][0])
    log(f"network: {n} taps, net {n} up; tap {tap}: gone")
    raise ValueError(f"{name}: the socket {plan['sockets']['api']} is dead")
    c = plan["calls"]["pause"]
    api.request(c["method"], c["path"], c.get("body"))
    out = Path(plan["artifacts"]["consoleLog"]) / ".." / "junit.xml"
    qmp.command("migrate", uri=plan["migrate"]["save"])
'''


def test_the_rules_catch_each_shape_and_pass_plan_reads(tmp_path: Path) -> None:
    """Each rule fires on the shape it is for (one per line of BAD) and not on plan reads,
    log lines and messages (GOOD)."""
    (tmp_path / "bad.py").write_text(BAD)
    (tmp_path / "good.py").write_text(GOOD)
    found = list(violations(tmp_path))
    lines = sorted({int(v.split(":")[1]) for v in found})
    assert all(v.startswith("bad.py:") for v in found), found
    assert lines == list(range(5, 14)), found
