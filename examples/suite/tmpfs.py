#: nodes.machine = { memory = 512; };
machine.start()
machine.succeed("mkdir -p /mnt/t && mount -t tmpfs -o size=16M tmpfs /mnt/t")
machine.succeed("head -c 1M /dev/zero > /mnt/t/zeros")
assert "tmpfs" in machine.succeed("findmnt -n -o FSTYPE /mnt/t")
