"""Firecracker and Cloud Hypervisor launch plans (nixlib/firecracker.nix, nixlib/cloud-hypervisor.nix)
checked against the VMMs' own API specifications ($NTNG_SPECS: tests/thirdparty.py).

Neither VMM can run here, so this is their contract: every request body a plan holds validates,
with a real JSON Schema validator, against the schema the spec gives for that path and method,
made strict (a key the spec does not declare is an error).  Many node variants are evaluated in
one nix-instantiate run (tests/nix/eval-many.nix); the error cases go through nixeval.call, as
the runner does.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import thirdparty
from jsonschema import Draft4Validator

from ntng import nixeval
from ntng.errors import NixEvalError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fakevmm"))
from vmmspec import Api, adapt, describe  # noqa: E402  (shared with the fake VMMs)

Json = Any
Plan = dict[str, Any]

ROOT = Path(__file__).resolve().parents[2]
EVAL_MANY = Path(__file__).resolve().parent / "eval-many.nix"
STATE = "/tmp/ntng-test-state"
BASE = {"name": "m", "kernel": "/nix/store/k/vmlinux", "image": "/nix/store/i/rootfs.ext4",
        "stateDir": f"{STATE}/m"}
FC, CH = "firecracker.launch", "cloudHypervisor.launch"

# The keys every backend's plan has (QEMU's too: nixlib/qemu.nix).
COMMON_KEYS = {"name", "backend", "accel", "memory", "cores", "prepare", "helpers", "argv", "writeFiles",
               "api", "sockets", "files", "backdoor", "console", "interfaces", "capabilities", "bootTimeout", "kernel",
               "restartOnReboot", "shares", "launchSpec", "stateDir", "artifacts", "calls"}


# --- the specifications (tests/fakevmm/vmmspec.py) ---------------------------------------------

def load_api(name: str) -> Api:
    return Api(thirdparty.SPECS.require() / f"{name}.yaml")


@cache
def api(name: str) -> Api:
    return load_api(name)


def assert_valid(validator: Draft4Validator, instance: Json, where: str) -> None:
    errors = describe(validator, instance)
    assert not errors, f"{where}: " + "; ".join(errors)


# --- evaluating nixlib --------------------------------------------------------------------------

def eval_many(fn: str, specs: list[dict[str, Any]]) -> list[Plan]:
    """`fn` applied to every spec in one evaluation (tests/nix/eval-many.nix)."""
    cmd = [nixeval.nix_instantiate(), "--eval", "--strict", "--json", "--option", "build-users-group", "",
           str(EVAL_MANY), "--argstr", "fn", fn, "--argstr", "args", json.dumps(specs)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if r.returncode != 0:
        raise NixEvalError(nixeval.nix_message(r.stderr))
    plans = json.loads(r.stdout)
    assert isinstance(plans, list) and len(plans) == len(specs)
    return plans


def launch(fn: str, **over: Any) -> Plan:
    plan: Plan = nixeval.call(fn, {**BASE, **over})
    return plan


def variants(backend: str) -> list[dict[str, Any]]:
    """Node descriptions over memory x cores x initrd x 0-3 NICs x transport, with names that
    Firecracker's --id would reject, user kernel parameters, backdoor ports/CIDs, extra args."""
    transports = ["vsock"] if backend == "firecracker" else ["virtconsole", "vsock"]
    out = []
    combos = itertools.product([128, 1024, 6144], [1, 2, 32], [None, "/nix/store/r/initrd"], range(4), transports)
    for i, (memory, cores, initrd, nics, transport) in enumerate(combos):
        name = f"{['server', 'client_', 'db.', 'n-'][i % 4]}{i}"
        spec: dict[str, Any] = {
            **BASE, "name": name, "stateDir": f"{STATE}/{name}", "memory": memory, "cores": cores,
            # as nixlib/network.nix makes them: more keys than tap and mac, none may leak into a body
            "interfaces": [{"vlan": v, "tap": f"nt{i}v{v}", "mac": f"52:54:00:{i:02x}:00:{v:02x}",
                            "bridge": f"ntng-br{v}", "guestName": f"eth{v - 1}", "ipv4": f"192.168.{v}.{i + 1}"}
                           for v in range(1, nics + 1)],
            "backdoor": {"transport": transport} | ({"guestCid": 3 + i, "vsockPort": 5000 + i} if i % 5 == 0 else {}),
            "kernelParams": [["loglevel=4"], [], ["systemd.log_level=info", "quiet"]][i % 3],
        }
        if i % 2:
            spec["backend"] = backend
            spec["bootTimeout"] = 30 + i
        if initrd:
            spec["initrd"] = initrd
        if i % 7 == 0:
            spec["extraArgs"] = ["--boot-timer"] if backend == "firecracker" else ["-v"]
        if backend == "cloud-hypervisor" and i % 3 == 0:  # virtiofs shares (its only kind)
            spec["sharedDirs"] = {f"s{k}": {"source": f"/srv/{k}", "target": f"/mnt/{k}", "type": "virtiofs",
                                            "readOnly": k == 1} for k in range(i % 4)}
            spec["shareArtifacts"] = i % 2 == 0
        out.append(spec)
    return out


FC_SPECS = variants("firecracker")
CH_SPECS = variants("cloud-hypervisor")


@pytest.fixture(scope="module")
def fc_plans() -> list[tuple[dict[str, Any], Plan]]:
    api("firecracker")  # skip early without the spec
    return list(zip(FC_SPECS, eval_many(FC, FC_SPECS), strict=True))


@pytest.fixture(scope="module")
def ch_plans() -> list[tuple[dict[str, Any], Plan]]:
    api("cloud-hypervisor")
    return list(zip(CH_SPECS, eval_many(CH, CH_SPECS), strict=True))


def fc_config(plan: Plan) -> dict[str, Any]:
    argv = plan["argv"]
    path = argv[argv.index("--config-file") + 1]
    config: dict[str, Any] = plan["writeFiles"][path]
    return config


def ch_create(plan: Plan) -> dict[str, Any]:
    body: dict[str, Any] = plan["api"][0]["body"]
    return body


# Kernel parameters the kernel takes more than once on purpose (every console= gets output).
MULTI_VALUED_PARAMS = {"console", "ntng.share"}  # one ntng.share= per shared directory


def conflicting_params(cmdline: str) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = {}
    for token in cmdline.split():
        key, _, value = token.partition("=")
        seen.setdefault(key, set()).add(value)
    return {k: v for k, v in seen.items() if len(v) > 1 and k not in MULTI_VALUED_PARAMS}


def common_checks(spec: dict[str, Any], plan: Plan, backend: str, extra_key: str) -> None:
    assert set(plan) == COMMON_KEYS | {extra_key}, set(plan) ^ (COMMON_KEYS | {extra_key})
    assert plan["name"] == spec["name"] and plan["backend"] == backend and plan["accel"] == "kvm"
    assert (plan["memory"], plan["cores"]) == (spec["memory"], spec["cores"])
    assert plan["bootTimeout"] == spec.get("bootTimeout")
    # block/unblock: no link switch in these VMMs, the host downs the TAP device.
    assert plan["interfaces"] == [{**i, "link": "host"} for i in spec["interfaces"]]
    assert all(h["name"].startswith("virtiofsd-") for h in plan["helpers"])  # only for shares
    assert spec["backdoor"]["transport"] in plan["capabilities"]["transports"]
    assert plan["stateDir"] == spec["stateDir"]
    state = spec["stateDir"] + "/"
    owned = [*plan["sockets"].values(), *plan["files"].values(), *plan["writeFiles"],
             *(h["waitFor"] for h in plan["helpers"])]
    assert all(p.startswith(state) for p in owned), owned
    assert len(owned) == len(set(owned)), owned
    assert ["cp", "--sparse=always", "--reflink=auto", spec["image"], plan["files"]["disk"]] in plan["prepare"]
    assert all(isinstance(c, list) and c and all(isinstance(a, str) for a in c) for c in plan["prepare"])
    extra = spec.get("extraArgs", [])
    assert plan["argv"][len(plan["argv"]) - len(extra):] == extra
    assert plan["api"] == [] or all(c["method"] == "PUT" for c in plan["api"])


def unique(values: list[Any]) -> bool:
    return len(values) == len(set(values))


# --- Firecracker --------------------------------------------------------------------------------

# Config-file section -> schema of its value (of its items, for the lists), as the brief has it;
# checked below against the spec's own FullVmConfiguration (the GET /vm/config shape).
FC_SECTIONS = {"boot-source": "BootSource", "drives": "Drive", "machine-config": "MachineConfiguration",
               "network-interfaces": "NetworkInterface", "vsock": "Vsock", "logger": "Logger",
               "metrics": "Metrics"}


def test_firecracker_sections_are_the_specs() -> None:
    full = api("firecracker").schemas["FullVmConfiguration"]["properties"]
    for section, name in FC_SECTIONS.items():
        prop = full[section]
        ref = prop["items"]["$ref"] if prop.get("type") == "array" else prop["$ref"]
        assert ref == f"#/definitions/{name}", section


def test_firecracker_config_file_validates(fc_plans: list[tuple[dict[str, Any], Plan]]) -> None:
    fc = api("firecracker")
    validators = {name: fc.named(name) for name in {*FC_SECTIONS.values(), "FullVmConfiguration"}}
    full = fc.schemas["FullVmConfiguration"]["properties"]
    for spec, plan in fc_plans:
        config = fc_config(plan)
        assert set(config) == set(FC_SECTIONS)
        assert_valid(validators["FullVmConfiguration"], config, spec["name"])
        for section, value in config.items():
            items = value if full[section].get("type") == "array" else [value]
            for item in items:
                assert_valid(validators[FC_SECTIONS[section]], item, f"{spec['name']} {section}")


def test_firecracker_config_matches_node(fc_plans: list[tuple[dict[str, Any], Plan]]) -> None:
    for spec, plan in fc_plans:
        common_checks(spec, plan, "firecracker", "apiRoute")
        c = fc_config(plan)
        assert c["machine-config"] == {"vcpu_count": spec["cores"], "mem_size_mib": spec["memory"]}
        boot = c["boot-source"]
        assert boot["kernel_image_path"] == spec["kernel"]
        assert boot.get("initrd_path") == spec.get("initrd")
        assert [d["path_on_host"] for d in c["drives"]] == [plan["files"]["disk"]]
        assert [d["is_root_device"] for d in c["drives"]] == [True]
        nics = c["network-interfaces"]
        assert [(n["host_dev_name"], n["guest_mac"]) for n in nics] == \
            [(i["tap"], i["mac"]) for i in spec["interfaces"]]
        # network.nix's guestName: ethN in the order the NICs are created
        assert [n["iface_id"] for n in nics] == [i["guestName"] for i in spec["interfaces"]]
        assert [n["iface_id"] for n in nics] == [f"eth{i}" for i in range(len(nics))]
        for key in ("iface_id", "host_dev_name", "guest_mac"):
            assert unique([n[key] for n in nics]), key
        assert unique([d["drive_id"] for d in c["drives"]])
        bd = spec["backdoor"]
        assert c["vsock"] == {"guest_cid": bd.get("guestCid", 3), "uds_path": plan["sockets"]["vsock"]}
        assert plan["backdoor"] == {"transport": "vsock", "uds": plan["sockets"]["vsock"],
                                    "port": bd.get("vsockPort", 1234)}
        assert c["logger"]["log_path"] == plan["files"]["log"]
        assert c["metrics"]["metrics_path"] == plan["files"]["metrics"]
        # Firecracker opens these with O_NONBLOCK and (before 1.14) without O_CREAT.
        assert ["touch", plan["files"]["log"], plan["files"]["metrics"]] in plan["prepare"]
        assert plan["console"] == "stdout"


def test_firecracker_argv(fc_plans: list[tuple[dict[str, Any], Plan]]) -> None:
    for _spec, plan in fc_plans:
        argv = plan["argv"]
        assert argv[0] == "firecracker"
        assert argv[argv.index("--api-sock") + 1] == plan["sockets"]["api"]
        assert list(plan["writeFiles"]) == [argv[argv.index("--config-file") + 1]]
        # utils::validators::validate_instance_id: 1-64 characters, alphanumeric or '-'.
        assert re.fullmatch(r"[A-Za-z0-9-]{1,64}", argv[argv.index("--id") + 1])
        flags = [a for a in argv if a.startswith("--")]
        assert unique(flags), flags
        route = plan["apiRoute"]
        assert set(route) == {"argv", "api"}
        i = argv.index("--config-file")
        assert route["argv"] == argv[:i] + argv[i + 2:], "the API route is the same VMM without the file"
        assert plan["api"] == []  # the config file boots the guest by itself
    long = launch(FC, name="x" * 70 + "_y")
    assert long["argv"][long["argv"].index("--id") + 1] == "ntng-" + "x" * 59


def test_firecracker_api_route_validates_and_equals_the_config(
        fc_plans: list[tuple[dict[str, Any], Plan]]) -> None:
    fc = api("firecracker")
    full = fc.schemas["FullVmConfiguration"]["properties"]
    for spec, plan in fc_plans:
        calls = plan["apiRoute"]["api"]
        rebuilt: dict[str, Any] = {}
        for call in calls:
            template = fc.check_call(call)
            if template == "/actions":
                continue
            # Each call's body is one config-file section (or an item of a list section): the
            # section is the path's first segment, a list if FullVmConfiguration says so.
            section = template.strip("/").split("/")[0]
            if full[section].get("type") == "array":
                rebuilt.setdefault(section, []).append(call["body"])
            else:
                assert section not in rebuilt, f"{section} set twice"
                rebuilt[section] = call["body"]
        config = fc_config(plan)
        rebuilt.setdefault("network-interfaces", [])
        assert rebuilt == config, spec["name"]
        assert [c["path"] for c in calls].count("/actions") == 1
        assert calls[-1] == {"method": "PUT", "path": "/actions", "body": {"action_type": "InstanceStart"}}
        assert [c["path"] for c in calls[:2]] == ["/logger", "/metrics"]  # errors of the rest are logged


def test_firecracker_kernel_params(fc_plans: list[tuple[dict[str, Any], Plan]]) -> None:
    for spec, plan in fc_plans:
        args = fc_config(plan)["boot-source"]["boot_args"]
        tokens = args.split()
        assert not conflicting_params(args), (spec["name"], conflicting_params(args))
        for p in ("root=/dev/vda", "rw", "console=ttyS0,115200", "reboot=k", "panic=-1", *spec["kernelParams"]):
            assert p in tokens, (p, args)
        assert "panic=1" not in tokens
        assert tokens.count("reboot=k") == 1 and tokens.count("i8042.nomux") == 1
    # A key the node sets itself wins; ours is not added next to it.
    args = fc_config(launch(FC, kernelParams=["reboot=t", "i8042.nomux"]))["boot-source"]["boot_args"].split()
    assert "reboot=t" in args and "reboot=k" not in args and args.count("i8042.nomux") == 1


# --- Cloud Hypervisor ---------------------------------------------------------------------------

def test_cloud_hypervisor_api_validates(ch_plans: list[tuple[dict[str, Any], Plan]]) -> None:
    ch = api("cloud-hypervisor")
    for spec, plan in ch_plans:
        templates = [ch.check_call(call) for call in plan["api"]]
        assert templates == ["/vm.create", "/vm.boot"], (spec["name"], templates)
        # The spec's own choice of schema for vm.create, not a hard-coded VmConfig:
        schema, required = ch.body_schema(ch.operation(plan["api"][0]["path"], "PUT")[2])
        assert schema == {"$ref": "#/components/schemas/VmConfig"} and required
        assert "body" not in plan["api"][1]


@pytest.mark.parametrize(("backend", "names"), [
    ("firecracker", {"info", "pause", "resume", "flushMetrics"}),
    ("cloud-hypervisor", {"ping", "pause", "resume", "reboot", "shutdown"}),
])
def test_the_runtime_calls_are_the_specs(backend: str, names: set[str],
                                         fc_plans: list[tuple[dict[str, Any], Plan]],
                                         ch_plans: list[tuple[dict[str, Any], Plan]]) -> None:
    """The calls the backends make while the VM runs (pause, resume, ...) are nixlib's and
    each is an operation of the VMM's API spec with a valid body."""
    spec = api(backend)
    for _, plan in fc_plans if backend == "firecracker" else ch_plans:
        assert set(plan["calls"]) == names
        for call in plan["calls"].values():
            spec.check_call(call)
    if backend == "firecracker":
        calls = fc_plans[0][1]["calls"]
        assert calls["pause"]["body"] == {"state": "Paused"} and calls["resume"]["body"] == {"state": "Resumed"}


def test_cloud_hypervisor_config_matches_node(ch_plans: list[tuple[dict[str, Any], Plan]]) -> None:
    ch = api("cloud-hypervisor")
    for spec, plan in ch_plans:
        common_checks(spec, plan, "cloud-hypervisor", "cliArgv")
        body = ch_create(plan)
        assert body["cpus"] == {"boot_vcpus": spec["cores"], "max_vcpus": spec["cores"]}
        shares = [*spec.get("sharedDirs", {})] + (["shared"] if spec.get("shareArtifacts") else [])
        assert body["memory"] == {"size": spec["memory"] * 2**20} | ({"shared": True} if shares else {})
        assert [f["tag"] for f in body.get("fs", [])] == shares
        assert [h["name"] for h in plan["helpers"]] == [f"virtiofsd-{t}" for t in shares]
        assert [f["socket"] for f in body.get("fs", [])] == [h["waitFor"] for h in plan["helpers"]]
        assert body["payload"]["kernel"] == spec["kernel"]
        assert body["payload"].get("initramfs") == spec.get("initrd")
        assert [d["path"] for d in body["disks"]] == [plan["files"]["disk"]]
        nets = body.get("net", [])
        assert [(n["tap"], n["mac"]) for n in nets] == [(i["tap"], i["mac"]) for i in spec["interfaces"]]
        for key in ("tap", "mac"):
            assert unique([n[key] for n in nets]), key
        ids = [d["id"] for d in body["disks"]] + [n["id"] for n in nets]
        assert unique(ids), ids
        assert body["serial"] == {"mode": "File", "file": plan["files"]["consoleLog"]}
        assert plan["console"] == "file"
        assert plan["argv"] == ["cloud-hypervisor", "--api-socket", f"path={plan['sockets']['api']}",
                                *spec.get("extraArgs", [])]
        assert plan["writeFiles"] == {}
        bd = spec["backdoor"]
        if bd["transport"] == "vsock":
            assert body["console"] == {"mode": "Off"}
            assert body["vsock"] == {"cid": bd.get("guestCid", 3), "socket": plan["sockets"]["vsock"]}
            assert plan["backdoor"] == {"transport": "vsock", "uds": plan["sockets"]["vsock"],
                                        "port": bd.get("vsockPort", 1234)}
        else:
            assert body["console"] == {"mode": "Pty"} and "vsock" not in body and "vsock" not in plan["sockets"]
            pty = plan["backdoor"]["pty"]
            assert plan["backdoor"]["transport"] == "virtconsole"
            # The pty path is a string field of the spec's vm.info response.
            op = ch.operation(pty["path"], pty["method"])[2]
            schema = op["responses"][200]["content"]["application/json"]["schema"]
            for key in pty["field"]:
                schema = ch.resolve(schema)["properties"][key]
            assert ch.resolve(schema) == {"type": "string"}


def test_cloud_hypervisor_console_socket_mode_is_in_the_spec() -> None:
    """The spec offers Socket for the virtio-console too (ConsoleConfig.socket); the builder uses
    Pty because Cloud Hypervisor rejects it (see nixlib/cloud-hypervisor.nix).  If this fails,
    the spec changed: look again at which mode the virtconsole backdoor should use."""
    schemas = api("cloud-hypervisor").schemas
    assert "socket" in schemas["ConsoleConfig"]["properties"]
    assert {"Pty", "File", "Off", "Socket"} <= set(schemas["ConsoleMode"]["enum"])


def cli_to_vmconfig(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """(API socket path, VmConfig) that a Cloud Hypervisor command line asks for.  Every option
    and every key=value of an option must be understood here, so nothing is missed."""
    assert len(argv) % 2 == 1 and all(a.startswith("--") for a in argv[1::2]), argv
    opts = list(zip(argv[1::2], argv[2::2], strict=True))

    def kv(value: str, *keys: str) -> list[str]:
        d = dict(x.split("=", 1) for x in value.split(","))
        assert set(d) == set(keys), (value, keys)
        return [d[k] for k in keys]

    def console(value: str) -> dict[str, str]:
        if value in ("off", "pty", "tty", "null"):
            return {"mode": value.capitalize()}
        key, _, path = value.partition("=")
        assert key in ("file", "socket"), value
        return {"mode": key.capitalize(), key: path}

    api_socket = ""
    cfg: dict[str, Any] = {"payload": {}}
    for flag, value in opts:
        match flag:
            case "--api-socket":
                [api_socket] = kv(value, "path")
            case "--kernel" | "--initramfs" | "--cmdline":
                cfg["payload"][flag[2:]] = value
            case "--cpus":
                boot, top = kv(value, "boot", "max")
                cfg["cpus"] = {"boot_vcpus": int(boot), "max_vcpus": int(top)}
            case "--memory":
                [size, *shared] = kv(value, "size", "shared") if ",shared=" in value else kv(value, "size")
                assert size.endswith("M"), size
                cfg["memory"] = {"size": int(size[:-1]) * 2**20} | ({"shared": True} if shared == ["on"] else {})
            case "--fs":
                tag, sock, queues, qsize = kv(value, "tag", "socket", "num_queues", "queue_size")
                cfg.setdefault("fs", []).append({"tag": tag, "socket": sock, "num_queues": int(queues),
                                                 "queue_size": int(qsize)})
            case "--disk":
                path, readonly, image_type, ident = kv(value, "path", "readonly", "image_type", "id")
                cfg.setdefault("disks", []).append({
                    "path": path, "readonly": {"on": True, "off": False}[readonly],
                    "image_type": {"raw": "Raw", "qcow2": "Qcow2"}[image_type], "id": ident})
            case "--net":
                tap, mac, ident = kv(value, "tap", "mac", "id")
                cfg.setdefault("net", []).append({"tap": tap, "mac": mac, "id": ident})
            case "--rng":
                [src] = kv(value, "src")
                cfg["rng"] = {"src": src}
            case "--serial" | "--console":
                cfg[flag[2:]] = console(value)
            case "--vsock":
                cid, socket = kv(value, "cid", "socket")
                cfg["vsock"] = {"cid": int(cid), "socket": socket}
            case _:
                raise AssertionError(f"unexpected option {flag}")
    return api_socket, cfg


def test_cloud_hypervisor_cli_is_the_api_config(ch_plans: list[tuple[dict[str, Any], Plan]]) -> None:
    for spec, plan in ch_plans:
        cli = plan["cliArgv"]
        extra = spec.get("extraArgs", [])
        assert cli[len(cli) - len(extra):] == extra
        api_socket, cfg = cli_to_vmconfig(cli[:len(cli) - len(extra)])
        assert api_socket == plan["sockets"]["api"]
        assert cfg == ch_create(plan), spec["name"]
        flags = [a for a in cli if a.startswith("--")]
        assert unique([f for f in flags if f not in ("--net", "--fs")]), flags  # repeatable (clap Append)


def test_cloud_hypervisor_kernel_params(ch_plans: list[tuple[dict[str, Any], Plan]]) -> None:
    for spec, plan in ch_plans:
        cmdline = ch_create(plan)["payload"]["cmdline"]
        assert not conflicting_params(cmdline), (spec["name"], conflicting_params(cmdline))
        tokens = cmdline.split()
        for p in ("root=/dev/vda", "console=ttyS0,115200", *spec["kernelParams"]):
            assert p in tokens
        # hvc0 carries the backdoor: no kernel console may write into it.
        assert "console=hvc0" not in tokens


# --- both ---------------------------------------------------------------------------------------

def test_plans_are_stable_across_evaluations(fc_plans: list[tuple[dict[str, Any], Plan]],
                                             ch_plans: list[tuple[dict[str, Any], Plan]]) -> None:
    assert eval_many(FC, FC_SPECS[:20]) == [p for _, p in fc_plans[:20]]
    assert eval_many(CH, CH_SPECS[:20]) == [p for _, p in ch_plans[:20]]


def test_explicit_backend_and_raw_image_are_accepted() -> None:
    assert launch(FC, backend="firecracker", imageFormat="raw")["backend"] == "firecracker"
    assert launch(CH, backend="cloud-hypervisor", imageFormat="raw")["backend"] == "cloud-hypervisor"


@pytest.mark.parametrize(
    ("fn", "override", "message"),
    [
        # node.nix's own checks, reached through the builders
        (FC, {"backdoor": {"transport": "virtio-serial"}}, "backdoor.transport: backend firecracker lacks the virtio-serial transport"),
        (FC, {"backdoor": {"transport": "virtconsole"}}, "backdoor.transport: backend firecracker lacks the virtconsole transport"),
        (CH, {"backdoor": {"transport": "virtio-serial"}}, "backdoor.transport: backend cloud-hypervisor lacks the virtio-serial transport"),
        (FC, {"imageFormat": "qcow2"}, "imageFormat: backend firecracker boots raw images only"),
        (CH, {"imageFormat": "qcow2"}, "imageFormat: backend cloud-hypervisor boots raw images only"),
        (FC, {"accel": "tcg"}, "accel: backend firecracker needs KVM"),
        (CH, {"accel": "tcg"}, "accel: backend cloud-hypervisor needs KVM"),
        (FC, {"machineType": "q35"}, "machineType \"q35\" is not offered by backend firecracker"),
        (FC, {"extraSerialPorts": ["x"]}, "extraSerialPorts: backend firecracker has no virtio-serial ports"),
        (CH, {"requires": ["screenshot"]}, "requires screenshot, which backend cloud-hypervisor lacks"),
        (FC, {"requires": ["reboot"]}, "requires reboot, which backend firecracker lacks"),
        # the builders' own
        (FC, {"backend": "qemu"}, "backend \"qemu\" is not firecracker"),
        (CH, {"backend": "qemu"}, "backend \"qemu\" is not cloud-hypervisor"),
        (CH, {"backend": "firecracker"}, "backend \"firecracker\" is not cloud-hypervisor"),
        (FC, {"cpu": "host"}, "cpu \"host\": a QEMU CPU model, backend firecracker has none"),
        (CH, {"cpu": "host"}, "cpu \"host\": a QEMU CPU model, backend cloud-hypervisor has none"),
        (FC, {"cores": 33}, "cores must be at most 32 for backend firecracker"),
        (CH, {"allowReboot": False}, "allowReboot = false: backend cloud-hypervisor cannot exit on a guest reboot"),
    ],
)
def test_errors_name_node_and_option(fn: str, override: dict[str, Any], message: str) -> None:
    with pytest.raises(NixEvalError) as e:
        launch(fn, **override)
    assert f"node 'm': {message}" in str(e.value)
    assert "\n" not in str(e.value)


# --- the schema adaptation itself ---------------------------------------------------------------

def test_adapted_schemas_are_valid_draft4() -> None:
    for name in ("firecracker", "cloud-hypervisor"):
        Draft4Validator.check_schema(api(name).container)


def test_strictness_catches_unknown_keys() -> None:
    fc, ch = api("firecracker"), api("cloud-hypervisor")
    plan = launch(FC)
    config = fc_config(plan)
    assert not list(fc.named("FullVmConfiguration").iter_errors(config))
    typo = {**config, "drives": [{**config["drives"][0], "is_root": True}]}
    assert list(fc.named("FullVmConfiguration").iter_errors(typo))
    assert list(fc.named("BootSource").iter_errors({**config["boot-source"], "initrd": "/i"}))
    body = ch_create(launch(CH))
    assert list(ch.named("VmConfig").iter_errors({**body, "payload": {**body["payload"], "initrd": "/i"}}))
    assert list(ch.named("VmConfig").iter_errors({**body, "consol": {"mode": "Off"}}))
    # An explicit additionalProperties map stays open.
    assert not list(fc.named("Metrics").iter_errors({"metrics_path": "/m", "properties": {"a": "b"}}))


def test_integer_formats_and_nullable() -> None:
    ch = api("cloud-hypervisor")
    body = ch_create(launch(CH))
    assert list(ch.named("VmConfig").iter_errors({**body, "memory": {"size": 2**63}}))  # int64
    assert not list(ch.named("VmConfig").iter_errors({**body, "memory": {"size": 2**63 - 1}}))
    v = Draft4Validator(adapt({"type": "object", "properties": {"a": {"type": "integer", "format": "uint8",
                                                                      "nullable": True}}}))
    assert v.is_valid({"a": None}) and v.is_valid({"a": 255})
    assert not v.is_valid({"a": 256}) and not v.is_valid({"a": -1}) and not v.is_valid({"b": 1})


def test_yaml_1_2_booleans() -> None:
    level = api("firecracker").schemas["Logger"]["properties"]["level"]["enum"]
    assert "Off" in level and False not in level
