# File sync across three Debian guests with rsync over ssh: fresh keys per node, host keys
# checked, thousands of small files and a 1 GiB file, a jump host, a lossy link, and link
# counters proving that a 1 MiB change moves only a few MiB.  Run: ntng run examples/file_sync.py
#: nodes.a = { vlans = [ 1 ]; memory = 1024; };
#: nodes.b = { vlans = [ 1 ]; memory = 1024; };
#: nodes.c = { vlans = [ 1 ]; memory = 768; };
#: globalTimeout = 1800;
import os
import shlex
from concurrent.futures import ThreadPoolExecutor

MiB = 1024 * 1024
SSH = "ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -o ConnectTimeout=20"
RSYNC = f"rsync -a --delete -e {shlex.quote(SSH)}"
# The big file: 1 GiB of random data (default; the copy takes minutes under TCG, ssh moves
# ~5 MB/s there), or NTNG_SYNC_BIG=sparse: 1 GiB with 32 MiB of random data in 8 places and
# holes between, synced with compression (the e2e test's choice, to keep CI short).
SPARSE = os.environ.get("NTNG_SYNC_BIG", "random") == "sparse"
BIG_FLAGS = "-z --sparse" if SPARSE else ""


def same_on_a_and_b(command):
    """Run `command` on a and b at once (hashing 1 GiB takes a while under TCG); equal output?"""
    with ThreadPoolExecutor(2) as pool:
        on_a, on_b = pool.map(lambda m: m.succeed(command, timeout=900), (a, b))
    return on_a == on_b

start_all()

with subtest("every node has its own host key and a fresh key pair"):
    host_keys = {}
    for m in machines:
        m.wait_for_unit("ssh.service")
        m.succeed("ssh-keygen -q -t ed25519 -N '' -f /root/.ssh/id_ed25519")
        host_keys[m.name] = m.succeed("cat /etc/ssh/ssh_host_ed25519_key.pub").split()[:2]
    assert len({k[1] for k in host_keys.values()}) == 3, "nodes share a host key"


def trust(client, server):
    """client may log in to server as root; client knows server's host key (by name and address)."""
    pub = client.succeed("cat /root/.ssh/id_ed25519.pub").strip()
    server.succeed(f"install -d -m 700 /root/.ssh && echo {shlex.quote(pub)} >> /root/.ssh/authorized_keys")
    addr = server.succeed("getent ahostsv4 $(hostname) | head -1 | cut -d' ' -f1").strip()
    line = f"{server.name},{addr} {' '.join(host_keys[server.name])}"
    client.succeed(f"echo {shlex.quote(line)} >> /root/.ssh/known_hosts")


with subtest("a logs in to b and c with its key; hosts are verified"):
    trust(a, b)
    trust(a, c)
    trust(c, b)
    assert a.succeed(f"{SSH} b hostname").strip() == "b"
    assert a.succeed(f"{SSH} c hostname").strip() == "c"

with subtest("a wrong key is refused"):
    a.succeed("ssh-keygen -q -t ed25519 -N '' -f /root/wrong_key")
    out = a.fail(f"{SSH} -i /root/wrong_key -o IdentitiesOnly=yes b true 2>&1")
    assert "Permission denied (publickey" in out, out

with subtest("thousands of small files and a 1 GiB file reach b, checksums equal"):
    a.succeed(
        "python3 - <<'EOF'\n"
        "import os, random\n"
        "random.seed(7)\n"
        "for d in range(30):\n"
        "    os.makedirs(f'/data/small/d{d}', exist_ok=True)\n"
        "    for f in range(100):\n"
        "        with open(f'/data/small/d{d}/f{f}', 'wb') as fh:\n"
        "            fh.write(os.urandom(random.randrange(0, 4096)))\n"
        "EOF",
    )
    if SPARSE:
        a.succeed("truncate -s 1G /data/big",
                  "for off in 0 130 260 390 520 650 780 1000; do"
                  " head -c 4M /dev/urandom | dd of=/data/big bs=1M seek=$off conv=notrunc status=none; done")
    else:
        a.succeed("head -c 1G /dev/urandom > /data/big")
    assert a.succeed("find /data/small -type f | wc -l").strip() == "3000"
    first = a.link_counters()
    a.succeed(f"{RSYNC} {BIG_FLAGS} /data/ b:/data/", timeout=1500)
    moved = (a.link_counters() - first).tx_bytes
    assert moved > (32 if SPARSE else 1024) * MiB, f"the first sync sent only {moved / MiB:.0f} MiB"
    # A dry run with full checksums finds nothing left to do, and sha256 agrees.
    assert a.succeed(f"{RSYNC} -n --checksum --itemize-changes /data/ b:/data/").strip() == ""
    assert same_on_a_and_b("cd /data && find . -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum")

with subtest("after changing 1 MiB of the big file, a second sync moves only a few MiB"):
    a.succeed("head -c 1M /dev/urandom | dd of=/data/big bs=1M seek=500 conv=notrunc status=none")
    before = a.link_counters()
    a.succeed(f"{RSYNC} {BIG_FLAGS} --no-whole-file /data/ b:/data/", timeout=900)
    delta = a.link_counters() - before
    print(f"delta sync: a sent {delta.tx_bytes / MiB:.2f} MiB, received {delta.rx_bytes / MiB:.2f} MiB")
    assert delta.tx_bytes < 8 * MiB, f"the delta sync sent {delta.tx_bytes / MiB:.1f} MiB"
    assert same_on_a_and_b("sha256sum < /data/big")

with subtest("through a jump host: a -> c -> b, while a cannot reach b directly"):
    a.succeed("ip route add prohibit 192.168.1.2/32", "ip -6 route add prohibit 2001:db8:1::2/128")
    a.fail(f"{SSH} b true")
    a.succeed("mkdir -p /data/via && head -c 2M /dev/urandom > /data/via/blob")
    via_c = c.link_counters()
    a.succeed(f"rsync -a -e {shlex.quote(SSH + ' -J c')} /data/via/ b:/data/via/")
    assert (c.link_counters() - via_c).rx_bytes > 2 * MiB, "the data did not pass c"
    assert a.succeed("sha256sum < /data/via/blob") == b.succeed("sha256sum < /data/via/blob")
    a.succeed("ip route del prohibit 192.168.1.2/32", "ip -6 route del prohibit 2001:db8:1::2/128")

with subtest("with 5% loss and 50 ms delay on a's link the sync still completes"):
    a.succeed("mkdir -p /data/lossy && for i in $(seq 200); do head -c 3000 /dev/urandom > /data/lossy/f$i; done")
    a.impair(delay=50, loss=5)
    rtt = a.succeed("ping -c 3 -i 0.3 -q b || true")
    a.succeed(f"{RSYNC} /data/lossy/ b:/data/lossy/", timeout=600)
    a.clear_impairment()
    assert a.succeed(f"{RSYNC} -n --checksum --itemize-changes /data/lossy/ b:/data/lossy/").strip() == ""
    print("ping under impairment:", rtt.strip().splitlines()[-2:])

with subtest("a changed host key on b is refused"):
    b.succeed("rm /etc/ssh/ssh_host_ed25519_key* && ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key",
              "systemctl restart ssh")
    b.wait_for_open_port(22)
    out = a.fail(f"{SSH} b true 2>&1")
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in out, out
