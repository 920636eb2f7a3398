"""nixlib/mkTest.nix, evaluated without nixpkgs.

Only nixpkgs' lib is available ($NIXPKGS_LIB).  tests/nix/eval-mktest.nix calls mkTest with a
fake `pkgs` (tests/nix/fake-nixpkgs/pkgs.nix) whose `path` is a fake nixpkgs tree: its
nixos/lib/eval-config.nix runs lib.evalModules over typed stand-ins for the NixOS options and
makes fake kernel, initrd and toplevel derivations named after the node.  Fake derivations have
content-addressed paths (/nix/store/<sha256 of what went in>-<name>), so a test can tell which
node's kernel or image a VM boots and recompute the path of a file mkTest wrote.
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from nixpkgs_lib import NIXPKGS_LIB, requires_nixpkgs_lib

HERE = Path(__file__).resolve().parent
pytestmark = requires_nixpkgs_lib

KERNEL_VERSION = "6.6.63"  # of the fake kernel (fake-nixpkgs/nixos/modules/system.nix)


class EvalError(Exception):
    """nix-instantiate failed; the message is its stderr."""


def _nix(tests: dict[str, Any], functions: str) -> Any:
    # --readonly-mode: source paths (scripts, the agent) are hashed, not copied to the store.
    cmd = ["nix-instantiate", "--eval", "--strict", "--json", "--readonly-mode",
           "--option", "build-users-group", "", str(HERE / "eval-mktest.nix"),
           "--argstr", "libPath", NIXPKGS_LIB, "--argstr", "tests", json.dumps(tests, sort_keys=True),
           "--arg", "functions", functions]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise EvalError(r.stderr)
    return json.loads(r.stdout)


def store_path(name: str, content: str) -> str:
    """The fake pkgs' path for `content` (a writeText's text), as fake-nixpkgs/pkgs.nix makes it."""
    return f"/nix/store/{hashlib.sha256(content.encode()).hexdigest()[:32]}-{name}"


def nix_json(value: Any) -> str:
    """builtins.toJSON of plain data: sorted keys, no spaces."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def flag(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, (name, argv)
    return argv[argv.index(name) + 1]


# --- The scenarios, evaluated together (one nix-instantiate run) -----------------------------

TWO_SCRIPT = "start_all()\na.succeed('ping -c1 b')\n"
TWO_NODES = {
    "a": {"virtualisation": {"memorySize": 2048, "vlans": [1]}},
    "b": {"virtualisation": {"memorySize": 512, "vlans": [1]}, "ntng": {"vm": {"rootSize": "8G"}}},
}
# A testScript function sees the evaluated node configurations.
FUNCTIONS = """{
  show = { nodes, ... }:
    "# ${nodes.a.networking.hostName} ${toString nodes.a.virtualisation.memorySize} "
    + "${(builtins.head nodes.b.networking.interfaces.eth0.ipv4.addresses).address} "
    + "${nodes.a.system.build.toplevel} ${nodes.b.config.networking.hostName}\\n";
}"""

SCENARIOS: dict[str, Any] = {
    "two": {"name": "two", "nodes": TWO_NODES, "testScript": TWO_SCRIPT, "globalTimeout": 1200},
    "noTypeCheck": {"name": "two", "nodes": TWO_NODES, "testScript": TWO_SCRIPT, "skipTypeCheck": True},
    "noLint": {"name": "two", "nodes": TWO_NODES, "testScript": TWO_SCRIPT, "skipLint": True},
    "tcg": {"name": "two", "nodes": TWO_NODES, "testScript": TWO_SCRIPT, "accel": "tcg"},
    "features": {"name": "two", "nodes": TWO_NODES, "testScript": TWO_SCRIPT,
                 "requiredSystemFeatures": ["nixos-test", "kvm", "big-parallel"]},
    "firecracker": {
        "name": "fc", "backend": "firecracker", "testScript": "start_all()",
        "nodes": {"a": {"virtualisation": {"memorySize": 768}},
                  "b": {"virtualisation": {"vlans": [1, 2]}}},
    },
    "mixed": {
        "name": "mixed", "testScript": "start_all()",
        "nodes": {"micro": {"ntng": {"vm": {"machineType": "microvm"}}},
                  "ch": {"ntng": {"vm": {"backend": "cloud-hypervisor"}}},
                  "plain": {"ntng": {"vm": {"display": True}}}},
    },
    "shares": {
        "name": "shares", "testScript": "start_all()",
        "nodes": {"a": {"virtualisation": {
            "mountHostNixStore": True, "msize": 262144,
            "sharedDirectories": {"data": {"source": "/srv/data", "target": "/mnt/data", "readOnly": True},
                                  "fast": {"source": "/srv/fast", "target": "/mnt/fast", "type": "virtiofs"}}},
            "ntng": {"vm": {"shareArtifacts": True}}}},
    },
    "chShares": {
        "name": "chShares", "backend": "cloud-hypervisor", "testScript": "start_all()",
        "nodes": {"a": {"virtualisation": {"mountHostNixStore": True}, "ntng": {"vm": {"shareArtifacts": True}}}},
    },
    # NixOS containers (issue 17): one container node beside a QEMU VM on a vlan.
    "container": {
        "name": "ct", "testScript": "start_all()",
        "nodes": {"box": {"virtualisation": {"vlans": [1], "sharedDirectories": {
                              "data": {"source": "/srv/data", "target": "/mnt/data", "readOnly": True}}},
                          "ntng": {"vm": {"backend": "nspawn"}}},
                  "vm": {"virtualisation": {"vlans": [1]}}},
    },
    "function": {
        "name": "fn", "testScript": {"function": "show"},
        "nodes": {"a": {"virtualisation": {"memorySize": 3000}}, "b": {}},
        "defaults": {"virtualisation": {"cores": 2}},
    },
}


@functools.cache
def results() -> Any:
    return _nix(SCENARIOS, FUNCTIONS)


def result(key: str) -> Any:
    return results()[key]


def test_every_scenario_evaluates() -> None:
    assert set(results()) == set(SCENARIOS)


# --- 1. two QEMU nodes on a vlan ------------------------------------------------------------

def test_qemu_spec_per_accelerator_boots_each_nodes_own_system() -> None:
    r = result("two")
    qemu = r["packages"]["qemu_kvm"]
    assert set(r["spec"]) == {"kvm", "tcg"}  # QEMU only: TCG too, for machines without KVM
    kernels = set()
    for accel, spec in r["spec"].items():
        assert (spec["name"], spec["nodeNames"], spec["globalTimeout"]) == ("two", ["a", "b"], 1200)
        assert (spec["skipLint"], spec["skipTypeCheck"]) == (False, False)
        for name, memory in (("a", 2048), ("b", 512)):
            node, plan = r["nodes"][name], spec["nodes"][name]
            build, argv = node["build"], plan["argv"]
            assert plan["backend"] == "qemu" and plan["accel"] == accel
            assert argv[0] == f"{qemu}/bin/qemu-system-x86_64"
            assert flag(argv, "-machine") == f"q35,accel={accel}"
            assert flag(argv, "-m") == str(memory) and plan["memory"] == memory
            # The node's own kernel (a bzImage: q35 boots it), initrd and system.
            assert build["kernel"].endswith(f"-linux-{KERNEL_VERSION}-{name}")
            assert node["loader"] == {"kernelFile": "bzImage", "initrdFile": "initrd"}
            assert flag(argv, "-kernel") == f"{build['kernel']}/bzImage"
            assert flag(argv, "-initrd") == f"{build['initialRamdisk']}/initrd"
            assert build["toplevel"].split("-", 1)[1].startswith(f"nixos-system-{name}-")
            params = flag(argv, "-append").split()
            assert params[-1] == f"init={build['toplevel']}/init"
            # The node's boot.kernelParams (the fake NixOS sets loglevel=4), nixlib's own.
            assert {"loglevel=4", "console=ttyS0,115200", "root=/dev/vda", f"systemd.hostname={name}"} <= set(params)
            # The raw ext4 image of the node's toplevel is the base of the VM's disk.
            image = node["rootfs"]["path"]
            assert plan["prepare"] == [[f"{qemu}/bin/qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw",
                                        "-b", image, f"@stateRoot@/{name}/disk.qcow2"]]
            assert node["system"] == "x86_64-linux"  # eval-config got the pkgs' system
            kernels.add(flag(argv, "-kernel"))
    assert len(kernels) == 2
    a, b = (r["nodes"][n]["rootfs"] for n in ("a", "b"))
    assert a["path"] != b["path"]


def test_rootfs_is_the_closure_of_the_nodes_toplevel() -> None:
    r = result("two")
    for name, size in (("a", "4G"), ("b", "8G")):
        node = r["nodes"][name]
        closure = store_path("closure-info", nix_json([node["build"]["toplevel"]]))
        script = node["rootfs"]["script"]
        assert f"< {closure}/store-paths" in script
        assert f"cp {closure}/registration tree/nix-path-registration" in script
        last = script.strip().splitlines()[-1].split()
        assert last[0] == "sh" and last[1].endswith("-mkext4.sh") and last[2:] == ["tree", "$out", size, "nixos"]
        assert node["rootfs"]["name"] == "ntng-rootfs.ext4"
        assert any(p.endswith("-e2fsprogs-1.47.1") for p in node["rootfs"]["nativeBuildInputs"])


def test_network_plan_reaches_vmm_and_guest() -> None:
    r = result("two")
    macs = set()
    for number, name in enumerate(("a", "b"), start=1):
        node = r["nodes"][name]
        for spec in r["spec"].values():
            plan = spec["nodes"][name]
            assert [i["guestName"] for i in plan["interfaces"]] == ["eth0"]
            iface = plan["interfaces"][0]
            assert iface["bridge"] == "ntng-br1"
            argv = plan["argv"]
            assert f"tap,id=net0,ifname={iface['tap']},script=no,downscript=no" in argv
            assert f"virtio-net-pci,netdev=net0,mac={iface['mac']}" in argv
        macs.add(iface["mac"])
        assert node["interfaces"] == {"eth0": {
            "ipv4": {"addresses": [{"address": f"192.168.1.{number}", "prefixLength": 24}]},
            "ipv6": {"addresses": [{"address": f"2001:db8:1::{number}", "prefixLength": 64}]},
        }}
        # The guest names its NIC by the MAC the VMM gives it.
        assert node["links"] == {"10-ntng-eth0": {
            "enable": True, "matchConfig": {"MACAddress": iface["mac"]}, "linkConfig": {"Name": "eth0"}}}
        assert {"192.168.1.1 a", "192.168.1.2 b", "2001:db8:1::1 a"} <= set(node["extraHosts"].splitlines())
        assert node["hostName"] == name
        assert node["fileSystems"]["/"]["device"] == "/dev/vda" and node["fileSystems"]["/"]["fsType"] == "ext4"
    assert len(macs) == 2
    assert r["spec"]["kvm"]["network"]["vlans"]["1"]["members"] == ["a", "b"]


def test_qemu_backdoor_matches_on_both_sides() -> None:
    r = result("two")
    for name in ("a", "b"):
        node, plan = r["nodes"][name], r["spec"]["kvm"]["nodes"][name]
        assert node["backdoor"]["transport"] == "virtconsole" and node["backdoor"]["port"] == "org.ntng.backdoor"
        assert node["backdoorUnit"]["serviceConfig"]["ExecStart"].split()[1:] == ["--port-name", "org.ntng.backdoor"]
        assert plan["backdoor"]["transport"] == "virtio-serial"
        assert "virtserialport,bus=vser0.0,chardev=backdoor,name=org.ntng.backdoor" in plan["argv"]
        assert node["serialGettys"] == {}


def test_run_derivation_runs_the_driver_under_kvm() -> None:
    r = result("two")
    run = r["run"]
    assert run["name"] == "ntng-test-two"
    assert run["requiredSystemFeatures"] == ["nixos-test", "kvm"]
    assert run["meta"]["timeout"] == 1200
    assert run["script"].strip() == f"{r['driver']['path']}/bin/nixos-test-driver --accel kvm --output-directory $out"
    assert r["driverSpecIsTheSpec"] is True and r["driverNodesAreTheNodes"] is True


def test_run_derivation_under_tcg_needs_no_kvm_and_features_are_the_callers() -> None:
    run = result("tcg")["run"]
    assert run["requiredSystemFeatures"] == ["nixos-test"]
    assert run["script"].strip().endswith("/bin/nixos-test-driver --accel tcg --output-directory $out")
    assert result("features")["run"]["requiredSystemFeatures"] == ["nixos-test", "kvm", "big-parallel"]


def driver_lines(script: str) -> tuple[list[str], list[str]]:
    """The build script's lines outside the heredoc, and the lines of the wrapper it writes."""
    lines = script.splitlines()
    start = lines.index("cat > $out/bin/nixos-test-driver <<EOF")
    end = lines.index("EOF", start)
    return lines[:start] + lines[end + 1:], lines[start + 1:end]


def test_driver_holds_specs_and_script_and_checks_the_script() -> None:
    r = result("two")
    ntng = r["packages"]["ntng"]
    driver = r["driver"]
    assert driver["name"] == "ntng-driver-two" and driver["nativeBuildInputs"] == [ntng]
    build, wrapper = driver_lines(driver["script"])
    # Each accelerator's spec, written as JSON (the same spec as passthru.spec).
    assert set(r["specFiles"]) == {"kvm", "tcg"}
    for accel in ("kvm", "tcg"):
        assert r["specFiles"][accel] == store_path(f"ntng-spec-two-{accel}.json", nix_json(r["spec"][accel]))
        assert f"cp {r['specFiles'][accel]} $out/share/ntng/spec-{accel}.json" in build
    assert f"cp {store_path('ntng-test-two.py', TWO_SCRIPT)} $out/share/ntng/test-script.py" in build
    checks = [line.split() for line in build if line.startswith("ntng check")]
    assert checks == [["ntng", "check", "--spec-dir", "$out/share/ntng", "$out/share/ntng/test-script.py"]]
    assert wrapper[0] == f"#!{r['packages']['runtimeShell']}"
    assert wrapper[1].split() == ["exec", f"{ntng}/bin/ntng", "run", "--spec-dir", "$out/share/ntng",
                                  '"\\$@"', "$out/share/ntng/test-script.py"]
    assert "chmod +x $out/bin/nixos-test-driver" in build


def test_driver_interactive_passes_interactive() -> None:
    r = result("two")
    d, i = r["driver"], r["driverInteractive"]
    assert i["name"] == "ntng-driver-two-interactive" and i["path"] != d["path"]
    wrapper = driver_lines(i["script"])[1]
    assert wrapper[1].split() == ["exec", f"{r['packages']['ntng']}/bin/ntng", "run", "--spec-dir", "$out/share/ntng",
                                  "--interactive", '"\\$@"', "$out/share/ntng/test-script.py"]
    assert "--interactive" not in d["script"]
    assert driver_lines(i["script"])[0] == driver_lines(d["script"])[0]


def test_skip_type_check_and_skip_lint() -> None:
    no_tc, no_lint = result("noTypeCheck"), result("noLint")
    checks = [line.split() for line in driver_lines(no_tc["driver"]["script"])[0] if line.startswith("ntng check")]
    assert checks == [["ntng", "check", "--no-type-check", "--spec-dir", "$out/share/ntng",
                       "$out/share/ntng/test-script.py"]]
    assert no_tc["spec"]["kvm"]["skipTypeCheck"] is True and no_tc["spec"]["kvm"]["skipLint"] is False
    for key in ("driver", "driverInteractive"):
        script = no_lint[key]["script"]
        assert "ntng check" not in script
        assert "/bin/ntng run --spec-dir $out/share/ntng" in script  # the driver itself is still made
    assert no_lint["spec"]["tcg"]["skipLint"] is True


def test_only_the_vmms_in_use_are_dependencies() -> None:
    two, fc = result("two"), result("firecracker")
    two_spec, fc_spec = json.dumps(two["spec"]), json.dumps(fc["spec"])
    p = two["packages"]
    assert p["qemu_kvm"] in two_spec
    assert p["firecracker"] not in two_spec and p["cloud-hypervisor"] not in two_spec
    assert p["firecracker"] in fc_spec and p["qemu_kvm"] not in fc_spec
    mixed_spec = json.dumps(result("mixed")["spec"])
    assert p["qemu_kvm"] in mixed_spec and p["cloud-hypervisor"] in mixed_spec and p["firecracker"] not in mixed_spec


def test_a_node_with_a_display_gets_a_vga_device() -> None:
    nodes = result("mixed")["spec"]["kvm"]["nodes"]
    assert nodes["plain"]["display"] is True and "VGA" in nodes["plain"]["argv"]
    assert nodes["micro"]["display"] is False and "VGA" not in nodes["micro"]["argv"]


def test_a_node_with_a_display_has_nixos_vt_gettys_with_a_login_prompt() -> None:
    # As on NixOS test nodes, so nixpkgs' nixos/tests/login.nix can run unchanged: agetty on
    # tty1, another VT on alt-f2, "login: " on the screen.  Headless nodes autologin root on
    # the serial console (driverInteractive); a node's own setting wins either way.
    nodes = result("mixed")["nodes"]
    assert all(n["vtGettys"] == {} for n in nodes.values())
    assert nodes["plain"]["autologinUser"] is None
    assert nodes["micro"]["autologinUser"] == "root" and nodes["ch"]["autologinUser"] == "root"
    own = _nix({"t": {"name": "own", "testScript": "start_all()", "nodes": {"a": {
        "ntng": {"vm": {"display": True}}, "services": {"getty": {"autologinUser": "alice"}}}}}}, "{}")
    assert own["t"]["nodes"]["a"]["autologinUser"] == "alice"


# --- 2. Firecracker -------------------------------------------------------------------------

def test_firecracker_boots_the_vmlinux_of_the_nodes_kernel() -> None:
    r = result("firecracker")
    assert set(r["spec"]) == {"kvm"}  # Firecracker has no TCG
    vmlinuxes = set()
    for name in ("a", "b"):
        node, plan = r["nodes"][name], r["spec"]["kvm"]["nodes"][name]
        assert plan["backend"] == "firecracker"
        assert node["nodeOptions"]["backend"] == "firecracker"
        vmlinux = node["vmlinux"]
        assert vmlinux["name"] == f"vmlinux-{KERNEL_VERSION}"
        sh, extract, *rest = vmlinux["script"].split()
        assert sh == "sh" and extract.endswith("-extract-vmlinux.sh")
        assert rest == [f"{node['build']['kernel']}/bzImage", "$out"]
        assert {p.rsplit("-", 2)[-2] for p in vmlinux["nativeBuildInputs"]} >= {"gzip", "xz", "zstd", "lz4"}
        config = plan["writeFiles"][f"@stateRoot@/{name}/firecracker.json"]
        boot = config["boot-source"]
        assert boot["kernel_image_path"] == vmlinux["path"]
        assert boot["initrd_path"] == f"{node['build']['initialRamdisk']}/initrd"
        assert f"init={node['build']['toplevel']}/init" in boot["boot_args"].split()
        assert config["machine-config"]["mem_size_mib"] == (768 if name == "a" else 1024)
        disk = f"@stateRoot@/{name}/disk.raw"
        assert ["cp", "--sparse=always", "--reflink=auto", node["rootfs"]["path"], disk] in plan["prepare"]
        assert config["drives"] == [{"drive_id": "rootfs", "path_on_host": disk, "is_root_device": True,
                                     "is_read_only": False, "cache_type": "Unsafe"}]
        assert plan["argv"][0] == f"{r['packages']['firecracker']}/bin/firecracker"
        assert plan["argv"][-2:] == ["--config-file", f"@stateRoot@/{name}/firecracker.json"]
        vmlinuxes.add(vmlinux["path"])
    assert len(vmlinuxes) == 2


def test_firecracker_taps_and_guest_interfaces() -> None:
    r = result("firecracker")
    b, plan = r["nodes"]["b"], r["spec"]["kvm"]["nodes"]["b"]
    config = plan["writeFiles"]["@stateRoot@/b/firecracker.json"]
    ifaces = plan["interfaces"]
    assert [i["vlan"] for i in ifaces] == [1, 2]
    assert config["network-interfaces"] == [
        {"iface_id": f"eth{n}", "host_dev_name": i["tap"], "guest_mac": i["mac"]} for n, i in enumerate(ifaces)]
    assert {n: v["matchConfig"]["MACAddress"] for n, v in b["links"].items()} == {
        "10-ntng-eth0": ifaces[0]["mac"], "10-ntng-eth1": ifaces[1]["mac"]}
    assert b["interfaces"]["eth1"]["ipv4"]["addresses"] == [{"address": "192.168.2.2", "prefixLength": 24}]
    assert "192.168.1.2 b" in b["extraHosts"].splitlines()


def test_firecracker_backdoor_is_vsock_on_both_sides() -> None:
    r = result("firecracker")
    for name in ("a", "b"):
        node, plan = r["nodes"][name], r["spec"]["kvm"]["nodes"][name]
        assert (node["backdoor"]["transport"], node["backdoor"]["port"]) == ("vsock", 1234)
        assert node["backdoorUnit"]["serviceConfig"]["ExecStart"].split()[1:] == ["--vsock-port", "1234"]
        assert "vmw_vsock_virtio_transport" in node["kernelModules"]
        assert plan["backdoor"] == {"transport": "vsock", "uds": f"@stateRoot@/{name}/vsock.sock", "port": 1234}
    cids = {r["spec"]["kvm"]["nodes"][n]["writeFiles"][f"@stateRoot@/{n}/firecracker.json"]["vsock"]["guest_cid"]
            for n in ("a", "b")}
    assert cids == {3, 4}


# --- 3. microvm and Cloud Hypervisor nodes --------------------------------------------------

def test_microvm_node_boots_vmlinux_and_q35_node_bzimage() -> None:
    r = result("mixed")
    assert set(r["spec"]) == {"kvm"}  # not QEMU only: no TCG spec
    micro, plain = r["spec"]["kvm"]["nodes"]["micro"], r["spec"]["kvm"]["nodes"]["plain"]
    assert flag(micro["argv"], "-machine").startswith("microvm,accel=kvm")
    assert flag(micro["argv"], "-kernel") == r["nodes"]["micro"]["vmlinux"]["path"]
    assert r["nodes"]["micro"]["build"]["kernel"] in r["nodes"]["micro"]["vmlinux"]["script"]
    assert "virtio-blk-device,drive=disk0" in micro["argv"]
    # virtio-mmio has no modalias: stage 1 must load the driver itself, only where needed.
    assert "virtio_mmio" in r["nodes"]["micro"]["initrdKernelModules"]
    assert "virtio_mmio" not in r["nodes"]["plain"]["initrdKernelModules"]
    assert flag(plain["argv"], "-machine") == "q35,accel=kvm"
    assert flag(plain["argv"], "-kernel") == f"{r['nodes']['plain']['build']['kernel']}/bzImage"


def test_cloud_hypervisor_node_serves_the_backdoor_on_hvc0() -> None:
    r = result("mixed")
    node, plan = r["nodes"]["ch"], r["spec"]["kvm"]["nodes"]["ch"]
    assert plan["backend"] == "cloud-hypervisor"
    assert plan["argv"][0] == f"{r['packages']['cloud-hypervisor']}/bin/cloud-hypervisor"
    assert plan["backdoor"]["transport"] == "virtconsole"
    body = plan["api"][0]["body"]
    assert body["console"] == {"mode": "Pty"}
    assert body["payload"]["kernel"] == f"{node['build']['kernel']}/bzImage"
    assert body["disks"][0]["path"] == "@stateRoot@/ch/disk.raw"
    assert ["cp", "--sparse=always", "--reflink=auto", node["rootfs"]["path"], "@stateRoot@/ch/disk.raw"] in plan["prepare"]
    assert (node["backdoor"]["transport"], node["backdoor"]["port"]) == ("virtconsole", "/dev/hvc0")
    assert node["backdoorUnit"]["serviceConfig"]["ExecStart"].split()[1:] == ["--device", "/dev/hvc0"]
    assert node["serialGettys"]["serial-getty@hvc0"]["enable"] is False
    assert "virtio_console" in node["kernelModules"]
    for other in ("micro", "plain"):
        assert r["nodes"][other]["serialGettys"] == {}
        assert r["nodes"][other]["backdoor"]["port"] == "org.ntng.backdoor"


# --- 4. testScript as a function ------------------------------------------------------------

def test_test_script_function_gets_the_node_configurations() -> None:
    r = result("function")
    toplevel = r["nodes"]["a"]["build"]["toplevel"]
    expected = f"# a 3000 192.168.1.2 {toplevel} b\n"  # nodes.b.config: the old spelling
    assert f"cp {store_path('ntng-test-fn.py', expected)} $out/share/ntng/test-script.py" in r["driver"]["script"]


def test_defaults_module_applies_to_every_node() -> None:
    r = result("function")
    for name in ("a", "b"):
        assert flag(r["spec"]["kvm"]["nodes"][name]["argv"], "-smp") == "2"
        assert r["nodes"][name]["virtualisation"]["cores"] == 2


# --- 5. invalid tests fail evaluation, naming the option -------------------------------------

@pytest.mark.parametrize(("test", "messages"), [
    ({"nodes": {"a": {"virtualisation": {"memorySize": "lots"}}}},
     ["`virtualisation.memorySize'", '"lots"', "nodes.a (test bad)"]),
    ({"nodes": {"a": {}, "b": {"virtualisation": {"vlans": [300]}}}},
     ["`virtualisation.vlans.", "integer between 1 and 254", "nodes.b (test bad)"]),
    ({"nodes": {"a": {"ntng": {"vm": {"backend": "bochs"}}}}}, ["`ntng.vm.backend'", '"bochs"', "nodes.a (test bad)"]),
    ({"nodes": {"a": {}}, "backend": "bochs"}, ["`ntng.vm.backend'", '"bochs"']),
    ({"nodes": {"a": {}}, "defaults": {"virtualisation": {"cores": 0}}},
     ["`virtualisation.cores'", "defaults (test bad)"]),
    ({"nodes": {"a": {}}, "backend": "firecracker", "accel": "tcg"},
     ['accel = "tcg" needs QEMU nodes only (this test uses firecracker)']),
    ({"nodes": {"a": {}}, "accel": "hvf"}, ['mkTest bad: accel must be "kvm" or "tcg", got "hvf"']),
    # The fake NixOS refuses to build a system whose assertions fail, as NixOS does.
    ({"nodes": {"a": {"assertions": [{"assertion": False, "message": "node a is broken"}]}}},
     ["Failed assertions:", "- node a is broken"]),
])
def test_invalid_test_fails_naming_the_option(test: dict[str, Any], messages: list[str]) -> None:
    with pytest.raises(EvalError) as e:
        _nix({"bad": {"name": "bad", "testScript": "", **test}}, "{ }")
    for m in messages:
        assert m in str(e.value), (m, str(e.value))


# --- shared directories ---------------------------------------------------------------------

def test_shared_directories_reach_qemu_and_the_guest_mounts() -> None:
    r = result("shares")
    node = r["nodes"]["a"]
    fs = node["fileSystems"]
    # The host store read-only where the NixOS driver puts it, mounted in stage 1.
    assert fs["/nix/.ro-store"] == {
        "device": "nix-store", "fsType": "9p", "neededForBoot": True,
        "options": ["trans=virtio", "version=9p2000.L", "msize=262144",
                    "x-systemd.requires=modprobe@9pnet_virtio.service", "cache=loose", "ro"]}
    assert fs["/mnt/data"]["options"][-1] == "ro" and not fs["/mnt/data"]["neededForBoot"]
    assert fs["/mnt/fast"] == {"device": "fast", "fsType": "virtiofs", "neededForBoot": False, "options": ["defaults"]}
    assert fs["/tmp/shared"]["device"] == "shared"
    assert {"9p", "9pnet_virtio", "virtiofs"} <= set(node["initrdAvailableKernelModules"])
    assert "virtiofs" not in result("two")["nodes"]["a"]["initrdAvailableKernelModules"]
    plan = r["spec"]["kvm"]["nodes"]["a"]
    fsdevs = [plan["argv"][i + 1] for i, a in enumerate(plan["argv"]) if a == "-fsdev"]
    assert any("path=/nix/store,security_model=none,readonly=on" in f for f in fsdevs)
    assert any("path=@artifacts@/a-shared" in f for f in fsdevs)
    assert [h["name"] for h in plan["helpers"]] == ["virtiofsd-fast"]
    assert plan["helpers"][0]["argv"][0] == "virtiofsd"  # on the flake ntng's PATH (nixlib/tools.nix)
    assert {s["tag"] for s in plan["shares"]} == {"data", "fast", "nix-store", "shared"}


def test_cloud_hypervisor_shares_are_virtiofs() -> None:
    r = result("chShares")
    fs = r["nodes"]["a"]["fileSystems"]
    assert fs["/nix/.ro-store"]["fsType"] == "virtiofs" and fs["/nix/.ro-store"]["options"] == ["defaults", "ro"]
    assert fs["/tmp/shared"]["fsType"] == "virtiofs"
    plan = r["spec"]["kvm"]["nodes"]["a"]
    assert [h["name"] for h in plan["helpers"]] == ["virtiofsd-nix-store", "virtiofsd-shared"]


# --- NixOS containers (ntng.vm.backend = "nspawn"): evaluated, never booted here ---------------

def test_a_nixos_container_runs_its_init_with_the_store_read_only() -> None:
    r = result("container")
    node, plan = r["nodes"]["box"], r["spec"]["kvm"]["nodes"]["box"]
    init = f"{node['build']['toplevel']}/init"
    assert plan["backend"] == "nspawn" and plan["init"] == init and plan["tree"] is None
    argv = plan["argv"]
    assert argv.index(init) > argv.index("--bind-ro=/srv/data:/mnt/data")  # the command, after the options
    assert "--bind-ro=/nix/store" in argv and "--boot" not in argv
    assert "--directory=@stateRoot@/box/layer/root" in argv and plan["files"]["disk"] == "@stateRoot@/box/layer/root"
    assert "--bind-ro=/srv/data:/mnt/data" in argv  # shares are bind mounts
    assert argv[:2] == [f"{r['packages']['util-linux']}/bin/unshare", "--pid"]
    assert f"{r['packages']['systemd']}/bin/systemd-nspawn" in argv
    # init's arguments (systemd's, in a container): the agent's folder and nothing for a kernel.
    args = argv[argv.index(init) + 1:]
    assert "ntng.backdoor=unix:/run/ntng-host" in args
    assert all(a.startswith(("systemd.", "ntng.")) or a == "quiet" for a in args), args
    assert plan["backdoor"]["transport"] == "unix" and plan["backdoor"]["guestFolder"] == "/run/ntng-host"
    # The system is a container: nothing to mount, no initrd modules, no kernel parameters of
    # its own; the rootfs image and the kernel are not in the spec (nothing to build for them).
    assert node["isContainer"] is True and node["fileSystems"] == {}
    assert node["kernelParams"] == [] and node["initrdAvailableKernelModules"] == []
    spec_text = json.dumps(r["spec"])
    assert node["rootfs"]["path"] not in spec_text and node["build"]["kernel"] not in spec_text
    # The VM beside it is as before; a container runs beside TCG QEMU nodes too.
    assert r["spec"]["kvm"]["nodes"]["vm"]["backend"] == "qemu" and set(r["spec"]) == {"kvm", "tcg"}
    assert r["nodes"]["vm"]["isContainer"] is False


def test_the_containers_agent_serves_the_folder_init_names() -> None:
    node = result("container")["nodes"]["box"]
    assert (node["backdoor"]["transport"], node["backdoor"]["port"]) == ("unix", "/run/ntng-host")
    unit = node["backdoorUnit"]
    assert unit["serviceConfig"]["ExecStart"].split()[1:] == ["--from-cmdline"]
    assert unit["unitConfig"]["ConditionKernelCommandLine"] == "ntng.backdoor=unix:/run/ntng-host"
    assert "ExecStartPre" not in unit["serviceConfig"]  # no modules to load in a container
    assert node["kernelModules"] == [] and node["serialGettys"] == {}
    vm = result("container")["nodes"]["vm"]["backdoorUnit"]
    assert "ConditionKernelCommandLine" not in vm["unitConfig"]
