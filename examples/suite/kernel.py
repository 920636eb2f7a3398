# Suite example: one small VM. Run the whole folder: ntng test examples/suite
#: nodes.machine = { memory = 512; };
machine.start()
assert machine.succeed("uname -s").strip() == "Linux"
assert machine.succeed("nproc").strip() == "1"
