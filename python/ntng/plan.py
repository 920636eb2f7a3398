"""The types of nixlib's output: the test spec (nixlib/test.nix), each node's launch plan
(nixlib/qemu.nix, firecracker.nix, cloud-hypervisor.nix), snapshot layouts and clone plans
(nixlib/clone.nix).

They are TypedDicts, so a plan stays the dict nixlib's JSON gave (nothing is converted) and mypy
checks every read.  Each is validated once, where the runner gets it (testspec.load,
testspec.read_spec_file for mkTest's spec files, snapshots.layout and clone_plan, accel's probe): a value of the wrong shape is a
PlanError naming where it came from and the field's path, never a KeyError deep inside a run.
Keys nixlib adds that are not typed here pass at run time (strict=False);
tests/nix/test_plan_types.py evaluates every builder with strict=True, so they cannot drift.

A leaf module: it imports nothing from ntng but errors.
"""

# No `from __future__ import annotations`: TypedDict sees NotRequired only in evaluated annotations.
import functools
import types
import typing
from typing import Any, Literal, NotRequired, TypedDict, TypeVar, Union

from .errors import PlanError

Json = Any  # what nixlib passes through untouched (API bodies, config files, user options)


# --- the network plan (nixlib/network.nix, test.nix) ----------------------------------------------

class Interface(TypedDict):
    """One NIC of a node: the network plan's entry, plus in a launch plan who switches its link
    (`link`: "vmm" through QMP set_link, "host" by downing the TAP) and QEMU's netdev id."""

    vlan: int
    bridge: str
    tap: str
    ifb: str
    mac: str
    guestName: str
    guestIfb: str  # the guest's IFB device for in-guest impairment of its ingress
    ipv4: str
    ipv6: str
    prefixLength4: int
    prefixLength6: int
    impairment: dict[str, Json] | None  # netem.Impairment.from_mapping checks its fields
    vdeSocket: NotRequired[str | None]  # in the test spec's network plan
    link: NotRequired[Literal["vmm", "host"]]  # in launch plans
    netdev: NotRequired[str]  # QEMU's launch plans
    peer: NotRequired[str]  # nspawn: the container's end of the veth pair (`tap`: the host's)


class Vlan(TypedDict):
    vlan: int
    bridge: str
    members: list[str]
    subnet4: str
    subnet6: str
    hostAddress4: str
    hostAddress6: str
    vdeSocket: str | None  # VDE mode only
    vdeSwitch: list[str] | None  # VDE mode only: the vde_switch argv
    vdeReady: str | None  # VDE mode only: the control socket the switch makes once it serves


class HostEntry(TypedDict):
    address: str
    names: list[str]


class NetworkPlan(TypedDict):
    mode: Literal["tap", "vde"]
    nodes: dict[str, list[Interface]]  # node (and, once started, clone) -> its NICs
    vlans: dict[str, Vlan]  # JSON keys: the vlan number as a string
    hosts: list[HostEntry]
    hostsFile: str


# --- a node's launch plan --------------------------------------------------------------------------

class ApiCall(TypedDict):
    """One REST request to the VMM's API socket (Firecracker, Cloud Hypervisor)."""

    method: str
    path: str
    body: NotRequired[Json]


class ApiRoute(TypedDict):
    """Firecracker's second way to boot: argv without a config file, then `api`."""

    argv: list[str]
    api: list[ApiCall]


class PtyLookup(TypedDict):
    """Where Cloud Hypervisor's API says which pty its virtio-console got."""

    method: str
    path: str
    field: list[str]


class Backdoor(TypedDict):
    transport: Literal["virtio-serial", "vsock", "virtconsole", "unix"]
    guestCid: NotRequired[int]
    cid: NotRequired[int]  # QEMU with backdoor.vhost: AF_VSOCK to this CID
    vsockPort: NotRequired[int]
    vhost: NotRequired[bool]
    portName: NotRequired[str]
    keyFile: NotRequired[str]  # QEMU: the run's key, handed to the guest by fw_cfg
    socket: NotRequired[str]  # QEMU virtio-serial
    uds: NotRequired[str]  # hybrid vsock: the unix socket the runner connects to
    port: NotRequired[int | None]  # hybrid vsock port (None: Cloud Hypervisor's virtconsole)
    pty: NotRequired[PtyLookup]  # Cloud Hypervisor's virtconsole
    folder: NotRequired[str]  # nspawn: the host folder bind-mounted at guestFolder (socket, key)
    guestFolder: NotRequired[str]


class Capabilities(TypedDict):
    """The node's effective entry of nixlib/capabilities.nix (`why`: what rules a feature out)."""

    features: list[str]
    machineTypes: list[str]
    shareTypes: list[str]
    transports: list[str]
    why: dict[str, str]


class Files(TypedDict):
    consoleLog: str
    disk: str
    stderr: str  # the VMM's stdout and stderr
    log: NotRequired[str]  # Firecracker's logger
    metrics: NotRequired[str]  # Firecracker's metrics
    layer: NotRequired[str]  # nspawn: the overlay's folder (upper = `disk`, and its work folder)


# Sockets by role: qmp, console, backdoor (QEMU virtio-serial), vsock (hybrid vsock), api
# (Firecracker, Cloud Hypervisor), "port:<name>" (QEMU's extra serial ports): a plain mapping,
# since those last keys are the user's names.
Sockets = dict[str, str]


class RootSkeleton(TypedDict):
    folders: list[str]  # 0755
    private: list[str]  # 0700
    files: list[str]  # empty


class CheckBinary(TypedDict):
    path: str
    missing: str  # what to install


class Helper(TypedDict):
    """A side process started before the VMM (virtiofsd, vhost-device-vsock)."""

    name: str
    argv: list[str]
    log: str
    waitFor: str  # the socket it makes when ready
    missing: str  # what to install when argv[0] is not there


class Share(TypedDict):
    tag: str
    source: str
    target: str
    type: Literal["9p", "virtiofs"]
    readOnly: bool
    securityModel: str | None
    create: bool


class Ram(TypedDict):
    kind: Literal["memfd", "file"]
    path: NotRequired[str]  # kind "file": the snapshot's RAM, mapped copy-on-write


class CloneIdentity(TypedDict):
    """nixlib/clone.nix's identity: what a clone is told right after its restore."""

    hostname: str
    hosts: list[str]  # /etc/hosts lines ("address name")
    nics: str  # shell: one `ip -batch` giving the NICs their MACs and addresses ("": no NICs)
    script: str  # shell for an agent without IDENTITY ($NTNG_EPOCH, $NTNG_CLONE_ID: the runner's)


class CloneInfo(TypedDict):
    """Added by the runner to a clone's plan (snapshots.clone_plan)."""

    snapshot: str
    origin: str
    id: str  # random, one per start_from_snapshot
    identity: CloneIdentity


class Artifacts(TypedDict):
    """The runner's files of a node in the run's folder (nixlib's @artifacts@ marker, replaced
    by the driver)."""

    consoleLog: str
    journal: str


class NodePlan(TypedDict):
    name: str
    backend: Literal["qemu", "firecracker", "cloud-hypervisor", "nspawn"]
    accel: str
    memory: int
    cores: int
    kernel: str | None
    bootTimeout: int | float | None
    prepare: list[list[str]]  # commands run before the VMM (disk overlay, ...)
    helpers: list[Helper]
    argv: list[str]
    writeFiles: dict[str, Json]  # path -> JSON written there (Firecracker's --config-file)
    api: list[ApiCall]  # after argv, in order
    sockets: Sockets
    files: Files
    backdoor: Backdoor
    console: Literal["socket", "stdout", "file"]
    interfaces: list[Interface]
    capabilities: Capabilities
    restartOnReboot: bool
    shares: list[Share]
    launchSpec: dict[str, Json]  # the node spec nixlib planned from: clone.nix plans again from it
    stateDir: str  # the folder of the node's sockets and files, made private before the start
    artifacts: Artifacts
    calls: NotRequired[dict[str, ApiCall]]  # Firecracker, Cloud Hypervisor: pause, resume, ...
    display: NotRequired[bool]  # QEMU
    ram: NotRequired[Ram | None]  # QEMU: argv's guest RAM (None: anonymous)
    restoreArgv: NotRequired[list[str] | None]  # QEMU: a clone's argv (-incoming defer)
    restoreRam: NotRequired[Ram | None]  # QEMU: restoreArgv's guest RAM
    apiRoute: NotRequired[ApiRoute]  # Firecracker
    cliArgv: NotRequired[list[str]]  # Cloud Hypervisor's route without the API
    clone: NotRequired[CloneInfo]  # the runner's, on clones
    tree: NotRequired[str | None]  # nspawn: the image's root tree, the overlay's lower layer (None: NixOS)
    init: NotRequired[str | None]  # nspawn, NixOS (mkTest): the system's toplevel/init, run as PID 1
    rootSkeleton: NotRequired[RootSkeleton | None]  # nspawn, NixOS: made in the fresh root folder
    machine: NotRequired[str]  # nspawn --machine
    checkBinaries: NotRequired[list[CheckBinary]]  # nspawn: looked for before anything is made
    folders: NotRequired[list[str]]  # nspawn: made 0700 by the runner before the start
    missing: NotRequired[str]  # nspawn: what to install when systemd-nspawn is missing
    rebootExitStatus: NotRequired[int]  # nspawn's exit status on a guest reboot


class Spec(TypedDict):
    """nixlib/test.nix's result: what `ntng run` runs (mkTest's spec-<accel>.json too)."""

    name: str
    globalTimeout: int
    skipLint: NotRequired[bool]  # mkTest's (the runner does not read them)
    skipTypeCheck: NotRequired[bool]
    nodeNames: list[str]
    nodes: dict[str, NodePlan]
    network: NetworkPlan


# --- snapshots and clones (nixlib/clone.nix) -------------------------------------------------------

SnapshotFile = Literal["disk", "note", "memory", "ram", "vmstate"]


class SnapshotFiles(TypedDict):
    disk: str
    note: str
    memory: NotRequired[str]  # QEMU: the migration stream; Firecracker: guest memory
    ram: NotRequired[str]  # QEMU: guest RAM beside the stream
    vmstate: NotRequired[str]  # Firecracker


class CopyDisk(TypedDict):
    save: list[str]  # the node's disk into the snapshot
    restore: list[str] | None  # back, before a restore (None: QEMU clones boot an overlay on it)


class Migrate(TypedDict):
    """QEMU: the URIs of QMP's migrate and migrate-incoming."""

    save: str
    restore: str


class SnapshotLayout(TypedDict):
    directory: str
    files: SnapshotFiles
    save: list[ApiCall]  # Firecracker, Cloud Hypervisor (QEMU's go through QMP)
    restore: list[ApiCall]
    copyDisk: CopyDisk
    guestPrepare: list[list[str]]  # argv run in the guest before the save (for its clones)
    migrate: NotRequired[Migrate]  # QEMU


class ClonePlan(TypedDict):
    interfaces: list[Interface]
    identity: CloneIdentity
    plan: NodePlan


class ProbePlan(TypedDict):
    """nixlib/qemu.nix's probe: the KVM boot probe's argv and the line that means it worked."""

    argv: list[str]
    expect: str


# --- validation ------------------------------------------------------------------------------------

T = TypeVar("T")


def validate(value: object, tp: type[T], where: str, *, strict: bool = False) -> T:
    """`value` as a `tp`, after checking its whole shape (PlanError: `where`, the field path, what
    was expected and what is there).  strict: keys `tp` does not declare are errors too."""
    problem = _check(value, tp, strict)
    if problem is not None:
        path, msg = problem
        raise PlanError(f"{where}: {path}: {msg}" if path else f"{where}: {msg}")
    return typing.cast(T, value)


def spec(value: object, where: str) -> Spec:
    return validate(value, Spec, where)


def snapshot_layout(value: object, where: str) -> SnapshotLayout:
    return validate(value, SnapshotLayout, where)


def clone_plan(value: object, where: str) -> ClonePlan:
    return validate(value, ClonePlan, where)


def no_network() -> NetworkPlan:
    """The network plan of a test without vlans."""
    return NetworkPlan(mode="tap", nodes={}, vlans={}, hosts=[], hostsFile="")


def vsock_port(backdoor: Backdoor, node: str) -> int:
    """The vsock port of a backdoor on vsock (`port` is null only on Cloud Hypervisor's virtconsole)."""
    port = backdoor.get("port")
    if port is None:
        raise PlanError(f"node {node}: its plan's backdoor ({backdoor['transport']}) names no vsock port")
    return port


def _describe(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _is_typeddict(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, dict) and hasattr(tp, "__required_keys__")


def _check(value: object, tp: Any, strict: bool) -> tuple[str, str] | None:
    """(field path, what is wrong) for the first mismatch, or None."""
    if tp is Any or tp is object:
        return None
    if tp is None or tp is type(None):
        return None if value is None else ("", f"expected null, got {_describe(value)}")
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        options = typing.get_args(tp)
        problems = [p for p in (_check(value, o, strict) for o in options) if p is not None]
        if len(problems) < len(options):
            return None
        # One option of the right kind (e.g. a dict for `Ram | None`): its problem is the useful one.
        deeper = [p for p in problems if p[0]]
        return deeper[0] if len(deeper) == 1 else ("", f"expected {' or '.join(map(_name, options))}, "
                                                       f"got {_describe(value)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        return None if value in allowed and not isinstance(value, bool) else (
            "", f"expected one of {', '.join(map(repr, allowed))}, got {_describe(value)}")
    if origin is list:
        if not isinstance(value, list):
            return "", f"expected a list, got {_describe(value)}"
        (item,) = typing.get_args(tp)
        for i, v in enumerate(value):
            if (p := _check(v, item, strict)) is not None:
                return f"[{i}]" + _join(p[0]), p[1]
        return None
    if origin is dict:
        if not isinstance(value, dict):
            return "", f"expected an object, got {_describe(value)}"
        _, item = typing.get_args(tp)
        for k, v in value.items():
            if (p := _check(v, item, strict)) is not None:
                return _key(k) + _join(p[0]), p[1]
        return None
    if _is_typeddict(tp):
        return _check_record(value, tp, strict)
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    return None if ok else ("", f"expected {_name(tp)}, got {_describe(value)}")


def _check_record(value: object, tp: Any, strict: bool) -> tuple[str, str] | None:
    if not isinstance(value, dict):
        return "", f"expected an object ({tp.__name__}), got {_describe(value)}"
    hints = _hints(tp)
    missing = sorted(k for k in tp.__required_keys__ if k not in value)
    if missing:
        return "", f"missing field(s) {', '.join(missing)} ({tp.__name__})"
    if strict:
        unknown = sorted(str(k) for k in value if k not in hints)
        if unknown:
            return "", f"field(s) {', '.join(unknown)} not in {tp.__name__} (python/ntng/plan.py)"
    for k, field in hints.items():
        if k in value and (p := _check(value[k], field, strict)) is not None:
            return _key(k) + _join(p[0]), p[1]
    return None


@functools.cache
def _hints(tp: Any) -> dict[str, Any]:
    """A TypedDict's fields (cached: resolving them costs more than checking a plan)."""
    return typing.get_type_hints(tp)


def _key(k: object) -> str:
    return str(k) if isinstance(k, str) and k.replace("-", "_").isidentifier() else f"[{k!r}]"


def _join(rest: str) -> str:
    return rest if not rest or rest.startswith("[") else "." + rest
