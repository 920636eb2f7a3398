# Two Debian VMs driven through the binary backdoor, NixOS-driver style.
#: nodes.server = { memory = 768; };
#: nodes.client = { memory = 768; };
start_all()
with subtest("both nodes answer and know their names"):
    assert server.succeed("hostname").strip() == "server"
    assert client.succeed("hostname").strip() == "client"
with subtest("sshd comes up on the server"):
    server.wait_for_unit("ssh.service")
    server.wait_for_open_port(22)
with subtest("a file travels server -> host -> client, checksum intact"):
    server.succeed("head -c 5000000 /dev/urandom > /root/blob")
    server.copy_from_machine("/root/blob")
    client.copy_from_host(str(driver.out_dir / "blob"), "/root/blob")
    assert server.succeed("sha256sum < /root/blob") == client.succeed("sha256sum < /root/blob")
