# Two Debian VMs on one vlan, driven through the binary backdoor, NixOS-driver style.
#: nodes.server = { memory = 768; vlans = [ 1 ]; };
#: nodes.client = { memory = 768; vlans = [ 1 ]; };
import shlex

start_all()
with subtest("both nodes answer and know their names"):
    assert server.succeed("hostname").strip() == "server"
    assert client.succeed("hostname").strip() == "client"
with subtest("sshd comes up on the server"):
    server.wait_for_unit("ssh.service")
    server.wait_for_open_port(22)
with subtest("the client logs in to the server by name, with a fresh key"):
    client.succeed("ssh-keygen -q -t ed25519 -N '' -f /root/.ssh/id_ed25519")
    key = client.succeed("cat /root/.ssh/id_ed25519.pub").strip()
    server.succeed(f"install -d -m 700 /root/.ssh && echo {shlex.quote(key)} >> /root/.ssh/authorized_keys")
    host_key = " ".join(server.succeed("cat /etc/ssh/ssh_host_ed25519_key.pub").split()[:2])
    client.succeed(f"echo {shlex.quote('server ' + host_key)} >> /root/.ssh/known_hosts")
    assert client.succeed("ssh -o BatchMode=yes server hostname").strip() == "server"
with subtest("5 MB travel server -> client over the network, checksum intact, counted on the link"):
    server.succeed("head -c 5000000 /dev/urandom > /root/blob")
    before = client.link_counters()
    client.succeed("scp -q -o BatchMode=yes server:/root/blob /root/blob")
    assert (client.link_counters() - before).rx_bytes > 5_000_000
    assert server.succeed("sha256sum < /root/blob") == client.succeed("sha256sum < /root/blob")
with subtest("and server -> host -> client through the backdoor"):
    server.copy_from_machine("/root/blob")
    client.copy_from_host(str(driver.out_dir / "blob"), "/root/blob2")
    assert server.succeed("sha256sum < /root/blob") == client.succeed("sha256sum < /root/blob2")
