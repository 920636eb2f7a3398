"""A fake Firecracker for the unit tests: the real command line, the real API on the unix
socket, the real agent behind hybrid vsock; no VM.

Every request is checked against $NTNG_SPECS/firecracker.yaml, made strict
(vmmspec.py): an unknown path or method, an undeclared key or a wrong type gets the 400 with a
`fault_message` that Firecracker documents.  The state machine is Firecracker's: pre-boot
resources only before InstanceStart, PATCH /vm only after it, /snapshot/create only while
Paused, /snapshot/load only on a fresh process (logger and metrics aside).  The serial console
is stdout (stdin is echoed to it); logger and metrics write to their files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fakeguest import Answer, ApiServer, Guest, HybridVsock, die, load_spec, parse_json  # noqa: E402
from vmmspec import describe  # noqa: E402

VERSION = "1.17.0-dev"
SPEC = load_spec("firecracker")
AFTER_START = "The requested operation is not supported after starting the microVM."
BEFORE_START = "The requested operation is not supported before starting the microVM."
DESERIALIZE = "An error occurred when deserializing the json body of a request: "
# Resources that exist only before the VM starts (everything but logger/metrics blocks a load).
BOOT_RESOURCES = {"/boot-source", "/drives/{drive_id}", "/machine-config", "/network-interfaces/{iface_id}",
                  "/vsock", "/cpu-config", "/mmds/config", "/entropy", "/serial", "/balloon", "/pmem/{id}",
                  "/hotplug/memory"}


def fault(message: str, status: int = 400) -> Answer:
    return status, {"fault_message": message}


def console(line: str) -> None:
    sys.stdout.write(line + "\r\n")
    sys.stdout.flush()


class Firecracker:
    def __init__(self, instance_id: str) -> None:
        self.id = instance_id
        self.state = "Not started"
        self.config: dict[str, Any] = {"drives": [], "network-interfaces": []}
        self.boot_resources = False  # a boot-specific resource was configured (no snapshot load then)
        self.loaded = False
        self.log_path: str | None = None
        self.metrics_path: str | None = None
        self.vsock: HybridVsock | None = None
        self.guest = Guest(console)

    # -- dispatch ---------------------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, raw: bytes | None) -> Answer:
        path = urlsplit(raw_path).path
        found = SPEC.find(path, method)
        if found is None:
            return fault(f"Invalid request method and/or path: {method} {path}.")
        template, params, _op = found
        has_body, body, error = parse_json(raw)
        if error:
            return fault(DESERIALIZE + error)
        errors = SPEC.body_errors(method, path, body, has_body)
        if errors:
            return fault(DESERIALIZE + "; ".join(errors))
        self.log(f"The API server received a {method} request on \"{path}\".")
        handler = getattr(self, f"{method.lower()}_{_name(template)}", None)
        if handler is None:
            return fault(f"fake firecracker: {method} {template} is not implemented")
        if template in BOOT_RESOURCES and method == "PUT":
            if self.state != "Not started":
                return fault(AFTER_START)
        answer: Answer = handler(body, **params)
        if answer[0] < 300 and template in BOOT_RESOURCES:
            self.boot_resources = True
        return answer

    def log(self, message: str) -> None:
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} [{self.id}:fc_api] {message}\n")

    # -- information --------------------------------------------------------------------------

    def get_root(self, _body: None) -> Answer:
        return 200, {"app_name": "Firecracker", "id": self.id, "state": self.state, "vmm_version": VERSION}

    def get_version(self, _body: None) -> Answer:
        return 200, {"firecracker_version": VERSION}

    def get_vm_config(self, _body: None) -> Answer:
        return 200, self.config

    def get_machine_config(self, _body: None) -> Answer:
        return 200, self.config.get("machine-config", {"vcpu_count": 1, "mem_size_mib": 128})

    # -- pre-boot resources -------------------------------------------------------------------

    def put_logger(self, body: dict[str, Any]) -> Answer:
        if self.log_path is not None:
            return fault("Logger error: the logger is already initialized.")
        path = body.get("log_path")
        if path is not None:
            if not os.path.exists(path):  # Firecracker before 1.14 opens it without creating it
                return fault(f"Logger error: Failed to open target file: No such file or directory (os error 2): {path}")
            self.log_path = path
        self.config["logger"] = body
        self.log("Running Firecracker v" + VERSION)
        return 204, None

    def put_metrics(self, body: dict[str, Any]) -> Answer:
        if self.metrics_path is not None:
            return fault("Reinitialization of metrics not allowed.")
        if not os.path.exists(body["metrics_path"]):
            return fault("Cannot initialize the metrics system due to bad user input: No such file or directory (os error 2)")
        self.metrics_path = body["metrics_path"]
        self.config["metrics"] = body
        return 204, None

    def put_machine_config(self, body: dict[str, Any]) -> Answer:
        self.config["machine-config"] = body
        return 204, None

    def put_boot_source(self, body: dict[str, Any]) -> Answer:
        if not os.path.isfile(body["kernel_image_path"]):
            return fault("The kernel file cannot be opened: No such file or directory (os error 2)")
        if "initrd_path" in body and not os.path.isfile(body["initrd_path"]):
            return fault("The initrd file cannot be opened due to invalid path or invalid permissions. "
                         "No such file or directory (os error 2)")
        self.config["boot-source"] = body
        return 204, None

    def put_drives(self, body: dict[str, Any], drive_id: str) -> Answer:
        if body.get("path_on_host") and not os.path.isfile(body["path_on_host"]):
            return fault(f"Unable to create the virtio block device: Virtio backend error: "
                         f"No such file or directory (os error 2): {body['path_on_host']}")
        self.config["drives"] = [d for d in self.config["drives"] if d["drive_id"] != drive_id] + [body]
        return 204, None

    def put_network_interfaces(self, body: dict[str, Any], iface_id: str) -> Answer:
        nics = self.config["network-interfaces"]
        self.config["network-interfaces"] = [n for n in nics if n["iface_id"] != iface_id] + [body]
        return 204, None

    def put_vsock(self, body: dict[str, Any]) -> Answer:
        answer = self._bind_vsock(body["uds_path"])
        if answer is None:
            self.config["vsock"] = body
            return 204, None
        return answer

    def _bind_vsock(self, path: str) -> Answer | None:
        if self.vsock is not None:
            self.vsock.close()
        try:
            self.vsock = HybridVsock(path, self.guest)
        except OSError as e:
            return fault(f"Cannot create backend for vsock device: Error binding to the host-side "
                         f"Unix socket: {e.strerror} (os error {e.errno})")
        return None

    # -- actions and state --------------------------------------------------------------------

    def put_actions(self, body: dict[str, Any]) -> Answer:
        action = body["action_type"]
        if action == "InstanceStart":
            if self.state != "Not started":
                return fault(AFTER_START)
            if "boot-source" not in self.config:
                return fault("Cannot start microvm without kernel configuration.")
            self.state = "Running"
            self.guest.boot()
            return 204, None
        if action == "SendCtrlAltDel":
            if self.state == "Not started":
                return fault(BEFORE_START)
            # reboot=k: the guest's reboot makes Firecracker exit.
            console("reboot: Restarting system")
            threading.Timer(0.1, lambda: os._exit(0)).start()
            return 204, None
        # FlushMetrics
        if self.metrics_path is None:
            return fault("The metrics system is not initialized.")
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"utc_timestamp_ms": int(time.time() * 1000), "api_server": {}}) + "\n")
        return 204, None

    def patch_vm(self, body: dict[str, Any]) -> Answer:
        if self.state == "Not started":
            return fault(BEFORE_START)
        if body["state"] == "Paused":
            self.guest.pause()
            self.state = "Paused"
        else:
            self.guest.resume()
            self.state = "Running"
        return 204, None

    # -- snapshots ----------------------------------------------------------------------------

    def put_snapshot_create(self, body: dict[str, Any]) -> Answer:
        if self.state == "Not started":
            return fault(BEFORE_START)
        if self.state != "Paused":
            return fault("Create snapshot error: Cannot save the microVM state: the microVM is not paused.")
        if body.get("snapshot_type") == "Diff" and not self.config["machine-config"].get("track_dirty_pages"):
            return fault("Create snapshot error: Diff snapshots are not enabled (track_dirty_pages).")
        try:
            Path(body["snapshot_path"]).write_text(json.dumps({"fake-firecracker": VERSION, "config": self.config}))
            Path(body["mem_file_path"]).write_bytes(b"\0" * 4096)
        except OSError as e:
            return fault(f"Create snapshot error: Cannot write snapshot files: {e}")
        return 204, None

    def put_snapshot_load(self, body: dict[str, Any]) -> Answer:
        if self.state != "Not started" or self.loaded:
            return fault(AFTER_START)
        if self.boot_resources:
            return fault("Loading a microVM snapshot not allowed after configuring boot-specific resources.")
        if ("mem_backend" in body) == ("mem_file_path" in body):
            return fault("Load snapshot error: exactly one of mem_backend and mem_file_path must be given.")
        backend = body.get("mem_backend", {"backend_type": "File", "backend_path": body.get("mem_file_path")})
        if backend["backend_type"] != "File":
            return fault("fake firecracker: only the File memory backend is implemented")
        try:
            snapshot = json.loads(Path(body["snapshot_path"]).read_text())
            Path(backend["backend_path"]).read_bytes()
        except (OSError, ValueError) as e:
            return fault(f"Load snapshot error: Cannot open the snapshot files: {e}")
        config = snapshot["config"]
        for override in body.get("network_overrides", []):
            nics = [n for n in config["network-interfaces"] if n["iface_id"] == override["iface_id"]]
            if not nics:
                return fault(f"Load snapshot error: Invalid network override: no interface {override['iface_id']}.")
            nics[0]["host_dev_name"] = override["host_dev_name"]
        if "vsock" in config:
            if "vsock_override" in body:
                config["vsock"]["uds_path"] = body["vsock_override"]["uds_path"]
            answer = self._bind_vsock(config["vsock"]["uds_path"])
            if answer is not None:
                return answer
        for key in ("logger", "metrics"):  # this process's, not the snapshotted one's
            config.pop(key, None)
            if key in self.config:
                config[key] = self.config[key]
        self.config = config
        self.loaded = True
        resume = bool(body.get("resume_vm"))
        self.state = "Running" if resume else "Paused"
        self.guest.boot(restored=True, paused=not resume)
        return 204, None

    # -- the config file route ----------------------------------------------------------------

    def apply_config_file(self, path: str) -> None:
        """As Firecracker does with --config-file: everything in order, then InstanceStart; any
        error ends the process."""
        try:
            config = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            die(f"Configuration for VMM from one single json failed: {e}")
        errors = describe(SPEC.named("FullVmConfiguration"), config)
        if errors:
            die("Configuration for VMM from one single json failed: " + "; ".join(errors))
        calls = [("/logger", config.get("logger")), ("/metrics", config.get("metrics")),
                 ("/machine-config", config.get("machine-config")), ("/boot-source", config.get("boot-source"))]
        calls += [(f"/drives/{d['drive_id']}", d) for d in config.get("drives", [])]
        calls += [(f"/network-interfaces/{n['iface_id']}", n) for n in config.get("network-interfaces", [])]
        calls += [("/vsock", config.get("vsock")), ("/actions", {"action_type": "InstanceStart"})]
        for path_, body in calls:
            if body is None:
                continue
            status, answer = self.handle("PUT", path_, json.dumps(body).encode())
            if status >= 300:
                die(f"Configuration for VMM from one single json failed: {answer['fault_message']}")


def _name(template: str) -> str:
    """/network-interfaces/{iface_id} -> network_interfaces, / -> root."""
    words = [w for w in re.split(r"[/-]", template) if w and not w.startswith("{")]
    return "_".join(words) or "root"


def echo_serial_input() -> None:
    """The guest's serial getty, roughly: what the host types comes back on the console."""
    for line in sys.stdin:
        console(f"serial input: {line.rstrip()}")


def main() -> None:
    ap = argparse.ArgumentParser(prog="firecracker", allow_abbrev=False)
    ap.add_argument("--api-sock", default="/run/firecracker.socket")
    ap.add_argument("--id", default="anonymous-instance")
    ap.add_argument("--config-file")
    ap.add_argument("--boot-timer", action="store_true")
    args = ap.parse_args()
    if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", args.id):
        die(f"Invalid instance ID: {args.id}")
    vmm = Firecracker(args.id)
    server = ApiServer(args.api_sock, vmm.handle, "firecracker")
    if args.config_file:
        vmm.apply_config_file(args.config_file)
    server.serve_in_background()
    threading.Thread(target=echo_serial_input, daemon=True).start()
    threading.Event().wait()


if __name__ == "__main__":
    main()
