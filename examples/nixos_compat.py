# A test in the NixOS driver's style, using its API broadly; it runs unchanged here.
#: nodes.server = { vlans = [ 1 ]; memory = 768; };
#: nodes.client = { vlans = [ 1 ]; memory = 768; };
import json

start_all()

with subtest("units, ports and files"):
    server.wait_for_unit("multi-user.target")
    server.wait_for_unit("ssh.service")
    server.wait_for_open_port(22)
    server.wait_for_closed_port(8000, timeout=10)
    server.require_unit_state("ssh.service", "active")
    assert server.get_unit_info("ssh.service")["ActiveState"] == "active"
    assert server.get_unit_property("ssh.service", "SubState") == "running"
    server.succeed("touch /tmp/ready")
    server.wait_for_file("/tmp/ready")

with subtest("execute, succeed, fail"):
    status, out = client.execute("echo hi; exit 3")
    assert (status, out) == (3, "hi\n")
    assert client.succeed("echo a", "echo b") == "a\nb\n"
    client.fail("false")
    client.wait_until_fails("test -e /tmp/absent", timeout=30)
    client.succeed("(sleep 3; touch /tmp/later) >/dev/null 2>&1 &")
    client.wait_until_succeeds("test -e /tmp/later", timeout=60)

with subtest("services started and stopped by the test"):
    server.succeed("systemd-run --unit=web.service python3 -m http.server 8000 -d /etc")
    server.wait_for_open_port(8000)
    assert "hostname" in client.succeed("curl -sf http://server:8000/ || python3 -c "
                                        "\"import urllib.request;print(urllib.request.urlopen('http://server:8000/').read().decode())\"")
    server.stop_job("web.service")
    server.wait_for_closed_port(8000)
    status, _ = server.systemctl("is-active web.service")
    assert status != 0

with subtest("files between host and machines"):
    server.succeed("mkdir -p /srv/data && echo '{\"answer\": 42}' > /srv/data/x.json")
    server.copy_from_machine("/srv/data")
    data = json.loads((driver.out_dir / "data" / "x.json").read_text())
    assert data == {"answer": 42}
    client.copy_from_host(str(driver.out_dir / "data"), "/root/data")
    assert client.succeed("cat /root/data/x.json") == server.succeed("cat /srv/data/x.json")

with subtest("retry and polling_condition"):
    calls = []

    def third_time(last_try):
        calls.append(last_try)
        return len(calls) >= 3

    retry(third_time, timeout_seconds=30)

    @polling_condition
    def server_is_up():
        server.succeed("true")

    with server_is_up:
        client.succeed("ping -c 1 server")

with subtest("the network: block, unblock"):
    client.block()
    client.fail("ping -c 1 -W 2 server")
    client.unblock()
    client.wait_until_succeeds("ping -c 1 -W 2 server", timeout=60)

with subtest("console and crash/restart"):
    server.succeed("echo ntng-compat-marker > /dev/ttyS0")
    server.wait_for_console_text("ntng-compat-marker", timeout=60)
    assert "ntng-compat-marker" in server.get_console_log()
    client.crash()
    client.start()
    client.wait_for_unit("multi-user.target")

with subtest("shutdown"):
    server.shutdown()
    client.shutdown()
join_all()
