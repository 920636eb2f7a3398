#: nodes.machine = { memory = 512; };
machine.start()
machine.fail("false")
status, _ = machine.execute("exit 3")
assert status == 3, status
