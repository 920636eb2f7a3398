"""Network impairment (delay, loss, corruption, rate limits) for links between test VMs.

One description, `Impairment`, and two engines, because netem is not available everywhere:

* the guest engine (`guest_tc_commands`) returns `tc` shell commands that the test runs as root
  inside a guest.  Guest kernels have sch_netem and ifb, so this always works.
* the host engine (`apply_host`) configures netem with pyroute2 on the guest's TAP device in the
  runner's network namespace, so the guest sees no extra qdisc.  It needs sch_netem in the host
  kernel, which many CI kernels lack: ask `host_netem_supported` first.

Directions are named from the guest's point of view: "in" is traffic arriving at the guest,
"out" traffic the guest sends.  Egress can be shaped directly with a root qdisc; ingress can't,
so ingress traffic is redirected (u32 match-all filter + mirred) to an IFB device whose egress
carries the netem qdisc.  On the host the roles swap: traffic *to* the guest leaves the tap
(tap egress = "in"), traffic *from* the guest enters it (tap ingress = "out").

Every operation is idempotent and uses replace, so impairments can be changed or cleared while
traffic flows.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import math
import os
import re
import shlex
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from .errors import SetupError, TestScriptError

if TYPE_CHECKING:  # pyroute2 is only needed by the host engine: import it lazily
    from pyroute2 import IPRoute

DIRECTIONS = ("in", "out", "both")

MAX_DELAY_MS = 60_000
MIN_DELAY_MS = 0.001  # netem (and tc) count in microseconds: anything shorter becomes 0
MIN_RATE_KBIT = 8
MAX_RATE_KBIT = 100_000_000
MAX_LIMIT = 1_000_000
DEFAULT_LIMIT = 10_000

# netem's TCA_NETEM_RATE carries bytes/s in a u32 and pyroute2 0.9.7 can't send TCA_NETEM_RATE64.
MAX_HOST_RATE_KBIT = (2**32 - 1) * 8 // 1000

IFNAMSIZ = 15  # usable characters in a Linux interface name
_IFNAME_RE = re.compile(r"[A-Za-z0-9_.+-]{1,15}")

_PERCENT_FIELDS = ("loss", "corrupt", "duplicate", "reorder")
_DELAY_FIELDS = ("delay_ms", "jitter_ms")
FIELDS = ("delay_ms", "jitter_ms", "loss", "corrupt", "duplicate", "reorder", "rate_kbit", "limit")
ALIASES = {"delay": "delay_ms", "jitter": "jitter_ms", "rate": "rate_kbit"}
VALID_KEYS = FIELDS + tuple(ALIASES)


class ImpairmentError(TestScriptError):
    """A test script asked for an impairment, direction or interface that can't be configured."""


def _is_number(value: object) -> bool:
    # bool is an int subclass, but `loss=True` is a mistake, not 1%.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _num(value: float) -> str:
    """A number as tc and humans read it: no exponent, no trailing `.0`, no float noise."""
    if isinstance(value, int):
        return str(value)
    if value == int(value):
        return str(int(value))
    return format(Decimal(repr(value)), "f")


@dataclasses.dataclass(frozen=True)
class Impairment:
    """What to do to packets on one direction of a link, with netem's semantics.

    Percentages are 0..100; delays are 0 or 1µs..60s.  `jitter_ms` needs a delay and may not exceed it: netem draws the
    delay from delay ± jitter and clamps negative draws, so a larger jitter would silently move
    the mean delay and reorder most packets.  `reorder` sends that share of packets without the
    delay, so it needs `delay_ms > 0` too (as tc insists).
    """

    delay_ms: float = 0
    jitter_ms: float = 0
    loss: float = 0
    corrupt: float = 0
    duplicate: float = 0
    reorder: float = 0
    rate_kbit: int | None = None
    limit: int = DEFAULT_LIMIT

    def __post_init__(self) -> None:
        for name in _PERCENT_FIELDS:
            value = getattr(self, name)
            if not (_is_number(value) and math.isfinite(value) and 0 <= value <= 100):
                raise ImpairmentError(f"{name} must be a percentage from 0 to 100, got {value!r}")
        for name in _DELAY_FIELDS:
            value = getattr(self, name)
            if not (_is_number(value) and math.isfinite(value) and 0 <= value <= MAX_DELAY_MS):
                raise ImpairmentError(
                    f"{name} must be a number of milliseconds from 0 to {MAX_DELAY_MS}, got {value!r}"
                )
            if 0 < value < MIN_DELAY_MS:
                raise ImpairmentError(
                    f"{name} must be 0 or at least {MIN_DELAY_MS} (1µs, netem's resolution), got {value!r}"
                )
        rate = self.rate_kbit
        if rate is not None and not (_is_int(rate) and MIN_RATE_KBIT <= rate <= MAX_RATE_KBIT):
            raise ImpairmentError(
                f"rate_kbit must be None or an integer number of kbit/s from {MIN_RATE_KBIT} "
                f"to {MAX_RATE_KBIT}, got {rate!r}"
            )
        if not (_is_int(self.limit) and 1 <= self.limit <= MAX_LIMIT):
            raise ImpairmentError(
                f"limit must be an integer number of packets from 1 to {MAX_LIMIT}, got {self.limit!r}"
            )
        if self.jitter_ms and not self.delay_ms:
            raise ImpairmentError(f"jitter_ms ({_num(self.jitter_ms)}) needs delay_ms > 0, got delay_ms 0")
        if self.jitter_ms > self.delay_ms:
            raise ImpairmentError(
                f"jitter_ms must be from 0 to delay_ms ({_num(self.delay_ms)}), got {self.jitter_ms!r}"
            )
        if self.reorder and not self.delay_ms:
            raise ImpairmentError(
                f"reorder ({_num(self.reorder)}%) needs delay_ms > 0: netem reorders by sending "
                "some packets without the delay"
            )

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any], where: str) -> Impairment:
        """Build from test-script data; `where` (e.g. "nodes.a.eth1") prefixes every error."""
        if not isinstance(d, Mapping):
            raise ImpairmentError(f"{where}: an impairment must be a mapping, got {type(d).__name__}")
        kwargs: dict[str, Any] = {}
        given_as: dict[str, str] = {}
        for key, value in d.items():
            field = ALIASES.get(key, key) if isinstance(key, str) else None
            if field not in FIELDS:
                best = (
                    difflib.get_close_matches(key, VALID_KEYS, n=1, cutoff=0.0)
                    if isinstance(key, str)
                    else []
                )
                hint = f"; did you mean {best[0]!r}?" if best else ""
                raise ImpairmentError(
                    f"{where}: unknown impairment key {key!r}{hint} (valid keys: {', '.join(VALID_KEYS)})"
                )
            assert isinstance(field, str)
            if field in kwargs:
                raise ImpairmentError(f"{where}: {given_as[field]!r} and {key!r} both set {field}")
            kwargs[field] = value
            given_as[field] = key
        try:
            return cls(**kwargs)
        except ImpairmentError as e:
            raise ImpairmentError(f"{where}: {e}") from None

    @property
    def is_noop(self) -> bool:
        """True when nothing would happen to packets (the queue limit alone changes nothing)."""
        return (
            not self.delay_ms
            and not self.loss
            and not self.corrupt
            and not self.duplicate
            and not self.reorder
            and self.rate_kbit is None
        )

    def describe(self) -> str:
        """A short human summary for logs, e.g. "delay 50ms ±5ms loss 5% rate 1000kbit"."""
        parts = []
        if self.delay_ms:
            parts.append(f"delay {_num(self.delay_ms)}ms")
            if self.jitter_ms:
                parts.append(f"±{_num(self.jitter_ms)}ms")
        for name in _PERCENT_FIELDS:
            value = getattr(self, name)
            if value:
                parts.append(f"{name} {_num(value)}%")
        if self.rate_kbit is not None:
            parts.append(f"rate {self.rate_kbit}kbit")
        if self.limit != DEFAULT_LIMIT:
            parts.append(f"limit {self.limit}")
        return " ".join(parts) if parts else "no impairment"


def check_direction(direction: object) -> str:
    """Return `direction` if it is one of DIRECTIONS, so typos fail before anything changes."""
    if not isinstance(direction, str) or direction not in DIRECTIONS:
        raise ImpairmentError(
            f"direction must be one of {', '.join(repr(d) for d in DIRECTIONS)}, got {direction!r}"
        )
    return direction


def _valid_ifname(name: object) -> bool:
    return isinstance(name, str) and bool(_IFNAME_RE.fullmatch(name)) and name not in (".", "..")


def _active(imp: Impairment | None) -> Impairment | None:
    if imp is not None and not isinstance(imp, Impairment):
        raise ImpairmentError(f"expected an Impairment or None, got {type(imp).__name__}")
    return None if imp is None or imp.is_noop else imp


# ---------------------------------------------------------------------------------------------
# Guest engine: tc commands


# netem keeps its corrupt, reorder and rate settings when a change leaves their attributes out
# (tc and pyroute2 omit them when zero), so a replace must state them even when off.
_STICKY_PERCENT_FIELDS = ("corrupt", "reorder")


def netem_args(imp: Impairment) -> list[str]:
    """The netem options for `imp`, in tc(8) syntax, as separate words.  Settings netem would
    otherwise keep from the qdisc being replaced are written out as zero."""
    args = ["limit", str(imp.limit)]
    if imp.delay_ms:
        args += ["delay", f"{_num(imp.delay_ms)}ms"]
        if imp.jitter_ms:
            args.append(f"{_num(imp.jitter_ms)}ms")
    for name in _PERCENT_FIELDS:
        value = getattr(imp, name)
        if value or name in _STICKY_PERCENT_FIELDS:
            args += [name, f"{_num(value)}%"]
    args += ["rate", f"{imp.rate_kbit}kbit" if imp.rate_kbit is not None else "0bit"]
    return args


# Deleting a netem qdisc drops the packets it still delays, so clearing first stops new packets
# from being delayed, waits (bounded) until the queue is empty, and only then deletes.
DRAIN_TIMEOUT_S = 30
_DRAIN_POLL_S = 0.05


def _guest_drain(dev: str) -> str:
    """Shell: wait until the qdiscs of `dev` hold no packets (or DRAIN_TIMEOUT_S passed)."""
    polls = int(DRAIN_TIMEOUT_S / _DRAIN_POLL_S)
    return (
        f"n=0; while [ $n -lt {polls} ] && tc -s qdisc show dev {dev} 2>/dev/null "
        f"| grep -q 'backlog [1-9]'; do sleep {_DRAIN_POLL_S}; n=$((n+1)); done"
    )


def guest_tc_commands(ifname: str, imp: Impairment | None, direction: str, ifb: str) -> list[str]:
    """Shell commands (run as root in the guest, in order) that make `imp` the impairment of
    `direction` on guest interface `ifname`; None or a no-op impairment removes it.  `ifb`:
    the IFB device that carries its ingress (the interface plan's guestIfb, nixlib's).

    "out" shapes the guest's egress with a root netem qdisc; "in" redirects the guest's ingress
    to an IFB device and shapes that.  Reapplying replaces the parameters in place.
    """
    check_direction(direction)
    for name in (ifname, ifb):
        if not _valid_ifname(name):
            raise ImpairmentError(
                f"interface name must be 1 to {IFNAMSIZ} characters from [A-Za-z0-9_.+-], got {name!r}"
            )
    active = _active(imp)
    dev = shlex.quote(ifname)
    ifb = shlex.quote(ifb)
    cmds: list[str] = []
    if direction in ("out", "both"):
        if active is None:
            # an undelayed netem still holds what the old one delayed; delete it once that left
            cmds.append(
                f"if tc qdisc show dev {dev} root | grep -q '^qdisc netem '; then "
                f"tc qdisc change dev {dev} root netem {' '.join(netem_args(Impairment(limit=MAX_LIMIT)))}; "
                f"{_guest_drain(dev)}; tc qdisc del dev {dev} root; fi"
            )
        else:
            cmds.append(f"tc qdisc replace dev {dev} root netem {' '.join(netem_args(active))}")
    if direction in ("in", "both"):
        if active is None:
            cmds += [
                # no more redirects first; then the IFB's queue drains before the IFB goes
                f"tc qdisc del dev {dev} ingress 2>/dev/null || true",
                _guest_drain(ifb),
                f"ip link del {ifb} 2>/dev/null || true",
            ]
        else:
            cmds += [
                # numifbs=0: don't let the module create ifb0/ifb1 we'd never use
                "modprobe ifb numifbs=0 2>/dev/null || true",
                f"ip link show dev {ifb} >/dev/null 2>&1 || ip link add {ifb} type ifb",
                f"ip link set dev {ifb} up",
                # netem first, so the first redirected packet is already impaired
                f"tc qdisc replace dev {ifb} root netem {' '.join(netem_args(active))}",
                f"tc qdisc replace dev {dev} handle ffff: ingress",
                # a fixed handle makes `replace` update the one filter instead of adding more
                f"tc filter replace dev {dev} parent ffff: protocol all prio 1 handle 800::800 "
                f"u32 match u32 0 0 action mirred egress redirect dev {ifb}",
            ]
    return cmds


# ---------------------------------------------------------------------------------------------
# Host engine: pyroute2 on the tap device

TC_H_ROOT = 0xFFFFFFFF
INGRESS_HANDLE = 0xFFFF0000  # "ffff:", the ingress qdisc and the parent of its filters
ETH_P_ALL = 0x0003
FILTER_PRIO = 1
_MIRRED_EGRESS_REDIRECT = 1  # TCA_EGRESS_REDIR
_GONE = {errno.ENOENT, errno.ENODEV, errno.EINVAL}  # "nothing to delete" answers


@contextmanager
def _netlink(tap: str, operation: str) -> Iterator[None]:
    """Turn netlink failures into a SetupError that says which tap and what was attempted."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        yield
    except NetlinkError as e:
        reason = e.args[1] if len(e.args) > 1 else str(e)
        raise SetupError(f"tap {tap}: {operation} failed: {reason} (errno {e.code})") from e
    except OSError as e:
        raise SetupError(f"tap {tap}: {operation} failed: {e}") from e


def _ignore_gone(tap: str, operation: str, fn: Any, *args: Any, **kwargs: Any) -> None:
    """Delete something that may already be gone; other errors still fail loudly."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with _netlink(tap, operation):
            fn(*args, **kwargs)
    except SetupError as e:
        if not (isinstance(e.__cause__, NetlinkError) and e.__cause__.code in _GONE):
            raise


def _check_host_name(name: str, what: str) -> None:
    if not _valid_ifname(name):
        raise SetupError(f"{what} must be an interface name of 1 to {IFNAMSIZ} characters, got {name!r}")


def _index(ipr: IPRoute, tap: str, ifname: str) -> int | None:
    with _netlink(tap, f"looking up {ifname}"):
        found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _tap_index(ipr: IPRoute, tap: str) -> int:
    index = _index(ipr, tap, tap)
    if index is None:
        raise SetupError(f"tap {tap}: no such network interface in the runner's namespace")
    return index


def _attr(msg: Any, *path: str) -> Any:
    """Walk nested netlink attributes; None when any level is missing."""
    for name in path:
        if msg is None:
            return None
        msg = msg.get_attr(name)
    return msg


def _link_kind(ipr: IPRoute, tap: str, index: int) -> str | None:
    with _netlink(tap, f"reading link {index}"):
        links = list(ipr.get_links(index))
    return _attr(links[0], "IFLA_LINKINFO", "IFLA_INFO_KIND") if links else None


def _tc_raw(ipr: IPRoute, command: str, **fields: Any) -> None:
    """`ipr.tc` with a prebuilt message, bypassing pyroute2's argument filters.

    Needed for netem's rate: `ipr.tc("replace", "netem", ..., rate=...)` also copies `rate`
    into a top-level TCA_RATE attribute and dies encoding it (TypeError) in pyroute2 0.9.7,
    and the sync `nlm_request` that could send a hand-made tcmsg raises KeyError there.
    """
    from pyroute2.requests.main import RequestProcessor

    message = RequestProcessor()
    message.update(fields)
    ipr.tc(command, request_filter=message)


def host_netem_options(imp: Impairment) -> dict[str, Any]:
    """The netem TCA_OPTIONS for `imp`, built by pyroute2's own netem plugin.

    pyroute2 names the fields `delay`/`jitter` (microseconds, converted to psched ticks),
    `loss`/`duplicate` (percent), `prob_reorder`, `prob_corrupt` and `rate` (bytes/s).
    """
    from pyroute2.netlink.rtnl.tcmsg import sched_netem

    params: dict[str, Any] = {
        "delay": round(imp.delay_ms * 1000),
        "jitter": round(imp.jitter_ms * 1000),
        "limit": imp.limit,
        "loss": imp.loss,
        "duplicate": imp.duplicate,
        "prob_reorder": imp.reorder,
        "prob_corrupt": imp.corrupt,
    }
    params["rate"] = 0  # stated even when off: netem keeps an omitted rate (see netem_args)
    if imp.rate_kbit is not None:
        if imp.rate_kbit > MAX_HOST_RATE_KBIT:
            raise SetupError(
                f"rate {imp.rate_kbit}kbit is above what netem's 32-bit rate field can carry "
                f"through pyroute2 ({MAX_HOST_RATE_KBIT}kbit); shape inside the guest instead"
            )
        params["rate"] = imp.rate_kbit * 1000 // 8
    opts: dict[str, Any] = sched_netem.get_parameters(params)
    for key in ("delay", "jitter"):  # time2tick() returns floats; the fields are u32
        opts[key] = int(opts[key])
    present = {name for name, _ in opts["attrs"]}
    for name, fields in (  # pyroute2 leaves zero probabilities out; netem would keep the old ones
        ("TCA_NETEM_REORDER", {"prob_reorder": 0, "corr_reorder": 0}),
        ("TCA_NETEM_CORRUPT", {"prob_corrupt": 0, "corr_corrupt": 0}),
    ):
        if name not in present:
            opts["attrs"].append([name, fields])
    return opts


def host_netem_supported(ipr: IPRoute) -> bool:
    """Whether this kernel accepts a netem qdisc, found by trying one on a scratch device.

    The answer is not cached: modules can appear, and the caller may switch namespaces.
    """
    from pyroute2.netlink.exceptions import NetlinkError

    name = f"ntngp{os.urandom(3).hex()}"  # room for the veth peer suffix
    made = False
    for spec in ({"kind": "ifb"}, {"kind": "veth", "peer": f"{name}p"}):
        try:
            ipr.link("add", ifname=name, **spec)
            made = True
            break
        except NetlinkError:
            continue
    if not made:
        return False
    try:
        index = ipr.link_lookup(ifname=name)[0]
        _tc_raw(
            ipr,
            "replace",  # pyroute2 insists on a kind argument for "add", even with a prebuilt message
            index=index,
            parent=TC_H_ROOT,
            handle=0,
            kind="netem",
            options=host_netem_options(Impairment()),
        )
        return True
    except NetlinkError:
        return False
    finally:
        try:
            ipr.link("del", ifname=name)
        except NetlinkError:
            pass


def _replace_netem(ipr: IPRoute, tap: str, ifname: str, index: int, opts: dict[str, Any]) -> None:
    try:
        with _netlink(tap, f"setting netem on {ifname}"):
            _tc_raw(ipr, "replace", index=index, parent=TC_H_ROOT, handle=0, kind="netem", options=opts)
    except SetupError as e:
        if getattr(e.__cause__, "code", None) == errno.ENOENT:
            raise SetupError(
                f"tap {tap}: setting netem on {ifname} failed: this kernel has no netem qdisc "
                "(CONFIG_NET_SCH_NETEM); impair the link inside the guest instead"
            ) from e.__cause__
        raise


def _root_qdisc_kind(ipr: IPRoute, tap: str, index: int) -> str | None:
    with _netlink(tap, "listing qdiscs"):
        qdiscs = list(ipr.get_qdiscs(index))
    for q in qdiscs:
        if q["index"] == index and q["parent"] == TC_H_ROOT:
            kind: str | None = q.get_attr("TCA_KIND")
            return kind
    return None


def backlog_packets(ipr: IPRoute, tap: str, index: int) -> int:
    """How many packets the qdiscs of device `index` hold right now."""
    with _netlink(tap, "reading qdisc statistics"):
        qdiscs = list(ipr.get_qdiscs(index))
    total = 0
    for q in qdiscs:
        stats = q.get_attr("TCA_STATS")
        if q["index"] == index and stats is not None:
            total += int(stats["qlen"])
    return total


def wait_drained(ipr: IPRoute, tap: str, index: int, timeout: float = DRAIN_TIMEOUT_S) -> None:
    """Wait (bounded) until device `index`'s qdiscs are empty, so deleting them drops nothing."""
    deadline = time.monotonic() + timeout
    while backlog_packets(ipr, tap, index) and time.monotonic() < deadline:
        time.sleep(_DRAIN_POLL_S)


def _clear_root_netem(ipr: IPRoute, tap: str, index: int) -> None:
    """Remove our root netem, leaving any other root qdisc alone.  An undelayed netem takes its
    place until the packets the old one still delays have left (deleting would drop them)."""
    if _root_qdisc_kind(ipr, tap, index) == "netem":
        _replace_netem(ipr, tap, tap, index, host_netem_options(Impairment(limit=MAX_LIMIT)))
        wait_drained(ipr, tap, index)
        _ignore_gone(tap, "deleting the root netem qdisc", ipr.tc, "del", index=index, parent=TC_H_ROOT)


def _ensure_ifb(ipr: IPRoute, tap: str, ifb_name: str) -> tuple[int, bool]:
    """The index of IFB device `ifb_name`, created and brought up if needed; and whether it was created."""
    index = _index(ipr, tap, ifb_name)
    created = False
    if index is None:
        with _netlink(tap, f"creating ifb device {ifb_name}"):
            ipr.link("add", ifname=ifb_name, kind="ifb")
        index = _index(ipr, tap, ifb_name)
        if index is None:
            raise SetupError(f"tap {tap}: ifb device {ifb_name} vanished right after creation")
        created = True
    elif _link_kind(ipr, tap, index) != "ifb":
        raise SetupError(f"tap {tap}: {ifb_name} exists but is not an ifb device")
    with _netlink(tap, f"bringing up {ifb_name}"):
        ipr.link("set", index=index, state="up")
    return index, created


def _mirred_target(filt: Any) -> int | None:
    """The ifindex a u32 filter redirects to (egress redirect), or None."""
    acts = _attr(filt, "TCA_OPTIONS", "TCA_U32_ACT")
    if acts is None:
        return None
    for _, act in acts.get("attrs", []):
        if act.get_attr("TCA_ACT_KIND") != "mirred":
            continue
        parms = _attr(act, "TCA_ACT_OPTIONS", "TCA_MIRRED_PARMS")
        if parms is not None and parms.get("eaction") == _MIRRED_EGRESS_REDIRECT:
            return int(parms["ifindex"])
    return None


def _ingress_filters(ipr: IPRoute, tap: str, index: int) -> list[Any]:
    """The u32 key nodes (real filters, not hash-table entries) under the tap's ingress qdisc."""
    with _netlink(tap, "listing ingress filters"):
        filters = list(ipr.get_filters(index=index, parent=INGRESS_HANDLE))
    return [f for f in filters if _attr(f, "TCA_OPTIONS", "TCA_U32_SEL") is not None]


def redirect_ingress(ipr: IPRoute, tap: str, ifb_name: str) -> None:
    """Send everything arriving on `tap` through IFB device `ifb_name` (created if missing).

    An ingress qdisc on the tap holds one u32 match-all filter whose mirred action redirects to
    the IFB's egress; whatever qdisc the IFB has then shapes the traffic, and the IFB hands the
    packets back to the tap's receive path (so a bridge still sees them).  Idempotent; a
    redirect left over towards another device is replaced.
    """
    _check_host_name(tap, "tap")
    _check_host_name(ifb_name, "ifb_name")
    tap_index = _tap_index(ipr, tap)
    ifb_index, _ = _ensure_ifb(ipr, tap, ifb_name)
    with _netlink(tap, "adding the ingress qdisc"):
        ipr.tc("replace", "ingress", tap_index)
    nodes = _ingress_filters(ipr, tap, tap_index)
    if len(nodes) == 1 and _mirred_target(nodes[0]) == ifb_index:
        return
    if nodes:  # stale or foreign filters: start from an empty ingress qdisc
        _ignore_gone(tap, "deleting the ingress qdisc", ipr.tc, "del", "ingress", tap_index)
        with _netlink(tap, "adding the ingress qdisc"):
            ipr.tc("add", "ingress", tap_index)
    with _netlink(tap, f"adding the ingress redirect to {ifb_name}"):
        ipr.tc(
            "add-filter",
            "u32",
            tap_index,
            parent=INGRESS_HANDLE,
            prio=FILTER_PRIO,
            protocol=ETH_P_ALL,
            target=INGRESS_HANDLE | 1,  # pyroute2 requires a classid; ingress ignores it
            keys=["0x0/0x0+0"],  # match all
            action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": ifb_index},
        )


def remove_redirect(ipr: IPRoute, tap: str, ifb_name: str) -> None:
    """Undo `redirect_ingress`: drop the tap's ingress qdisc (and its filters) and the IFB.

    Missing pieces are fine, so this also cleans up after a half-finished setup or a tap that is
    already gone.
    """
    _check_host_name(tap, "tap")
    _check_host_name(ifb_name, "ifb_name")
    tap_index = _index(ipr, tap, tap)
    if tap_index is not None:
        _ignore_gone(tap, "deleting the ingress qdisc", ipr.tc, "del", "ingress", tap_index)
    ifb_index = _index(ipr, tap, ifb_name)
    if ifb_index is not None and _link_kind(ipr, tap, ifb_index) == "ifb":
        wait_drained(ipr, tap, ifb_index)  # nothing new arrives; let what is delayed leave
        _ignore_gone(tap, f"deleting ifb device {ifb_name}", ipr.link, "del", index=ifb_index)


def apply_host(ipr: IPRoute, tap: str, imp: Impairment | None, direction: str, ifb_name: str) -> None:
    """Make `imp` the impairment of `direction` on the link behind `tap`; None/no-op removes it.

    "in" (towards the guest) is a root netem on the tap; "out" (from the guest) redirects the
    tap's ingress to `ifb_name` and puts netem there.  Needs a kernel with sch_netem (see
    `host_netem_supported`); failures raise SetupError naming the tap.
    """
    check_direction(direction)
    _check_host_name(tap, "tap")
    _check_host_name(ifb_name, "ifb_name")
    active = _active(imp)
    opts = host_netem_options(active) if active is not None else None
    if direction in ("in", "both"):
        if opts is None:
            index = _index(ipr, tap, tap)
            if index is not None:
                _clear_root_netem(ipr, tap, index)
        else:
            _replace_netem(ipr, tap, tap, _tap_index(ipr, tap), opts)
    if direction in ("out", "both"):
        if opts is None:
            remove_redirect(ipr, tap, ifb_name)
        else:
            _tap_index(ipr, tap)  # fail on a missing tap before creating anything
            ifb_index, created = _ensure_ifb(ipr, tap, ifb_name)
            try:
                _replace_netem(ipr, tap, ifb_name, ifb_index, opts)
            except SetupError:
                if created:
                    _ignore_gone(tap, f"deleting ifb device {ifb_name}", ipr.link, "del", index=ifb_index)
                raise
            redirect_ingress(ipr, tap, ifb_name)
