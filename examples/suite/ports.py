#: nodes.machine = { memory = 512; };
machine.start()
machine.succeed("python3 -m http.server 8000 --directory /etc >/dev/null 2>&1 &")
machine.wait_for_open_port(8000)
machine.succeed("python3 -c 'import urllib.request as u; u.urlopen(\"http://127.0.0.1:8000/hostname\")'")
