"""Link impairment: validation, the guest's tc commands, and the pyroute2 host engine.

The host tests need root: they work in a scratch network namespace (deleted afterwards) with a
veth pair standing in for a VM's tap.  Whether netem itself can be exercised depends on the
kernel; the redirect plumbing (ingress qdisc, u32 + mirred, IFB) is checked either way.
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import math
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ntng.errors import SetupError
from ntng.errors import TestScriptError as ScriptError
from ntng.netem import (
    DIRECTIONS,
    MAX_HOST_RATE_KBIT,
    VALID_KEYS,
    Impairment,
    ImpairmentError,
    apply_host,
    backlog_packets,
    check_direction,
    guest_tc_commands,
    host_netem_options,
    host_netem_supported,
    netem_args,
    redirect_ingress,
    remove_redirect,
    wait_drained,
)
from ntng.netns import NamespacedIPRoute

PERCENT_FIELDS = ("loss", "corrupt", "duplicate", "reorder")

# ---------------------------------------------------------------------------------------------
# Strategies

percent = st.one_of(st.integers(0, 100), st.floats(0, 100, allow_nan=False))
non_numbers = st.one_of(
    st.booleans(),
    st.text(max_size=5),
    st.none(),
    st.lists(st.integers(), max_size=2),
    st.just(float("nan")),
    st.just(float("inf")),
    st.just(float("-inf")),
)
bad_percent = st.one_of(
    non_numbers,
    st.integers(max_value=-1),
    st.integers(min_value=101),
    st.floats(max_value=-1e-9, allow_infinity=False),
    st.floats(min_value=100, exclude_min=True, allow_infinity=False),
)
bad_delay = st.one_of(
    non_numbers,
    st.integers(max_value=-1),
    st.integers(min_value=60_001),
    st.floats(max_value=-1e-9, allow_infinity=False),
    st.floats(min_value=60_000, exclude_min=True, allow_infinity=False),
)
too_short = st.floats(min_value=0, max_value=0.001, exclude_min=True, exclude_max=True)
bad_rate = st.one_of(
    st.booleans(),
    st.text(max_size=5),
    st.floats(),  # even whole floats: rate_kbit is an integer
    st.integers(max_value=7),
    st.integers(min_value=100_000_001),
)
bad_limit = st.one_of(
    non_numbers,
    st.floats(),
    st.integers(max_value=0),
    st.integers(min_value=1_000_001),
)


@st.composite
def impairments(draw: st.DrawFn) -> Impairment:
    delay = draw(st.one_of(st.just(0), st.integers(0, 60_000), st.floats(0.001, 60_000)))
    jitter = draw(st.one_of(st.just(0), st.floats(0.001, delay))) if delay else 0
    return Impairment(
        delay_ms=delay,
        jitter_ms=jitter,
        loss=draw(percent),
        corrupt=draw(percent),
        duplicate=draw(percent),
        reorder=draw(percent) if delay else 0,
        rate_kbit=draw(st.none() | st.integers(8, 100_000_000)),
        limit=draw(st.integers(1, 1_000_000)),
    )


# ---------------------------------------------------------------------------------------------
# Validation


def test_error_is_a_test_script_error_with_the_documented_message() -> None:
    assert issubclass(ImpairmentError, ScriptError)
    with pytest.raises(ImpairmentError) as e:
        Impairment(loss=150)
    assert str(e.value) == "loss must be a percentage from 0 to 100, got 150"


@given(impairments())
def test_valid_values_are_accepted(imp: Impairment) -> None:
    assert dataclasses.replace(imp) == imp  # re-validates


@pytest.mark.parametrize("field", PERCENT_FIELDS)
@given(value=bad_percent)
def test_bad_percentages_are_rejected(field: str, value: Any) -> None:
    with pytest.raises(ImpairmentError) as e:
        Impairment(delay_ms=10, **{field: value})
    assert str(e.value) == f"{field} must be a percentage from 0 to 100, got {value!r}"


@pytest.mark.parametrize("field", ["delay_ms", "jitter_ms"])
@given(value=bad_delay)
def test_bad_delays_are_rejected(field: str, value: Any) -> None:
    with pytest.raises(ImpairmentError) as e:
        Impairment(**{field: value})
    assert str(e.value) == f"{field} must be a number of milliseconds from 0 to 60000, got {value!r}"


@given(value=bad_rate)
def test_bad_rates_are_rejected(value: Any) -> None:
    with pytest.raises(ImpairmentError) as e:
        Impairment(rate_kbit=value)
    assert str(e.value) == (
        f"rate_kbit must be None or an integer number of kbit/s from 8 to 100000000, got {value!r}"
    )


@given(value=bad_limit)
def test_bad_limits_are_rejected(value: Any) -> None:
    with pytest.raises(ImpairmentError) as e:
        Impairment(limit=value)
    assert str(e.value) == f"limit must be an integer number of packets from 1 to 1000000, got {value!r}"


@pytest.mark.parametrize("field", ["delay_ms", "jitter_ms"])
@given(value=too_short)
def test_delays_below_netems_resolution_are_rejected(field: str, value: float) -> None:
    with pytest.raises(ImpairmentError) as e:
        kwargs: dict[str, Any] = {"delay_ms": 1, field: value}
        Impairment(**kwargs)
    assert str(e.value) == f"{field} must be 0 or at least 0.001 (1µs, netem's resolution), got {value!r}"


def test_boundaries() -> None:
    Impairment(delay_ms=60_000, jitter_ms=60_000, loss=100, corrupt=100, duplicate=100, reorder=100,
               rate_kbit=100_000_000, limit=1_000_000)
    Impairment(rate_kbit=8, limit=1)


def test_cross_field_rules() -> None:
    with pytest.raises(ImpairmentError, match=r"^jitter_ms \(5\) needs delay_ms > 0"):
        Impairment(jitter_ms=5)
    with pytest.raises(ImpairmentError, match=r"^jitter_ms must be from 0 to delay_ms \(10\), got 10.5$"):
        Impairment(delay_ms=10, jitter_ms=10.5)
    with pytest.raises(ImpairmentError, match=r"^reorder \(25%\) needs delay_ms > 0"):
        Impairment(reorder=25)
    Impairment(delay_ms=10, jitter_ms=10, reorder=25)


def test_is_noop_and_describe() -> None:
    assert Impairment().is_noop and Impairment(limit=5).is_noop
    for imp in (Impairment(delay_ms=1), Impairment(loss=0.5), Impairment(corrupt=1), Impairment(duplicate=1),
                Impairment(rate_kbit=8)):
        assert not imp.is_noop
    assert Impairment().describe() == "no impairment"
    assert Impairment(delay_ms=50, jitter_ms=5, loss=5, rate_kbit=1000).describe() == (
        "delay 50ms ±5ms loss 5% rate 1000kbit"
    )
    assert Impairment(delay_ms=0.5, corrupt=0.1, duplicate=1, reorder=25, limit=20).describe() == (
        "delay 0.5ms corrupt 0.1% duplicate 1% reorder 25% limit 20"
    )


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_check_direction_accepts(direction: str) -> None:
    assert check_direction(direction) == direction


@pytest.mark.parametrize("direction", ["IN", "", "inout", None, 1, "both "])
def test_check_direction_rejects(direction: Any) -> None:
    with pytest.raises(ImpairmentError, match=r"direction must be one of 'in', 'out', 'both', got "):
        check_direction(direction)


# ---------------------------------------------------------------------------------------------
# from_mapping


def test_from_mapping_aliases_and_canonical_names() -> None:
    want = Impairment(delay_ms=50, jitter_ms=5, loss=1, rate_kbit=1000, limit=50)
    assert Impairment.from_mapping({"delay": 50, "jitter": 5, "loss": 1, "rate": 1000, "limit": 50}, "x") == want
    assert Impairment.from_mapping(
        {"delay_ms": 50, "jitter_ms": 5, "loss": 1, "rate_kbit": 1000, "limit": 50}, "x"
    ) == want
    assert Impairment.from_mapping({}, "x") == Impairment()


@given(impairments())
def test_from_mapping_round_trips(imp: Impairment) -> None:
    assert Impairment.from_mapping(dataclasses.asdict(imp), "x") == imp


@pytest.mark.parametrize(
    "key, suggestion",
    [("dealy", "delay"), ("los", "loss"), ("rate_kbps", "rate_kbit"), ("jitter_msec", "jitter_ms"),
     ("corupt", "corrupt"), ("limt", "limit"), ("Duplicate", "duplicate"), ("reordering", "reorder")],
)
def test_unknown_key_names_where_key_and_closest_key(key: str, suggestion: str) -> None:
    with pytest.raises(ImpairmentError) as e:
        Impairment.from_mapping({"loss": 1, key: 5}, "nodes.a.eth1")
    assert str(e.value).startswith(f"nodes.a.eth1: unknown impairment key {key!r}; did you mean {suggestion!r}?")
    assert "valid keys: delay_ms, jitter_ms" in str(e.value)


@given(st.text(max_size=12).filter(lambda k: k not in VALID_KEYS))
def test_any_unknown_key_is_rejected_with_a_suggestion(key: str) -> None:
    with pytest.raises(ImpairmentError) as e:
        Impairment.from_mapping({key: 1}, "where")
    m = re.match(r"^where: unknown impairment key (.*); did you mean '(\w+)'\?", str(e.value))
    assert m is not None and m.group(1) == repr(key) and m.group(2) in VALID_KEYS


def test_from_mapping_other_errors() -> None:
    with pytest.raises(ImpairmentError, match=r"^w: 'delay_ms' and 'delay' both set delay_ms$"):
        Impairment.from_mapping({"delay_ms": 5, "delay": 5}, "w")
    with pytest.raises(ImpairmentError, match=r"^w: rate_kbit must be None or an integer .* got 7$"):
        Impairment.from_mapping({"rate": 7}, "w")
    with pytest.raises(ImpairmentError, match=r"^w: loss must be a percentage from 0 to 100, got '5%'$"):
        Impairment.from_mapping({"loss": "5%"}, "w")
    with pytest.raises(ImpairmentError, match=r"^w: an impairment must be a mapping, got list$"):
        Impairment.from_mapping([("loss", 5)], "w")  # type: ignore[arg-type]
    with pytest.raises(ImpairmentError, match=r"^w: unknown impairment key 3 \(valid keys"):
        Impairment.from_mapping({3: 5}, "w")  # type: ignore[dict-item]


# ---------------------------------------------------------------------------------------------
# Guest engine

FULL = Impairment(delay_ms=50, jitter_ms=5, loss=5, corrupt=1, duplicate=1, reorder=25, rate_kbit=1000)
NETEM = "limit 10000 delay 50ms 5ms loss 5% corrupt 1% duplicate 1% reorder 25% rate 1000kbit"
OUT = [f"tc qdisc replace dev eth1 root netem {NETEM}"]
IN = [
    "modprobe ifb numifbs=0 2>/dev/null || true",
    "ip link show dev ifb-eth1 >/dev/null 2>&1 || ip link add ifb-eth1 type ifb",
    "ip link set dev ifb-eth1 up",
    f"tc qdisc replace dev ifb-eth1 root netem {NETEM}",
    "tc qdisc replace dev eth1 handle ffff: ingress",
    "tc filter replace dev eth1 parent ffff: protocol all prio 1 handle 800::800 "
    "u32 match u32 0 0 action mirred egress redirect dev ifb-eth1",
]
DRAIN = (
    "n=0; while [ $n -lt 600 ] && tc -s qdisc show dev {} 2>/dev/null "
    "| grep -q 'backlog [1-9]'; do sleep 0.05; n=$((n+1)); done"
)
CLEAR_OUT = [
    "if tc qdisc show dev eth1 root | grep -q '^qdisc netem '; then tc qdisc change dev eth1 root netem "
    f"limit 1000000 corrupt 0% reorder 0% rate 0bit; {DRAIN.format('eth1')}; tc qdisc del dev eth1 root; fi"
]
CLEAR_IN = [
    "tc qdisc del dev eth1 ingress 2>/dev/null || true",
    DRAIN.format("ifb-eth1"),
    "ip link del ifb-eth1 2>/dev/null || true",
]


def test_guest_commands_exact() -> None:
    assert guest_tc_commands("eth1", FULL, "out", "ifb-eth1") == OUT
    assert guest_tc_commands("eth1", FULL, "in", "ifb-eth1") == IN
    assert guest_tc_commands("eth1", FULL, "both", "ifb-eth1") == OUT + IN
    assert guest_tc_commands("eth1", Impairment(delay_ms=20), "out", "ifb-eth1") == [
        "tc qdisc replace dev eth1 root netem limit 10000 delay 20ms corrupt 0% reorder 0% rate 0bit"
    ]
    assert guest_tc_commands("eth1", Impairment(loss=0.5, limit=100), "out", "ifb-eth1") == [
        "tc qdisc replace dev eth1 root netem limit 100 loss 0.5% corrupt 0% reorder 0% rate 0bit"
    ]


@pytest.mark.parametrize("imp", [None, Impairment(), Impairment(limit=3)])
def test_guest_commands_clear(imp: Impairment | None) -> None:
    assert guest_tc_commands("eth1", imp, "out", "ifb-eth1") == CLEAR_OUT
    assert guest_tc_commands("eth1", imp, "in", "ifb-eth1") == CLEAR_IN
    assert guest_tc_commands("eth1", imp, "both", "ifb-eth1") == CLEAR_OUT + CLEAR_IN


def test_guest_commands_use_the_planned_ifb_and_check_its_name() -> None:
    assert guest_tc_commands("eth1", Impairment(loss=1), "in", "ifb-x")[1].endswith("ifb-x type ifb")
    with pytest.raises(ImpairmentError, match="interface name must be 1 to 15 characters"):
        guest_tc_commands("eth1", FULL, "in", "ifb;reboot")


@pytest.mark.parametrize("ifname", ["", "a" * 16, "eth 1", "eth/1", "eth:1", "..", "$(reboot)", "a;b"])
def test_guest_rejects_bad_interface_names(ifname: str) -> None:
    with pytest.raises(ImpairmentError, match="interface name must be 1 to 15 characters"):
        guest_tc_commands(ifname, FULL, "out", "ifb-eth1")


def test_guest_rejects_bad_direction_and_type() -> None:
    with pytest.raises(ImpairmentError, match="direction must be one of"):
        guest_tc_commands("eth1", FULL, "up", "ifb-eth1")
    with pytest.raises(ImpairmentError, match="expected an Impairment or None, got dict"):
        guest_tc_commands("eth1", {"loss": 5}, "out", "ifb-eth1")  # type: ignore[arg-type]


_TIME = re.compile(r"(\d+(?:\.\d+)?)ms")
_PCT = re.compile(r"(\d+(?:\.\d+)?)%")


def parse_netem(args: list[str]) -> dict[str, float]:
    """A strict reader of the netem grammar we emit (a subset of tc-netem(8))."""
    out: dict[str, float] = {}
    seen: set[str] = set()
    words = iter(args)
    for word in words:
        assert word not in seen, f"{word} given twice"
        seen.add(word)
        if word == "limit":
            value = next(words)
            assert value.isdigit()
            out["limit"] = int(value)
        elif word == "delay":
            m = _TIME.fullmatch(next(words))
            assert m, args
            out["delay_ms"] = float(m.group(1))
        elif re.fullmatch(r"\d.*ms", word) and "delay_ms" in out and "jitter_ms" not in out:
            m = _TIME.fullmatch(word)
            assert m, args
            out["jitter_ms"] = float(m.group(1))
        elif word in PERCENT_FIELDS:
            m = _PCT.fullmatch(next(words))
            assert m, args
            if float(m.group(1)):  # written out as 0% when off, so a change resets it
                out[word] = float(m.group(1))
        elif word == "rate":
            value = next(words)
            m = re.fullmatch(r"(\d+)kbit", value)
            assert m or value == "0bit", args
            if m:
                out["rate_kbit"] = int(m.group(1))
        else:
            raise AssertionError(f"unexpected netem word {word!r} in {args}")
    return out


@given(impairments())
def test_every_netem_option_is_well_formed(imp: Impairment) -> None:
    args = netem_args(imp)
    parsed = parse_netem(args)
    want = {k: v for k, v in dataclasses.asdict(imp).items() if v and v is not None}
    assert parsed == want  # plain decimals (no exponent) that read back exactly
    assert {"corrupt", "reorder", "rate"} <= set(args)  # netem keeps these unless restated


# ---------------------------------------------------------------------------------------------
# Host engine: fixtures

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="host engine tests need root and iproute2 (scratch network namespaces, tc)",
)
TAP, PEER, IFB = "ntngtap0", "ntngpeer0", "ntngifb0"


@contextmanager
def scratch_netns() -> Iterator[str]:
    name = f"ntng-test-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def in_netns(ns: str, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", command],
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def netns() -> Iterator[str]:
    with scratch_netns() as name:
        yield name


@pytest.fixture
def ipr(netns: str) -> Iterator[Any]:
    """IPRoute inside the scratch namespace, with veth TAP<->PEER (both up) as the "tap"."""
    pytest.importorskip("pyroute2")
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        ipr = NamespacedIPRoute(fd)  # no fork: see its docstring
    finally:
        os.close(fd)
    try:
        ipr.link("add", ifname=TAP, kind="veth", peer=PEER)
        for name in (TAP, PEER):
            ipr.link("set", index=index(ipr, name), state="up")
        yield ipr
    finally:
        ipr.close()


def index(ipr: Any, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    assert found, f"{name} does not exist"
    return int(found[0])


def link_names(ipr: Any) -> set[str]:
    return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}


def qdiscs(ipr: Any, name: str) -> dict[str, Any]:
    """kind -> message, for the qdiscs of one device."""
    i = index(ipr, name)
    return {q.get_attr("TCA_KIND"): q for q in ipr.get_qdiscs(i) if q["index"] == i}


def redirects(ipr: Any, name: str) -> list[int]:
    """Target ifindexes of the mirred actions of the u32 filters under `name`'s ingress qdisc."""
    out = []
    for f in ipr.get_filters(index=index(ipr, name), parent=0xFFFF0000):
        opts = f.get_attr("TCA_OPTIONS")
        acts = opts.get_attr("TCA_U32_ACT") if opts is not None else None
        if acts is None:
            continue
        for _, act in acts["attrs"]:
            assert act.get_attr("TCA_ACT_KIND") == "mirred"
            parms = act.get_attr("TCA_ACT_OPTIONS").get_attr("TCA_MIRRED_PARMS")
            assert parms["eaction"] == 1  # egress redirect
            out.append(parms["ifindex"])
    return out


def kernel_config_has_netem() -> bool:
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            config = f.read()
    except OSError:
        pytest.skip("no /proc/config.gz to tell whether this kernel has sch_netem")
    m = re.search(r"^CONFIG_NET_SCH_NETEM=([ym])$", config, re.M)
    if m is None:
        return False
    return m.group(1) == "y" or Path(f"/lib/modules/{os.uname().release}").is_dir()


def require_netem(ipr: Any, wanted: bool) -> None:
    if host_netem_supported(ipr) != wanted:
        pytest.skip("this kernel has no sch_netem (CONFIG_NET_SCH_NETEM)" if wanted
                    else "this kernel has sch_netem, so netem can't be shown to be missing")


def send_frames(ns: str, ifname: str, count: int) -> None:
    """Inject raw Ethernet broadcast frames on `ifname` (they arrive on its veth peer)."""
    code = (
        "import socket\n"
        "s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n"
        f"s.bind(({ifname!r}, 0))\n"
        "frame = b'\\xff' * 6 + b'\\x02\\x00\\x00\\x00\\x00\\x01' + b'\\x88\\xb5' + b'x' * 46\n"
        f"for _ in range({count}):\n"
        "    s.send(frame)\n"
    )
    subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], check=True, timeout=30)


def ifb_packets(ipr: Any, name: str) -> int:
    stats = ipr.get_links(index(ipr, name))[0].get_attr("IFLA_STATS64")
    return int(stats["tx_packets"])


# ---------------------------------------------------------------------------------------------
# Host engine: pure parts


def test_host_netem_options_encode_as_the_kernel_expects() -> None:
    pytest.importorskip("pyroute2")
    from pyroute2.netlink.rtnl.tcmsg import tcmsg
    from pyroute2.netlink.rtnl.tcmsg.common import percent2u32, tick_in_usec

    msg = tcmsg()
    msg["index"], msg["parent"] = 7, 0xFFFFFFFF
    msg["attrs"] = [["TCA_KIND", "netem"], ["TCA_OPTIONS", host_netem_options(FULL)]]
    msg.encode()
    back = tcmsg(msg.data)
    back.decode()
    opts = back.get_attr("TCA_OPTIONS")
    assert opts["delay"] == int(50_000 * tick_in_usec) and opts["jitter"] == int(5_000 * tick_in_usec)
    assert (opts["limit"], opts["loss"], opts["duplicate"]) == (10_000, percent2u32(5), percent2u32(1))
    assert opts["gap"] == 1  # what tc sets for plain `reorder P%`
    assert opts.get_attr("TCA_NETEM_REORDER")["prob_reorder"] == percent2u32(25)
    assert opts.get_attr("TCA_NETEM_CORRUPT")["prob_corrupt"] == percent2u32(1)
    assert opts.get_attr("TCA_NETEM_RATE")["rate"] == 125_000  # bytes/s
    bare = host_netem_options(Impairment(loss=1))
    assert bare["delay"] == 0
    # zero but present: netem keeps whatever an omitted attribute had before the change
    assert sorted(name for name, _ in bare["attrs"]) == ["TCA_NETEM_CORRUPT", "TCA_NETEM_RATE", "TCA_NETEM_REORDER"]
    assert all(not any(fields.values()) for _, fields in bare["attrs"])


def test_host_rate_beyond_u32_is_a_setup_error() -> None:
    pytest.importorskip("pyroute2")
    assert host_netem_options(Impairment(rate_kbit=MAX_HOST_RATE_KBIT))["attrs"][0][1]["rate"] <= 2**32 - 1
    with pytest.raises(SetupError, match=r"rate 34359739kbit is above"):
        host_netem_options(Impairment(rate_kbit=MAX_HOST_RATE_KBIT + 1))


class _FailingIPRoute:
    """Answers every call with a netlink error, as a namespace without CAP_NET_ADMIN would."""

    def __getattr__(self, name: str) -> Any:
        from pyroute2.netlink.exceptions import NetlinkError

        def fail(*args: Any, **kwargs: Any) -> Any:
            raise NetlinkError(errno.EPERM, "Operation not permitted")

        return fail


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_netlink_errors_become_setup_errors_naming_the_tap(direction: str) -> None:
    pytest.importorskip("pyroute2")
    for imp in (FULL, None):
        with pytest.raises(SetupError) as e:
            apply_host(_FailingIPRoute(), "vm-a-tap1", imp, direction, "ifb-a1")
        assert str(e.value).startswith("tap vm-a-tap1: looking up ")
        assert str(e.value).endswith("failed: Operation not permitted (errno 1)")


def test_host_argument_checks() -> None:
    with pytest.raises(ImpairmentError, match="direction must be one of"):
        apply_host(None, "tap0", FULL, "sideways", "ifb0")
    with pytest.raises(SetupError, match="tap must be an interface name"):
        apply_host(None, "x" * 16, FULL, "in", "ifb0")
    with pytest.raises(SetupError, match="ifb_name must be an interface name"):
        redirect_ingress(None, "tap0", "")


# ---------------------------------------------------------------------------------------------
# Host engine: real kernel


@needs_root
def test_probe_agrees_with_kernel_config_and_leaves_nothing(ipr: Any) -> None:
    before = link_names(ipr)
    assert host_netem_supported(ipr) is kernel_config_has_netem()
    assert link_names(ipr) == before


@needs_root
def test_redirect_ingress_plumbing(ipr: Any, netns: str) -> None:
    redirect_ingress(ipr, TAP, IFB)
    redirect_ingress(ipr, TAP, IFB)  # idempotent: still one filter
    ifb = ipr.get_links(index(ipr, IFB))[0]
    assert ifb.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_KIND") == "ifb"
    assert ifb["flags"] & 1  # IFF_UP
    ingress = qdiscs(ipr, TAP)["ingress"]
    assert (ingress["handle"], ingress["parent"]) == (0xFFFF0000, 0xFFFFFFF1)
    assert redirects(ipr, TAP) == [index(ipr, IFB)]

    # Frames arriving on the tap really pass through the IFB.
    before = ifb_packets(ipr, IFB)
    send_frames(netns, PEER, 5)
    deadline = time.monotonic() + 5
    while ifb_packets(ipr, IFB) < before + 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ifb_packets(ipr, IFB) >= before + 5

    remove_redirect(ipr, TAP, IFB)
    assert "ingress" not in qdiscs(ipr, TAP)
    assert IFB not in link_names(ipr)
    remove_redirect(ipr, TAP, IFB)  # nothing left to remove: still fine


@needs_root
def test_redirect_ingress_replaces_a_stale_target(ipr: Any) -> None:
    redirect_ingress(ipr, TAP, "ntngifbA")
    redirect_ingress(ipr, TAP, "ntngifbB")
    assert redirects(ipr, TAP) == [index(ipr, "ntngifbB")]
    remove_redirect(ipr, TAP, "ntngifbA")  # takes the tap's ingress qdisc with it
    remove_redirect(ipr, TAP, "ntngifbB")
    assert {"ntngifbA", "ntngifbB"} & link_names(ipr) == set()


@needs_root
def test_redirect_refuses_a_non_ifb_device(ipr: Any) -> None:
    with pytest.raises(SetupError, match=f"^tap {TAP}: {PEER} exists but is not an ifb device$"):
        redirect_ingress(ipr, TAP, PEER)


@needs_root
def test_queued_packets_are_counted_and_drained_before_a_delete(ipr: Any, netns: str) -> None:
    # No netem here, so a slow tbf plays "a qdisc still holding packets" for the drain logic.
    r = in_netns(netns, f"ip addr add 10.9.0.1/24 dev {TAP} && ip addr add 10.9.0.2/24 dev {PEER} && "
                        f"ip neigh add 10.9.0.99 lladdr 02:00:00:00:00:99 dev {TAP} && "
                        f"tc qdisc replace dev {TAP} root tbf rate 8kbit burst 1600 limit 100000")
    assert r.returncode == 0, r.stderr
    tap = index(ipr, TAP)
    assert backlog_packets(ipr, TAP, tap) == 0
    # 6 datagrams of ~540 bytes against a 1000 B/s bucket: the tail waits in the queue
    send = "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); " \
           "[s.sendto(bytes(512), ('10.9.0.99', 9)) for _ in range(6)]"
    r = in_netns(netns, f"{sys.executable} -c \"{send}\"")
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 5
    while backlog_packets(ipr, TAP, tap) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert backlog_packets(ipr, TAP, tap) > 0
    start = time.monotonic()
    wait_drained(ipr, TAP, tap, timeout=20)
    assert backlog_packets(ipr, TAP, tap) == 0 and time.monotonic() - start > 0.1
    wait_drained(ipr, TAP, tap, timeout=20)  # an empty queue returns at once


@needs_root
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_clearing_is_idempotent_and_missing_taps_are_reported(ipr: Any, direction: str) -> None:
    before = (link_names(ipr), set(qdiscs(ipr, TAP)))
    for imp in (None, Impairment(), None):
        apply_host(ipr, TAP, imp, direction, IFB)
    apply_host(ipr, "ntnggone0", None, direction, IFB)  # a vanished tap has nothing to clear
    assert (link_names(ipr), set(qdiscs(ipr, TAP))) == before
    with pytest.raises(SetupError, match=r"^tap ntnggone0: no such network interface"):
        apply_host(ipr, "ntnggone0", FULL, direction, IFB)
    assert IFB not in link_names(ipr)


@needs_root
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_apply_without_netem_is_a_setup_error_and_changes_nothing(ipr: Any, direction: str) -> None:
    require_netem(ipr, False)
    before = (link_names(ipr), set(qdiscs(ipr, TAP)))
    with pytest.raises(SetupError) as e:
        apply_host(ipr, TAP, FULL, direction, IFB)
    assert str(e.value).startswith(f"tap {TAP}: setting netem on ")
    assert "no netem qdisc (CONFIG_NET_SCH_NETEM)" in str(e.value)
    assert (link_names(ipr), set(qdiscs(ipr, TAP))) == before


@needs_root
def test_apply_netem_both_directions(ipr: Any) -> None:
    require_netem(ipr, True)
    from pyroute2.netlink.rtnl.tcmsg.common import percent2u32, tick_in_usec

    apply_host(ipr, TAP, FULL, "both", IFB)
    for dev in (TAP, IFB):
        netem = qdiscs(ipr, dev)["netem"]
        assert netem["parent"] == 0xFFFFFFFF
        opts = netem.get_attr("TCA_OPTIONS")
        assert math.isclose(opts["delay"], 50_000 * tick_in_usec, abs_tol=1)
        assert math.isclose(opts["jitter"], 5_000 * tick_in_usec, abs_tol=1)
        assert (opts["limit"], opts["loss"]) == (10_000, percent2u32(5))
        assert opts.get_attr("TCA_NETEM_RATE")["rate"] == 125_000
    assert redirects(ipr, TAP) == [index(ipr, IFB)]

    handle = qdiscs(ipr, TAP)["netem"]["handle"]
    apply_host(ipr, TAP, Impairment(delay_ms=10), "both", IFB)  # changed in place
    changed = qdiscs(ipr, TAP)["netem"]
    assert changed["handle"] == handle
    assert math.isclose(changed.get_attr("TCA_OPTIONS")["delay"], 10_000 * tick_in_usec, abs_tol=1)

    apply_host(ipr, TAP, None, "both", IFB)
    assert "netem" not in qdiscs(ipr, TAP) and "ingress" not in qdiscs(ipr, TAP)
    assert IFB not in link_names(ipr)


# ---------------------------------------------------------------------------------------------
# Guest commands against the real tc and kernel (no VM: a scratch namespace plays the guest)


@pytest.fixture(scope="module")
def guest_ns() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("tc") is None:
        pytest.skip("running the guest's tc commands here needs root and iproute2's tc")
    with scratch_netns() as ns:
        r = in_netns(ns, "ip link add eth1 type veth peer name eth1p && ip link set eth1 up")
        assert r.returncode == 0, r.stderr
        yield ns


def run_guest(ns: str, command: str) -> None:
    """Run one generated command; netem may only fail for lack of kernel support."""
    r = in_netns(ns, command)
    if r.returncode != 0 and " netem " in command and "Specified qdisc kind is unknown" in r.stderr:
        return  # tc parsed every option; only the kernel lacks sch_netem
    assert r.returncode == 0, f"{command}: {r.stderr}"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(imp=impairments())
def test_real_tc_accepts_every_netem_option(guest_ns: str, imp: Impairment) -> None:
    run_guest(guest_ns, guest_tc_commands("eth1", imp, "out", "ifb-eth1")[0] if not imp.is_noop else "true")


def test_guest_commands_work_on_a_real_kernel(guest_ns: str) -> None:
    for _ in range(2):  # idempotent: the second round replaces in place
        for command in guest_tc_commands("eth1", FULL, "both", "ifb-eth1"):
            run_guest(guest_ns, command)
    shown = in_netns(guest_ns, "tc filter show dev eth1 ingress").stdout
    assert shown.count("mirred (Egress Redirect to device ifb-eth1)") == 1
    assert ",UP" in in_netns(guest_ns, "ip -br link show dev ifb-eth1").stdout
    for command in guest_tc_commands("eth1", None, "both", "ifb-eth1") * 2:
        run_guest(guest_ns, command)
    assert "ingress" not in in_netns(guest_ns, "tc qdisc show dev eth1").stdout
    assert in_netns(guest_ns, "ip link show dev ifb-eth1").returncode != 0
