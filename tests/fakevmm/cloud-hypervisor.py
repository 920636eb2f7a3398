"""A fake Cloud Hypervisor for the unit tests: the real command line, the real REST API
(/api/v1/...) on the unix socket, the real agent behind the virtio-console's pty or hybrid
vsock; no VM.

Every request is checked against $NTNG_SPECS/cloud-hypervisor.yaml, made strict
(vmmspec.py): a bad body gets 400, as Cloud Hypervisor answers one it cannot deserialize.  The
state machine and status codes are the spec's: vm.boot after vm.create (else 404), pause only
when running and resume only when paused (else 405), vm.snapshot when paused, vm.restore only
without a VM (else 404).  Failures the spec gives no code for get 500, as Cloud Hypervisor's
HTTP layer answers its API errors; error bodies are plain text, as it sends them.
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import sys
import termios
import threading
import tty
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fakeguest import Answer, ApiServer, Guest, HybridVsock, die, load_spec, parse_json  # noqa: E402
from vmmspec import describe  # noqa: E402

VERSION = "v48.0-fake"
SPEC = load_spec("cloud-hypervisor")


def error(status: int, message: str) -> Answer:
    return status, f"Error from API: {message}"


class CloudHypervisor:
    def __init__(self) -> None:
        self.config: dict[str, Any] | None = None
        self.state: str | None = None  # None: no VM; else VmState (Created, Running, Paused, Shutdown)
        self.serial: Any = None  # the serial console's file
        self.pty: tuple[int, int] | None = None  # (main, sub) of the virtio-console
        self.vsock: HybridVsock | None = None
        self.guest = Guest(self.console)

    def console(self, line: str) -> None:
        if self.serial is not None:
            self.serial.write(line + "\r\n")
            self.serial.flush()

    # -- dispatch ---------------------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, raw: bytes | None) -> Answer:
        path = urlsplit(raw_path).path
        found = SPEC.find(path, method)
        if found is None:
            return 404, f"no endpoint {method} {path}"
        template = found[0]
        has_body, body, err = parse_json(raw)
        errors = [err] if err else SPEC.body_errors(method, path, body, has_body)
        if errors:
            return error(400, f"The request body is not valid for {method} {template}: " + "; ".join(errors))
        handler = getattr(self, f"{method.lower()}_{template.strip('/').replace('.', '_').replace('-', '_')}", None)
        if handler is None:
            return error(500, f"fake cloud-hypervisor: {method} {template} is not implemented")
        answer: Answer = handler(body)
        return answer

    def _need(self, *states: str) -> Answer | None:
        """404 without a VM, 405 when it is in none of `states` (the spec's codes)."""
        if self.state is None:
            return error(404, "VM is not created")
        if self.state not in states:
            return error(405, f"VM is {self.state}, not {' or '.join(states)}")
        return None

    # -- VMM ----------------------------------------------------------------------------------

    def get_vmm_ping(self, _body: None) -> Answer:
        return 200, {"build_version": VERSION, "version": VERSION, "pid": os.getpid(), "features": []}

    def put_vmm_shutdown(self, _body: None) -> Answer:
        threading.Timer(0.1, lambda: os._exit(0)).start()
        return 204, None

    # -- VM lifecycle -------------------------------------------------------------------------

    def get_vm_info(self, _body: None) -> Answer:
        if self.config is None:
            return error(404, "VM is not created")
        return 200, {"config": self.config, "state": self.state}

    def put_vm_create(self, body: dict[str, Any]) -> Answer:
        if self.state is not None:
            return error(500, "The VM could not be created: VM is already created")
        return self._create(body) or (204, None)

    def _create(self, config: dict[str, Any]) -> Answer | None:
        """The devices the host sees before boot: the serial file, the console's pty."""
        config = json.loads(json.dumps(config))
        serial = config.get("serial", {"mode": "Null"})
        if serial["mode"] == "File":
            try:
                self.serial = open(serial["file"], "w")
            except OSError as e:
                return error(500, f"The VM could not be created: cannot open the serial file: {e}")
        console = config.get("console", {"mode": "Tty"})
        if console["mode"] == "Socket":
            return error(500, "The VM could not be created: No socket option support for console device")
        if console["mode"] == "Pty":
            main, sub = pty.openpty()
            tty.setraw(sub, termios.TCSANOW)
            self.pty = (main, sub)  # sub stays open here, so that the main end never sees EIO
            console["file"] = os.ttyname(sub)
            config["console"] = console
        self.config = config
        self.state = "Created"
        return None

    def put_vm_boot(self, _body: None) -> Answer:
        bad = self._need("Created")
        if bad:
            return bad
        assert self.config is not None
        for key in ("kernel", "initramfs"):
            path = self.config["payload"].get(key)
            if path is not None and not os.path.isfile(path):
                return error(500, f"The VM could not boot: cannot open the {key} {path}: No such file or directory")
        for disk in self.config.get("disks", []):
            if not os.path.isfile(disk["path"]):
                return error(500, f"The VM could not boot: cannot open disk {disk['path']}: No such file or directory")
        return self._run(restored=False, resume=True) or (204, None)

    def _run(self, restored: bool, resume: bool) -> Answer | None:
        assert self.config is not None
        if "vsock" in self.config:
            try:
                self.vsock = HybridVsock(self.config["vsock"]["socket"], self.guest)
            except OSError as e:
                return error(500, f"The VM could not boot: cannot bind the vsock socket: {e}")
        self.state = "Running" if resume else "Paused"
        self.guest.boot(restored=restored, paused=not resume)
        if self.pty is not None:
            main = self.pty[0]

            def serve_console() -> None:  # the agent opens hvc0 once the guest has booted
                self.guest.listening.wait()
                self.guest.serve(lambda: os.read(main, 65536), lambda data: _write_all(main, data))

            threading.Thread(target=serve_console, daemon=True).start()
        return None

    def put_vm_pause(self, _body: None) -> Answer:
        bad = self._need("Running")
        if bad:
            return bad
        self.guest.pause()
        self.state = "Paused"
        return 204, None

    def put_vm_resume(self, _body: None) -> Answer:
        bad = self._need("Paused")
        if bad:
            return bad
        self.guest.resume()
        self.state = "Running"
        return 204, None

    def put_vm_power_button(self, _body: None) -> Answer:
        bad = self._need("Running")
        if bad:
            return bad
        self.console("reboot: Power down")
        threading.Timer(0.1, lambda: os._exit(0)).start()  # the guest powered off: the VMM exits
        return 204, None

    def put_vm_reboot(self, _body: None) -> Answer:
        bad = self._need("Running")
        if bad:
            return bad
        self.console("reboot: Restarting system")
        return 204, None

    def put_vm_shutdown(self, _body: None) -> Answer:
        bad = self._need("Running", "Paused")
        if bad:
            return bad
        self.guest.pause()
        self.state = "Shutdown"
        return 204, None

    # -- snapshots ----------------------------------------------------------------------------

    def put_vm_snapshot(self, body: dict[str, Any]) -> Answer:
        bad = self._need("Paused")
        if bad:
            return bad
        directory = _file_url(body.get("destination_url", ""))
        if directory is None or not directory.is_dir():
            return error(500, f"The VM could not be snapshotted: invalid destination {body.get('destination_url')!r}")
        config = dict(self.config or {})
        if "console" in config:
            config["console"] = {k: v for k, v in config["console"].items() if k != "file"}
        (directory / "config.json").write_text(json.dumps(config))
        (directory / "state.json").write_text(json.dumps({"fake-cloud-hypervisor": VERSION}))
        (directory / "memory-ranges").write_bytes(b"\0" * 4096)
        return 204, None

    def put_vm_restore(self, body: dict[str, Any]) -> Answer:
        if self.state is not None:
            return error(404, "The VM could not be restored: VM is already created")
        directory = _file_url(body["source_url"])
        try:
            assert directory is not None
            config = json.loads((directory / "config.json").read_text())
            json.loads((directory / "state.json").read_text())
        except (AssertionError, OSError, ValueError) as e:
            return error(400, f"The VM could not be restored: invalid source {body['source_url']!r}: {e}")
        return self._create(config) or self._run(restored=True, resume=bool(body.get("resume"))) or (204, None)


def _file_url(url: str) -> Path | None:
    parts = urlsplit(url)
    return Path(parts.path) if parts.scheme == "file" and parts.path else None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# -- the command line ----------------------------------------------------------------------------

def _kv(value: str, *keys: str) -> dict[str, str]:
    d = dict(x.split("=", 1) for x in value.split(",") if "=" in x)
    if not set(d) <= set(keys) or len(d) != len(value.split(",")):
        die(f"Error parsing {value!r}: expected {', '.join(k + '=' for k in keys)}")
    return d


def _console(value: str) -> dict[str, str]:
    if value in ("off", "pty", "tty", "null"):
        return {"mode": value.capitalize()}
    key, _, path = value.partition("=")
    if key not in ("file", "socket"):
        die(f"Error parsing console {value!r}")
    return {"mode": key.capitalize(), key: path}


def cli_config(args: argparse.Namespace) -> dict[str, Any]:
    """The VmConfig a command line asks for (as vm.create would get it)."""
    cfg: dict[str, Any] = {"payload": {"kernel": args.kernel}}
    if args.initramfs:
        cfg["payload"]["initramfs"] = args.initramfs
    if args.cmdline:
        cfg["payload"]["cmdline"] = args.cmdline
    if args.cpus:
        c = _kv(args.cpus, "boot", "max")
        cfg["cpus"] = {"boot_vcpus": int(c["boot"]), "max_vcpus": int(c.get("max", c["boot"]))}
    if args.memory:
        size = _kv(args.memory, "size")["size"]
        if not size.endswith("M"):
            die(f"Error parsing --memory size {size!r}")
        cfg["memory"] = {"size": int(size[:-1]) * 2**20}
    for disk in args.disk:
        d = _kv(disk, "path", "readonly", "image_type", "id")
        cfg.setdefault("disks", []).append({"path": d["path"], "readonly": d.get("readonly") == "on",
                                            "image_type": {"raw": "Raw", "qcow2": "Qcow2"}[d.get("image_type", "raw")],
                                            "id": d.get("id", "disk0")})
    for net in args.net:
        cfg.setdefault("net", []).append(_kv(net, "tap", "mac", "id"))
    if args.rng:
        cfg["rng"] = _kv(args.rng, "src")
    if args.serial:
        cfg["serial"] = _console(args.serial)
    if args.console:
        cfg["console"] = _console(args.console)
    if args.vsock:
        v = _kv(args.vsock, "cid", "socket")
        cfg["vsock"] = {"cid": int(v["cid"]), "socket": v["socket"]}
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(prog="cloud-hypervisor", allow_abbrev=False)
    ap.add_argument("--api-socket", required=True)
    ap.add_argument("-v", action="count", default=0)
    for opt in ("--kernel", "--initramfs", "--cmdline", "--cpus", "--memory", "--rng", "--serial",
                "--console", "--vsock"):
        ap.add_argument(opt)
    ap.add_argument("--disk", action="append", default=[])
    ap.add_argument("--net", action="append", default=[])
    args = ap.parse_args()
    api_socket = _kv(args.api_socket, "path")["path"]
    vmm = CloudHypervisor()
    server = ApiServer(api_socket, vmm.handle, "cloud-hypervisor")
    if args.kernel:  # the command line creates and boots the VM
        config = cli_config(args)
        errors = describe(SPEC.named("VmConfig"), config)
        if errors:
            die("Error: invalid VM configuration: " + "; ".join(errors))
        for answer in (vmm.put_vm_create(config), vmm.put_vm_boot(None)):
            if answer[0] >= 300:
                die(str(answer[1]))
    server.serve_in_background()
    threading.Event().wait()


if __name__ == "__main__":
    main()
