"""Every validation message in nixlib is reached by a test.

The messages are found by scanning nixlib/*.nix for `throw "..."`, `fail <name> "..."` and
`check [<name>] (...) "..."`; each is keyed by its file and its text with every `${...}` written
as "…".  CASES maps each key to an input that must throw that message: the thrown text must match
the whole template (the "…" parts matching anything), and the first position of Nix's trace must
be in that file.  The scanned keys must be exactly those of CASES plus EXEMPT, so a new message
without a case fails here, by name, as does a case whose message is gone.

Nix cannot catch a throw's text inside an evaluation (builtins.tryEval drops it), so each case
is its own nix-instantiate run; the runs go in parallel.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from ntng import nixeval, paths

NIXLIB = paths.nixlib_dir()  # NTNG_DATA can point the tests at another copy
HOLE = "…"  # a ${...} of the message

Key = tuple[str, str]  # (file in nixlib/, message template)
Call = tuple[str, Any]  # (nixlib function, argument), as nixeval.call takes them


# --- finding the messages -----------------------------------------------------------------------

def _string(src: str, i: int) -> tuple[str, int]:
    """The Nix string whose opening quote is just before src[i]: (template, index after it)."""
    out = []
    while True:
        c = src[i]
        if c == "\\":
            out.append(src[i + 1])
            i += 2
        elif c == '"':
            return "".join(out), i + 1
        elif src.startswith("${", i):
            i = _skip(src, i + 2, "}")
            out.append(HOLE)
        else:
            out.append(c)
            i += 1


def _skip(src: str, i: int, close: str) -> int:
    """Past the expression starting at src[i] up to its closing bracket `close` (strings and
    nested brackets skipped)."""
    depth = 0
    while True:
        c = src[i]
        if c == '"':
            _, i = _string(src, i + 1)
            continue
        if c in "({[":
            depth += 1
        elif c in ")}]":
            if depth == 0:
                assert c == close, (src[max(0, i - 60):i + 1], close)
                return i + 1
            depth -= 1
        i += 1


SITE = re.compile(r'\b(?:throw|fail\s+[\w.]+)\s+"|\bcheck\s+(?:\w+\s+)?\(')


def messages(src: str) -> dict[str, int]:
    """Message template -> line, for every throw/fail/check site with a literal message."""
    found: dict[str, int] = {}
    for m in SITE.finditer(src):
        i = m.end()
        if src[i - 1] == "(":  # check: skip the condition, the message follows
            i = _skip(src, i, ")")
            while src[i].isspace():
                i += 1
            if src[i] != '"':
                continue
            i += 1
        template, _ = _string(src, i)
        found.setdefault(template, src.count("\n", 0, m.start()) + 1)
    return found


def scan() -> dict[Key, int]:
    return {(p.name, t): line for p in sorted(NIXLIB.glob("*.nix")) for t, line in messages(p.read_text()).items()}


def pattern(template: str) -> re.Pattern[str]:
    return re.compile(".*?".join(re.escape(part) for part in template.split(HOLE)), re.S)


# --- the cases ----------------------------------------------------------------------------------

Q, FC, CH, NET, TS = "qemu.launch", "firecracker.launch", "cloudHypervisor.launch", "network.plan", "testSpec"
NS = "nspawn.launch"
BASE = {"name": "m", "kernel": "/k", "image": "/i", "stateDir": "/s/m"}
DEFAULTS = {"kernel": "/k", "image": "/i", "stateRoot": "/s"}


DROP = object()  # node(..., key=DROP): leave the key out


def node(fn: str, **over: Any) -> Call:
    return fn, {k: v for k, v in {**BASE, **over}.items() if v is not DROP}


def header(**h: Any) -> Call:
    return TS, {"header": {"nodes": {"a": {}}, **h}, "defaults": DEFAULTS}


def nix_map(function: str, args: list[Any]) -> list[Any]:
    """Apply `function` (with `nixlib` = nixlib/default.nix in scope) to every element of `args`
    in one evaluation (the list goes through a file: it may be long)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(args, f)
        f.flush()
        expr = (f"{{ argsFile }}: let nixlib = import {json.dumps(str(NIXLIB / 'default.nix'))}; f = {function}; in "
                "map f (builtins.fromJSON (builtins.readFile argsFile))")
        r = subprocess.run([nixeval.nix_instantiate(), "--eval", "--strict", "--json", "--option",
                            "build-users-group", "", "--expr", expr, "--argstr", "argsFile", f.name],
                           capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, nixeval.nix_message(r.stderr)
    out: list[Any] = json.loads(r.stdout)
    return out


def colliding(function: str, candidates: list[str]) -> tuple[str, str]:
    """Two names to which nixlib's own `function` (applied to name and vlan 1) gives one value."""
    seen: dict[str, str] = {}
    for name, value in zip(candidates, nix_map(f"n: {function} n 1", candidates), strict=True):
        if value in seen:
            return seen[value], name
        seen[value] = name
    raise AssertionError(f"no two of {len(candidates)} names collide under {function}")


def tap_collision() -> Call:
    # A tap keeps 6 characters of the name and 4 hex digits of a hash: 2000 names sharing the
    # 6 characters hold a clash (about 30 expected pairs).
    a, b = colliding("nixlib.network.tapName", [f"crowd_{i}" for i in range(2000)])
    return NET, {a: {"vlans": [1]}, b: {"vlans": [1]}}


def mac_collision() -> Call:
    # 3 bytes of hash: 20000 names hold about 12 clashing pairs.
    a, b = colliding("nixlib.network.mac", [f"m{i}" for i in range(20000)])
    return NET, {a: {"vlans": [1]}, b: {"vlans": [1]}}


def clone_nic(**over: Any) -> dict[str, Any]:
    return {"vlan": 1, "ipv4": "192.168.1.1", "mac": "52:54:00:00:00:01", "tap": "m-1-0000", **over}


def clone_collision(key: str, function: str) -> Call:
    """Origin m, and a node whose NIC has what nixlib gives clone c on vlan 1."""
    [taken] = nix_map(f"n: {function} n 1", ["c"])
    other = {"ipv4": "192.168.1.2", "mac": "52:54:00:00:00:02", "tap": "o-1-0000", key: taken}
    return "clone.interfaces", {"nodes": {"m": [clone_nic()], "o": [clone_nic(**other)]}, "origin": "m", "clone": "c"}


SNAP = {"directory": "/s/snapshots/s", "files": {"disk": "/s/snapshots/s/disk.qcow2", "ram": "/s/snapshots/s/ram"}}

CASES: dict[Key, Call | Callable[[], Call]] = {
    ("clone.nix", "clone name … is invalid: use a letter then letters, digits, - or _ (at most 31 characters)"):
        ("clone.plan", {"spec": BASE, "clone": "1x", "snapshot": SNAP}),
    ("clone.nix", "clone …: backend … cannot clone: …"):
        ("clone.plan", {"spec": {**BASE, "backend": "firecracker"}, "clone": "c", "snapshot": SNAP}),
    ("clone.nix", "clone …: no node called …"): ("clone.interfaces", {"nodes": {}, "origin": "m", "clone": "c"}),
    ("clone.nix", "clone …: there is a node or clone of that name already"):
        ("clone.interfaces", {"nodes": {"m": [], "c": []}, "origin": "m", "clone": "c"}),
    ("clone.nix", "clone …: no address left on the vlans (.1-.253 are taken)"):
        ("clone.interfaces", {"nodes": {"m": [clone_nic(ipv4="192.168.1.253")]}, "origin": "m", "clone": "c"}),
    ("clone.nix", "clone …: MAC … collides with another node's; use another name"):
        lambda: clone_collision("mac", "nixlib.network.mac"),
    ("clone.nix", "clone …: tap … collides with another node's; use another name"):
        lambda: clone_collision("tap", "nixlib.network.tapName"),
    ("eval.nix", "nixlib has no function '…'"): ("qemu.lunch", {}),

    ("network.nix", "node '…': vlans must be a list of integers from 1 to 254, got …"): (NET, {"a": {"vlans": 1}}),
    ("network.nix", "node '…': vlans: … is out of range (vlans are integers from 1 to 254)"): (NET, {"a": {"vlans": [255]}}),
    ("network.nix", "node '…': vlans: vlan … is listed twice"): (NET, {"a": {"vlans": [2, 1, 2]}}),
    ("network.nix", "network: at most 253 nodes can share the 192.168.<vlan>.0/24 plan (.254 is the runner's), got …"):
        (NET, {f"n{i}": {} for i in range(254)}),
    ("network.nix", "network: MAC … collides between two nodes; rename one of them"): mac_collision,
    ("network.nix", "node '…': impairments must be a list of { vlan = <n>; delay = …; loss = …; … }, got …"):
        (NET, {"a": {"vlans": [1], "impairments": {"vlan": 1}}}),
    ("network.nix", "node '…': impairments: vlan … is impaired twice"):
        (NET, {"a": {"vlans": [1], "impairments": [{"vlan": 1, "loss": 1}, {"vlan": 1, "delay": 5}]}}),
    ("network.nix", "node '…': impairments: vlan … is not one of the node's vlans (…)"):
        (NET, {"a": {"vlans": [1, 3], "impairments": [{"vlan": 2, "loss": 1}]}}),
    ("network.nix", "network: tap name … collides between two nodes; rename one of them"): tap_collision,

    ("node.nix", "node description without a name: …"): node(Q, name=DROP),
    ("node.nix", "unknown backend … (known: …)"): node(Q, backend="bochs"),
    ("node.nix", "unknown option(s) … (known: …)"): node(Q, colour="red"),
    ("node.nix", "memory must be an integer number of MiB, got … …"): node(Q, memory="1G"),
    ("node.nix", "memory must be between 128 and 65536 MiB, got …"): node(Q, memory=64),
    ("node.nix", "cores must be an integer from 1 to 64, got …"): node(Q, cores=0),
    ("node.nix", 'accel must be "kvm" or "tcg", got …'): node(Q, accel="hvf"),
    ("node.nix", 'accel: backend … needs KVM, it has no TCG (use backend = "qemu" with machineType = "microvm" '
                 "for the same shape without KVM)"): node(FC, accel="tcg"),
    ("node.nix", "machineType … is not offered by backend … (it has: …)"): node(Q, machineType="virt"),
    ("node.nix", "…: expected the path or name of an executable (a string)"): node(Q, qemuBinary=["qemu"]),
    ("node.nix", "kernel (path to the guest kernel) is required (null: boot the disk's own boot loader)"):
        node(Q, kernel=DROP),
    ("node.nix", "kernel = null (disk boot) needs firmware: only backend qemu with machineType q35 or pc has it"):
        node(Q, kernel=None, machineType="microvm"),
    ("node.nix", "initrd and kernelParams have no effect with kernel = null (the disk's boot loader chooses them)"):
        node(Q, kernel=None, initrd="/initrd"),
    ("node.nix", "image (path to the base disk image) is required"): node(Q, image=DROP),
    ("node.nix", "stateDir is required"): node(Q, stateDir=DROP),
    ("node.nix", "initrd must be a path or null"): node(Q, initrd=1),
    ("node.nix", 'imageFormat must be "qcow2" or "raw", got …'): node(Q, imageFormat="vmdk"),
    ("node.nix", "imageFormat: backend … boots raw images only (an ext4 file system image), got …"):
        node(CH, imageFormat="qcow2"),
    ("node.nix", "cpu must be a QEMU CPU model string or null"): node(Q, cpu=1),
    ("node.nix", "kernelParams must be a list of strings"): node(Q, kernelParams=["a", 1]),
    ("node.nix", "extraArgs must be a list of strings"): node(Q, extraArgs="-s"),
    ("node.nix", "extraSerialPorts must be a list of port names (lower-case letters, digits, dots, dashes)"):
        node(Q, extraSerialPorts=["Bad Name"]),
    ("node.nix", "extraSerialPorts: backend … has no virtio-serial ports"): node(FC, extraSerialPorts=["x"]),
    ("node.nix", "allowReboot must be a boolean"): node(Q, allowReboot="no"),
    ("node.nix", "display must be a boolean, got …"): node(Q, display="vga"),
    ("node.nix", 'display: backend … lacks the screenshot capability (it has: …); use backend = "qemu"'):
        node(FC, display=True),
    ("node.nix", 'display: machineType microvm has no PCI bus for a VGA device; use machineType = "q35" or "pc"'):
        node(Q, display=True, machineType="microvm"),
    ("node.nix", "aslr must be true, false or null (off under TCG only), got …"): node(Q, aslr="no"),
    ("node.nix", "tscKhz must be a positive integer (kHz) or null"): node(Q, tscKhz=0),
    ("node.nix", "bootTimeout must be a positive number of seconds or null"): node(Q, bootTimeout=-1),
    ("node.nix", "backdoor must be an attribute set ({ transport = ...; })"): node(Q, backdoor="vsock"),
    ("node.nix", 'backdoor.transport must be "virtio-serial", "virtconsole", "vsock" or "unix" (containers), got …'):
        node(Q, backdoor={"transport": "pigeon"}),
    ("node.nix", "backdoor.transport: backend … lacks the … transport (it has: …)"):
        node(Q, backdoor={"transport": "virtconsole"}),
    ("node.nix", "backdoor.portName must be a port name (lower-case letters, digits, dots, dashes), got …"):
        node(Q, backdoor={"portName": "a,b"}),
    ("node.nix", "backdoor.vsockPort must be a port number from 1, got …"): node(Q, backdoor={"vsockPort": 0}),
    ("node.nix", "backdoor.guestCid must be an integer >= 3 (0-2 are reserved), got …"):
        node(Q, backdoor={"guestCid": 2}),
    ("node.nix", "backdoor.vhost must be a boolean, got …"): node(Q, backdoor={"transport": "vsock", "vhost": 1}),
    ("node.nix", 'backdoor.vhost = true needs backend qemu and transport "vsock" (got backend …, transport …); '
                 "Firecracker and Cloud Hypervisor always use hybrid vsock"):
        node(Q, backdoor={"vhost": True}),
    ("node.nix", "vlans must be a list of integers from 1 to 254, got …"): node(Q, vlans=[0]),
    ("node.nix", 'interfaces must be a list of { tap; mac = "xx:xx:xx:xx:xx:xx"; ... } (the network plan makes them)'):
        node(Q, interfaces=[{"tap": "t0", "mac": "52:54:00:12:34"}]),
    ("node.nix", 'restore must be null or { disk = "<frozen qcow2 of a snapshot>"; ram = <its RAM file> or null; } on backend qemu, got … on …'):
        node(Q, restore={"disk": "/s/disk.qcow2", "ram": 1}),
    ("node.nix", "requires must be a list of feature names"): node(Q, requires="screenshot"),
    ("node.nix", "requires …, which backend … lacks (it has: …)"): node(FC, requires=["screenshot"]),

    ("qemu.nix", "node '…': qemu.launch called for backend …"):
        node(Q, backend="firecracker", imageFormat="raw", accel="kvm"),

    ("firecracker.nix", "node '…': backend … is not … (firecracker.launch builds Firecracker plans only; use ….launch)"):
        node(FC, backend="qemu"),
    ("firecracker.nix", "cpu …: a QEMU CPU model, backend … has none (leave cpu = null)"): node(FC, cpu="host"),
    ("firecracker.nix", "cores must be at most 32 for backend … (its vcpu_count limit), got …"): node(FC, cores=33),

    ("nspawn.nix", "node '…': backend … is not … (nspawn.launch builds container plans only; use ….launch)"):
        node(NS, backend="qemu"),
    ("nspawn.nix", "cpu …: a QEMU CPU model; a container runs on the host's CPU (leave cpu = null)"): node(NS, cpu="host"),
    ("nspawn.nix", "kernelParams …: backend … lacks kernel parameters (a container shares the host's kernel); only "
                   "systemd.* and ntng.* words reach its init"): node(NS, kernelParams=["mitigations=off"]),
    ("nspawn.nix", "sharedDirs.…: backend … bind-mounts shares and cannot take a ':' in their paths (…, …)"):
        node(NS, sharedDirs={"a": {"source": "/a:b", "target": "/b"}}),

    ("cloud-hypervisor.nix", "node '…': backend … is not … (cloudHypervisor.launch builds Cloud Hypervisor plans "
                             "only; use ….launch)"): node(CH, backend="firecracker"),
    ("cloud-hypervisor.nix", "cpu …: a QEMU CPU model, backend … has none (leave cpu = null)"): node(CH, cpu="max"),
    ("cloud-hypervisor.nix", "allowReboot = false: backend … cannot exit on a guest reboot (it always reboots the "
                             "VM); leave allowReboot = true"): node(CH, allowReboot=False),

    ("test.nix", "node name '…' is invalid: use a letter then letters, digits, - or _ (at most 31 characters)"):
        header(nodes={"_a": {}}),
    ("test.nix", "node '…': expected an attribute set of options, got …"): header(nodes={"a": "qemu"}),
    ("test.nix", "node '…': unknown backend … (known: …)"): header(backend="bochs"),
    ("test.nix", "unknown test option(s) … (known: …)"): header(machines={}),
    ("test.nix", "nodes must be an attribute set (node name = options), got …"): header(nodes=["a"]),
    ("test.nix", "globalTimeout must be a positive number of seconds, got …"): header(globalTimeout=-1),
    ("test.nix", "skipLint must be a boolean"): header(skipLint=1),
    ("test.nix", "skipTypeCheck must be a boolean"): header(skipTypeCheck="no"),
    ("test.nix", "name must be a string"): header(name=["t"]),
    ("test.nix", 'networkMode must be "tap" or "vde", got …'): (TS, {"header": {"nodes": {"a": {}}}, "defaults": {**DEFAULTS, "networkMode": "slirp"}}),
    ("node.nix", "interfaces: backend … needs TAP networking (CAP_NET_ADMIN); rootless VDE networking is QEMU-only"):
        node(FC, interfaces=[{"tap": "t", "mac": "52:54:00:00:00:01", "vdeSocket": "/s/vde1"}]),
    ("node.nix", "kernelParams: the kernel command line would be … bytes; Linux on x86 takes 2048 (with many nodes, ntng.hosts grows: use fewer nodes or a NixOS system)"):
        (TS, {"header": {"nodes": {f"node{i:03}": {"vlans": [1]} for i in range(60)}}, "defaults": DEFAULTS}),
    # shared directories (shares.nix)
    ("shares.nix", "sharedDirs must be an attribute set { <tag> = { source; target; ... }; }"): node(Q, sharedDirs=["/a"]),
    ("shares.nix", "shareArtifacts must be a boolean"): node(Q, shareArtifacts="yes"),
    ("shares.nix", "sharedDirs.…: the tag is taken by shareArtifacts = true"):
        node(Q, shareArtifacts=True, sharedDirs={"shared": {"source": "/a", "target": "/b"}}),
    ("shares.nix", 'sharedDirs: backend … lacks the sharedDirs capability (no 9p, no virtiofs); use backend = "qemu"'):
        node(FC, shareArtifacts=True),
    ("shares.nix", "sharedDirs.… must be an attribute set { source; target; ... }"): node(Q, sharedDirs={"a": "/a"}),
    ("shares.nix", "…: the tag must be a letter then letters, digits, - or _ (at most 31 characters)"):
        node(Q, sharedDirs={"1bad": {"source": "/a", "target": "/b"}}),
    ("shares.nix", "…: unknown option(s) … (known: …)"):
        node(Q, sharedDirs={"a": {"source": "/a", "target": "/b", "mode": "ro"}}),
    ("shares.nix", "….source must be an absolute host path without spaces or commas, got …"):
        node(Q, sharedDirs={"a": {"source": "rel/dir", "target": "/b"}}),
    ("shares.nix", "….target must be an absolute guest path (not /) without spaces or commas, got …"):
        node(Q, sharedDirs={"a": {"source": "/a", "target": "/with,comma"}}),
    ("shares.nix", '….type must be "9p" or "virtiofs", got …'):
        node(Q, sharedDirs={"a": {"source": "/a", "target": "/b", "type": "nfs"}}),
    ("shares.nix", "….type: backend … has no … shares (it has: …)"):
        node(CH, sharedDirs={"a": {"source": "/a", "target": "/b"}}),  # 9p
    ("shares.nix", "….readOnly must be a boolean"):
        node(Q, sharedDirs={"a": {"source": "/a", "target": "/b", "readOnly": "yes"}}),
    ("shares.nix", '….securityModel must be "none", "mapped-xattr", "mapped-file" or "passthrough" (QEMU\'s 9p security_model), got …'):
        node(Q, sharedDirs={"a": {"source": "/a", "target": "/b", "securityModel": "open"}}),
    ("shares.nix", "….securityModel applies to 9p shares only"):
        node(Q, sharedDirs={"a": {"source": "/a", "target": "/b", "type": "virtiofs", "securityModel": "mapped-xattr"}}),
}

WRAPPER = "the `fail` helper: what it throws is the message of each fail/check site, listed in CASES"
MKTEST = "mkTest needs a pkgs: tested in tests/nix/test_mktest.py (test_invalid_test_fails_naming_the_option)"
EXEMPT: dict[Key, str] = {
    ("network.nix", "internal: … not in list"): "indexOf is only asked for names taken from the list it searches",
    ("node.nix", "node '…': …"): WRAPPER,
    ("firecracker.nix", "node '…': …"): WRAPPER,
    ("cloud-hypervisor.nix", "node '…': …"): WRAPPER,
    ("nspawn.nix", "node '…': …"): WRAPPER,
    ("shares.nix", "node '…': …"): WRAPPER,
    ("node.nix", ""): "`check name (isAttrs caps) \"\"` only forces caps, which throws 'unknown backend' itself",
    ("mkTest.nix", 'mkTest …: accel must be "kvm" or "tcg", got …'): MKTEST,
    ("mkTest.nix", 'mkTest …: accel = "tcg" needs QEMU nodes only (this test uses …); Firecracker and Cloud '
                   'Hypervisor need KVM'): MKTEST,
    ("node.nix", "interfaces: backend … has no networking"):
        "every backend in capabilities.nix offers networks; the check is for one that would not",
}

# Messages of `fail`/`check` sites in these files get the node's name put in front.
NODE_PREFIXED = {"node.nix", "firecracker.nix", "cloud-hypervisor.nix", "shares.nix", "nspawn.nix"}


def test_scanner() -> None:
    src = r'''
      a = throw "plain ${x} and ${f "nested ${y}" "}"} end";
      b = check name (cond && match "[(]" s != null)
        "escaped \"q\" ${g (h ")")}";
      c = fail n "via fail";  check = cond: msg: throw msg;
      d = check (x) "no name";  e = check name (x) y;
    '''
    assert messages(src) == {"plain … and … end": 2, 'escaped "q" …': 3, "via fail": 5, "no name": 6}
    assert pattern("a (b) … c").fullmatch("a (b) x.y c")


def test_every_message_has_a_case() -> None:
    scanned = set(scan())
    assert not set(CASES) & set(EXEMPT)
    untested = sorted(scanned - set(CASES) - set(EXEMPT))
    gone = sorted((set(CASES) | set(EXEMPT)) - scanned)
    assert not untested, "nixlib messages without a case here (add one to CASES):\n" + "\n".join(map(repr, untested))
    assert not gone, "cases for messages nixlib no longer has:\n" + "\n".join(map(repr, gone))


def nix_trace_file(stderr: str) -> str | None:
    """The nixlib file of the first position in a --show-trace error."""
    m = re.search(rf"at {re.escape(str(NIXLIB))}/([\w.-]+\.nix):\d+:\d+", stderr)
    return m.group(1) if m else None


def run_case(call: Call) -> tuple[str | None, str]:
    """(thrown message, file of the throw) of one call; message None if it did not throw."""
    fn, arg = call
    value, stderr = nixeval.evaluate("eval.nix", ["--argstr", "fn", fn, "--argstr", "arg", json.dumps(arg)],
                                     show_trace=True)
    if stderr is None:
        return None, json.dumps(value)[:200]
    return nixeval.nix_message(stderr).removeprefix("nixlib: "), nix_trace_file(stderr) or "?"


def test_each_case_throws_its_message() -> None:
    keys = sorted(CASES)
    calls = [c() if callable(c) else c for c in (CASES[k] for k in keys)]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(run_case, calls))
    scanned = scan()
    wrong = []
    for (file, template), (msg, where) in zip(keys, results, strict=True):
        fails: list[str] = []
        if msg is None:
            fails.append(f"no error (result {where})")
        else:
            if not pattern(template).search(msg):
                fails.append(f"threw {msg!r}")
            if where != file:
                fails.append(f"thrown from {where}")
            site_is_node_check = (file, template) in scanned and file in NODE_PREFIXED \
                and not template.startswith("node ")
            if site_is_node_check and not re.match(r"node '[^']+': ", msg):
                fails.append(f"does not name the node: {msg!r}")
            if "\n" in msg:
                fails.append("spans lines")
        if fails:
            wrong.append(f"{file}: {template!r}: " + "; ".join(fails))
    assert not wrong, "\n".join(wrong)


# --- wrong types from a test's header never escape as Nix's own errors --------------------------

NODE_OPTIONS = ["memory", "cores", "accel", "backend", "machineType", "cpu", "qemuBinary", "qemuImg",
                "firecrackerBinary", "cloudHypervisorBinary", "vhostDeviceVsock", "imageFormat", "initrd",
                "kernelParams", "allowReboot", "display", "aslr", "tscKhz", "bootTimeout", "extraArgs", "extraSerialPorts",
                "backdoor", "vlans", "interfaces", "requires", "name", "kernel", "image", "stateDir"]
TOP_OPTIONS = ["nodes", "name", "globalTimeout", "skipLint", "skipTypeCheck", "backend"]
ODD_VALUES: list[Any] = [
    1, 0, -1, 1.5, True, None, "x", [1], ["x"], [None], [{"a": 1}], {"a": 1},
    {"transport": 1}, {"transport": "vsock", "guestCid": "3"}, {"vsockPort": None}, {"portName": 1},
]


def test_wrong_types_are_validation_errors() -> None:
    """Any value for any option of a node or of the test: either a plan whose command lines are
    all strings, or a `throw` (a message of nixlib's).  A Nix type or coercion error (`value is
    an integer while a string was expected`), which names neither node nor option, fails the
    whole evaluation here; tryEval catches throws only."""
    defaults = DEFAULTS | {"vmlinux": "/v", "accel": "kvm", "imageFormat": "raw"}
    cases = [{"header": {"nodes": {"m": {opt: v}}, "backend": backend}, "defaults": defaults}
             for backend in ("qemu", "firecracker", "cloud-hypervisor") for opt in NODE_OPTIONS for v in ODD_VALUES]
    cases += [{"header": {"nodes": {"m": {}}, opt: v}, "defaults": defaults} for opt in TOP_OPTIONS for v in ODD_VALUES]
    check = """x: let
        r = builtins.tryEval (let s = nixlib.testSpec x; in builtins.deepSeq s s);
        strings = builtins.all builtins.isString;
        good = p: strings p.argv && builtins.all strings p.prepare && builtins.all (h: strings h.argv) p.helpers;
      in if !r.success then "rejected" else if builtins.all good (builtins.attrValues r.value.nodes) then "ok"
         else "non-string argument" """
    try:
        outcomes = nix_map(check, cases)
    except AssertionError:
        # Find the inputs at fault: each on its own (only when the batch failed).
        with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
            errors = list(pool.map(lambda c: _error_of(check, c), cases))
        bad = [f"{json.dumps(c['header'])}: {e}" for c, e in zip(cases, errors, strict=True) if e]
        pytest.fail("Nix errors instead of nixlib messages:\n" + "\n".join(bad[:20]))
    bad = [json.dumps(c["header"]) for c, o in zip(cases, outcomes, strict=True) if o not in ("ok", "rejected")]
    assert not bad, "plans with non-string command-line arguments:\n" + "\n".join(bad)
    assert outcomes.count("rejected") > len(cases) // 2  # most of these are wrong


def _error_of(check: str, case: Any) -> str | None:
    try:
        nix_map(check, [case])
    except AssertionError as e:
        return str(e).splitlines()[0]
    return None
