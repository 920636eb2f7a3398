# One node called `machine` (no `#:` lines needed). Run: ntng run examples/hello.py
machine.start()
machine.wait_for_unit("multi-user.target")
print(machine.succeed("uname -a"))
machine.succeed("echo hello > /tmp/greeting")
assert machine.succeed("cat /tmp/greeting").strip() == "hello"
machine.fail("false")
status, out = machine.execute("exit 3")
assert status == 3, status
