#: nodes.machine = { memory = 512; };
machine.start()
r = machine.run("echo out; echo err >&2")
assert (r.stdout.strip(), r.stderr.strip()) == (b"out", b"err"), r
