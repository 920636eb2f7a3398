#: nodes.machine = { memory = 512; };
machine.start()
machine.succeed("useradd -m alice")
assert machine.succeed("su alice -c whoami").strip() == "alice"
