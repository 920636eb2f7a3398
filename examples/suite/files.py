#: nodes.machine = { memory = 512; };
machine.start()
machine.succeed("echo hello > /tmp/greeting")
assert machine.succeed("cat /tmp/greeting").strip() == "hello"
machine.wait_for_file("/tmp/greeting")
