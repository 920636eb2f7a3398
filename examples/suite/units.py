#: nodes.machine = { memory = 512; };
machine.start()
machine.wait_for_unit("multi-user.target")
assert machine.get_unit_info("multi-user.target")["ActiveState"] == "active"
