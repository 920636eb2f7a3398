"""Two Debian guests on a bridge in the runner's network namespace: addresses and names from the
network plan, link counters, forward_port, block/unblock, impairment; and the rootless
fallback (VDE) when the runner lacks CAP_NET_ADMIN."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import make_driver
from ntng import errors
from ntng.driver import Driver
from ntng.errors import MissingCapability
from ntng.machine import Machine
from ntng.netem import ImpairmentError

pytestmark = pytest.mark.e2e

HEADER = ("#: nodes.a = { vlans = [ 1 ]; };\n"
          "#: nodes.b = { vlans = [ 1 2 ]; impairments = [ { vlan = 2; delay = 40; direction = \"out\"; } ]; };\n")


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory, guest_image: object) -> Iterator[Driver]:
    with make_driver(tmp_path_factory.mktemp("net"), HEADER) as driver:
        driver.start_all()
        yield driver


def machines(d: Driver) -> tuple[Machine, Machine]:
    by = {m.name: m for m in d.machines}
    return by["a"], by["b"]


def rtt_ms(m: Machine, target: str, n: int = 5) -> float:
    out = m.succeed(f"ping -c {n} -i 0.2 -W 5 -q {target}")
    return float(out.strip().splitlines()[-1].split("=")[1].split("/")[1])  # avg of min/avg/max


def test_nodes_reach_each_other_by_name_on_planned_addresses(net: Driver) -> None:
    a, b = machines(net)
    assert "192.168.1.1/24" in a.succeed("ip -br addr show dev eth0")
    addrs = b.succeed("ip -br addr")
    assert "192.168.1.2/24" in addrs and "192.168.2.2/24" in addrs and "2001:db8:2::2/64" in addrs
    # eth<i> is matched to the NIC by MAC, in the order of the node's vlans.
    assert b.succeed("cat /sys/class/net/eth1/address").strip() == net.network.interface("b", 2)["mac"]
    a.succeed("ping -c 2 -W 5 b", "ping -6 -c 2 -W 5 b", "getent ahostsv4 b | grep -q 192.168.1.2")
    b.succeed("ping -c 1 -W 5 a")
    # a is not on vlan 2: nothing there answers for it.
    b.fail("ping -c 1 -W 2 -I eth1 192.168.2.1")


def test_declared_impairment_is_in_place_from_the_start(net: Driver) -> None:
    _, b = machines(net)
    assert "netem" in b.succeed("tc qdisc show dev eth1") and "delay 40ms" in b.succeed("tc qdisc show dev eth1")
    assert "netem" not in b.succeed("tc qdisc show dev eth0")


def test_counters_count_what_crossed_the_link(net: Driver) -> None:
    a, b = machines(net)
    b.succeed("nc -lk -p 5000 >/dev/null 2>&1 </dev/null &")
    b.wait_for_open_port(5000)
    before_a, before_b = a.link_counters(), b.link_counters(vlan=1)
    b2 = b.link_counters(vlan=2)
    a.succeed("head -c 4000000 /dev/urandom | nc -N b 5000")
    sent = a.link_counters() - before_a
    got = b.link_counters(vlan=1) - before_b
    assert 4_000_000 <= sent.tx_bytes < 4_400_000, sent
    assert 4_000_000 <= got.rx_bytes < 4_400_000, got
    # Acks came back; packets are segmentation-offloaded (up to 64 kB each through the tap).
    assert 0 < sent.rx_bytes < 400_000 and 60 < sent.tx_packets < 4000
    assert (b.link_counters(vlan=2) - b2).total_bytes < 20_000  # the other vlan saw none of it


def test_forward_port_reaches_a_guest_service(net: Driver) -> None:
    _, b = machines(net)
    b.succeed("mkdir -p /srv/www && echo hello-from-b > /srv/www/index.html",
              "python3 -m http.server 8000 -d /srv/www >/dev/null 2>&1 </dev/null &")
    b.wait_for_open_port(8000)
    b.forward_port(18123, 8000)
    body = urllib.request.urlopen("http://127.0.0.1:18123/index.html", timeout=30).read()
    assert body == b"hello-from-b\n"


def test_the_same_command_on_both_machines_at_once(net: Driver) -> None:
    results = net.parallel("sleep 2; hostname")
    assert {name: r.output.strip() for name, r in results.items()} == {"a": "a", "b": "b"}
    assert all(r.status == 0 and r.duration >= 2 for r in results.values())


def test_block_and_unblock(net: Driver) -> None:
    a, _ = machines(net)
    a.block()
    a.fail("ping -c 1 -W 2 b")
    a.unblock()
    a.wait_until_succeeds("ping -c 1 -W 2 b", timeout=60)


def test_impairment_changes_and_clears_while_traffic_flows(net: Driver) -> None:
    a, b = machines(net)
    base = rtt_ms(a, "b")
    a.impair(delay=150, rate=100_000, corrupt=0.001)  # both directions: +300 ms round trip
    both = rtt_ms(a, "b")
    a.impair(delay=150, direction="in")  # only towards a now
    inbound = rtt_ms(a, "b")
    # netem keeps settings a change leaves out: the rate and corruption must be gone now
    qdiscs = a.succeed("tc qdisc show dev eth0; tc qdisc show dev ifb-eth0")
    assert "delay 150ms" in qdiscs and "rate" not in qdiscs and "corrupt" not in qdiscs, qdiscs
    a.impair(loss=100)
    a.fail("ping -c 2 -W 1 b")
    a.clear_impairment()
    after = rtt_ms(a, "b")
    assert both > base + 250, (base, both)
    assert base + 100 < inbound < both - 100, (base, inbound, both)
    assert after < base + 100, (base, after)
    # Changed twice while a ping runs: its replies show all three regimes, none lost.  Each
    # step waits for what the ping shows, not for a fixed time: a loaded host is slow.
    def replies() -> int:
        return int(a.succeed("grep -c time= /tmp/ping.log || true"))

    a.succeed("ping -i 0.2 -W 5 b > /tmp/ping.log 2>&1 </dev/null &")
    a.wait_until_succeeds("test $(grep -c time= /tmp/ping.log) -ge 5", timeout=60)
    a.impair(delay=200, direction="in")
    a.wait_until_succeeds("grep -qE 'time=2[0-9]{2}' /tmp/ping.log", timeout=60)
    a.clear_impairment()
    after_clear = replies()
    a.wait_until_succeeds(f"test $(grep -c time= /tmp/ping.log) -ge {after_clear + 5}", timeout=60)
    a.succeed("pkill -INT -x ping; sleep 1")
    log = a.succeed("cat /tmp/ping.log")
    by_seq = {int(line.split("icmp_seq=")[1].split()[0]): float(line.split("time=")[1].split()[0])
              for line in log.splitlines() if "time=" in line}
    assert sorted(by_seq) == list(range(1, max(by_seq) + 1)), f"replies lost: {log}"
    rtts = [by_seq[k] for k in sorted(by_seq)]
    slow = [r for r in rtts if r > base + 150]
    assert slow and rtts.index(slow[0]) > 0 and rtts[-1] < base + 100, rtts
    # Corruption, duplication, reordering and a rate limit go through too; a rate limit shows.
    a.impair(rate=800, corrupt=0.1, duplicate=0.1, reorder=1, delay=1, direction="out")
    b.succeed("nc -lk -p 5001 >/dev/null 2>&1 </dev/null &")
    b.wait_for_open_port(5001)
    t0 = time.monotonic()
    a.succeed("head -c 300000 /dev/zero | nc -N b 5001")
    took = time.monotonic() - t0
    a.clear_impairment()
    assert took > 2.5, f"300 kB at 800 kbit/s took only {took:.1f}s"


def test_bad_network_calls_say_what_is_wrong(net: Driver) -> None:
    a, _ = machines(net)
    with pytest.raises(ImpairmentError, match=r"a.impair: loss must be a percentage from 0 to 100, got 150"):
        a.impair(loss=150)
    with pytest.raises(ImpairmentError, match=r"did you mean 'delay'"):
        a.impair(dealy=5)
    with pytest.raises(errors.TestScriptError, match=r"a: is not on vlan 7 \(its vlans: 1\)"):
        a.link_counters(vlan=7)
    with pytest.raises(ImpairmentError, match="direction"):
        a.impair(delay=5, direction="sideways")


def test_declared_impairments_come_back_after_a_reboot(net: Driver) -> None:
    _, b = machines(net)
    b.reboot()  # the guest engine's tc settings die with the boot; the runner puts them back
    assert "delay 40ms" in b.succeed("tc qdisc show dev eth1")


def test_rootless_fallback_without_cap_net_admin(tmp_path: Path, guest_image: object) -> None:
    """As root but without CAP_NET_ADMIN the runner falls back to vde_switch: names and pings
    work, impairment runs in the guests, and counters and forward_port say what is missing."""
    if shutil.which("setpriv") is None or shutil.which("vde_switch") is None:
        pytest.fail("setpriv (util-linux) and vde_switch (vde2) are part of the setup")
    script = tmp_path / "rootless.py"
    script.write_text(HEADER + """
from ntng.errors import MissingCapability
start_all()
a.succeed("ping -c 2 -W 5 b")
b.succeed("ping -c 1 -W 5 a")
a.impair(loss=100)
a.fail("ping -c 1 -W 2 b")
a.clear_impairment()
a.succeed("ping -c 1 -W 5 b")
for call in (lambda: a.link_counters(), lambda: b.forward_port(18124, 22)):
    try:
        call()
    except MissingCapability as e:
        print("MISSING:", e)
    else:
        raise AssertionError("no MissingCapability")
""")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    r = subprocess.run(
        ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin",
         sys.executable, "-m", "ntng.cli", "run", str(script)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "no CAP_NET_ADMIN: rootless VDE networking" in out
    assert "MISSING: a: link counters need TAP networking (CAP_NET_ADMIN); this run uses vde networking" in out
    assert "MISSING: b: forward_port needs TAP networking (CAP_NET_ADMIN)" in out
    # The switches died with the run.
    assert subprocess.run(["pgrep", "-f", f"vde_switch --sock {tmp_path}"], capture_output=True).returncode == 1


def test_capability_missing_is_a_script_error() -> None:
    assert issubclass(MissingCapability, errors.TestScriptError)
