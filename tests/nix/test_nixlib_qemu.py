"""nixlib computes every launch detail; Python executes it verbatim."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from ntng import nixeval, pdeathsig
from ntng.backends.qemu import QemuBackend
from ntng.errors import NixEvalError, SetupError

ROOT = Path(__file__).resolve().parents[2]
BASE = {"name": "m", "kernel": "/k", "image": "/img.qcow2", "stateDir": "/tmp/ntng-test-state/m"}


def launch(**over: Any) -> Any:
    return nixeval.call("qemu.launch", {**BASE, **over})


def test_launch_plan_shape() -> None:
    plan = launch(memory=512, cores=2, accel="tcg", initrd="/i")
    argv = plan["argv"]
    assert argv[0] == "qemu-system-x86_64"
    assert argv[argv.index("-m") + 1] == "512" and argv[argv.index("-smp") + 1] == "2"
    assert "q35,accel=tcg" in argv and "-initrd" in argv
    assert any("virtserialport" in a and "name=org.ntng.backdoor" in a for a in argv)
    assert plan["prepare"][0][:2] == ["qemu-img", "create"]
    assert plan["sockets"]["backdoor"].startswith(BASE["stateDir"])
    assert launch(accel="kvm")["argv"][launch(accel="kvm")["argv"].index("-cpu") + 1] == "host"
    assert "-no-reboot" in launch(allowReboot=False)["argv"]


def test_no_duplicate_devices_or_ids() -> None:
    argv = launch(extraSerialPorts=["a.b", "c"])["argv"]
    ids = [m.group(1) for a in argv for m in [re.search(r"(?:^|,)id=([^,]+)", a)] if m]
    assert len(ids) == len(set(ids)), ids
    flags = [a for a in argv if a in ("-m", "-smp", "-kernel", "-machine", "-cpu", "-serial")]
    assert len(flags) == len(set(flags)), flags


def test_display_adds_vga_and_a_tty0_console() -> None:
    plain = launch()
    assert "VGA" not in plain["argv"] and plain["display"] is False
    plan = launch(display=True)
    argv = plan["argv"]
    # Headless still (screendump reads the VGA device), with the kernel console on the screen
    # too; ttyS0 stays last, so /dev/console is still the serial line.
    assert argv[argv.index("-display") + 1] == "none" and argv[argv.index("VGA") - 1] == "-device"
    params = argv[argv.index("-append") + 1].split()
    assert params.index("console=tty0") < params.index("console=ttyS0,115200")
    assert plan["display"] is True


def test_vsock_transports() -> None:
    serial = launch()
    assert "ntng.backdoor=virtio-serial:org.ntng.backdoor" in serial["argv"][serial["argv"].index("-append") + 1]
    assert serial["helpers"] == [] and not serial["restartOnReboot"]
    # Hybrid: vhost-device-vsock serves the device over vhost-user (guest RAM shared) and the
    # host end on a unix socket; its reset breaks the device, so a reboot restarts the VM.
    hybrid = launch(backdoor={"transport": "vsock", "guestCid": 7})
    argv = hybrid["argv"]
    assert "ntng.backdoor=vsock:1234" in argv[argv.index("-append") + 1]
    assert any(a.startswith("memory-backend-memfd,") and "share=on" in a for a in argv)
    assert any(a.startswith("vhost-user-vsock-pci,chardev=") for a in argv)
    [helper] = hybrid["helpers"]
    assert helper["name"] == "vhost-device-vsock" and "--guest-cid=7" in helper["argv"]
    assert hybrid["backdoor"]["uds"] == hybrid["sockets"]["vsock"] and hybrid["backdoor"]["port"] == 1234
    assert "-no-reboot" in argv and hybrid["restartOnReboot"] is True
    assert launch(backdoor={"transport": "vsock"}, allowReboot=False)["restartOnReboot"] is False
    # vhost-vsock: the kernel's device, AF_VSOCK on the host; no helper (the RAM memfd is q35's
    # default, for snapshots; the device does not need it).
    vhost = launch(backdoor={"transport": "vsock", "guestCid": 7, "vhost": True})
    argv = vhost["argv"]
    assert "vhost-vsock-pci,guest-cid=7" in argv and vhost["ram"] == {"kind": "memfd"}
    assert vhost["helpers"] == [] and "vsock" not in vhost["sockets"]
    assert (vhost["backdoor"]["cid"], vhost["backdoor"]["port"]) == (7, 1234)
    assert "-no-reboot" not in argv and vhost["restartOnReboot"] is False


def test_vhost_vsock_needs_the_device(tmp_path: Path) -> None:
    plan = launch(backdoor={"transport": "vsock", "vhost": True}, stateDir=str(tmp_path / "m"))
    backend = QemuBackend("m", plan)
    if Path("/dev/vhost-vsock").exists():
        pytest.skip("this host has /dev/vhost-vsock")
    with pytest.raises(SetupError, match=r"^m: backdoor.vhost = true needs /dev/vhost-vsock"):
        backend.start()
    assert backend.proc is None and backend.helpers == []


def test_plans_are_stable_across_evaluations() -> None:
    assert launch() == launch()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"memory": "1G"}, "node 'm': memory must be an integer number of MiB"),
        ({"memory": 64}, "memory must be between 128 and 65536"),
        ({"cores": 0}, "cores must be an integer from 1 to 64"),
        ({"accel": "hvf"}, "accel must be \"kvm\" or \"tcg\""),
        ({"backend": "bochs"}, "unknown backend \"bochs\""),
        ({"colour": "red"}, "unknown option(s) colour"),
        ({"kernelParams": "quiet"}, "kernelParams must be a list"),
        ({"allowReboot": "yes"}, "allowReboot must be a boolean"),
        ({"extraSerialPorts": ["Bad Name"]}, "extraSerialPorts must be a list of port names"),
        ({"backdoor": {"transport": "carrier-pigeon"}}, "backdoor.transport must be"),
    ],
)
def test_each_validation_names_node_and_option(override: dict[str, Any], message: str) -> None:
    with pytest.raises(NixEvalError) as e:
        launch(**override)
    assert message in str(e.value)
    assert "\n" not in str(e.value)  # one clear line, the Nix trace only on request


def test_missing_required_options() -> None:
    for key, message in (("kernel", "kernel (path to the guest kernel) is required"),
                         ("image", "image (path to the base disk image) is required")):
        spec = {k: v for k, v in BASE.items() if k != key}
        with pytest.raises(NixEvalError, match=re.escape(message)):
            nixeval.call("qemu.launch", spec)


def test_backend_executes_the_plan_verbatim(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    plan = nixeval.call("qemu.launch", {**BASE, "stateDir": str(tmp_path / "m"), "qemuImg": "true"})
    seen: list[list[str]] = []

    class Stop(Exception):
        pass

    def fake_spawn(argv: list[str], **kw: object) -> object:
        seen.append(argv)
        raise Stop

    monkeypatch.setattr(pdeathsig, "spawn", fake_spawn)
    with pytest.raises(Stop):
        QemuBackend("m", plan).start()
    assert seen == [plan["argv"]]


def test_python_builds_no_vm_command_line() -> None:
    """No QEMU option is spelled anywhere in the runner: they all come from nixlib."""
    qemu_flags = re.compile(r"""["'](-chardev|-device|-machine|-kernel|-append|-drive|-netdev|-smp)["']""")
    offenders = [
        f"{p.relative_to(ROOT)}:{i + 1}"
        for p in (ROOT / "python" / "ntng").rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines())
        if qemu_flags.search(line)
    ]
    assert offenders == []


def test_disk_boot_without_a_kernel() -> None:
    argv = launch(kernel=None, initrd=None)["argv"]
    assert argv[argv.index("-boot") + 1] == "order=c"
    assert "-kernel" not in argv and "-append" not in argv and "-initrd" not in argv
    for over, message in (({"machineType": "microvm"}, "kernel = null (disk boot) needs firmware"),
                          ({"initrd": "/i"}, "initrd and kernelParams have no effect with kernel = null")):
        with pytest.raises(NixEvalError, match=re.escape(message)):
            launch(kernel=None, **over)


def test_disk_boot_in_a_test_spec_drops_the_runners_initrd() -> None:
    spec = nixeval.call("testSpec", {
        "header": {"nodes": {"a": {"kernel": None}, "b": {}}},
        "defaults": {"kernel": "/k", "initrd": "/i", "image": "/img", "accel": "tcg", "stateRoot": "/r"}})
    assert "-boot" in spec["nodes"]["a"]["argv"] and "-initrd" not in spec["nodes"]["a"]["argv"]
    assert "systemd.hostname=b" in " ".join(spec["nodes"]["b"]["argv"])


@pytest.mark.parametrize("machine", ["q35", "pc", "microvm"])
def test_the_backdoor_key_reaches_the_guest_by_fw_cfg(machine: str) -> None:
    """The run's secret goes to the guest as a fw_cfg file: QEMU's argv names only its path, in
    the node's (0700) state folder, where the runner writes it before QEMU starts."""
    key = f"{BASE['stateDir']}/backdoor.key"
    for transport in ("virtio-serial", "vsock"):
        plan = launch(machineType=machine, backdoor={"transport": transport}, restore=None)
        assert plan["backdoor"]["keyFile"] == key
        argv = plan["argv"]
        assert argv[argv.index("-fw_cfg") + 1] == f"name=opt/org.ntng/backdoor-key,file={key}"
        assert argv.count("-fw_cfg") == 1
    if machine != "microvm":  # a clone's restore starts QEMU with the clone's own key
        clone = launch(machineType=machine, restore={"disk": "/s/disk.qcow2", "ram": "/s/ram"})
        restore = clone["restoreArgv"]
        assert restore[restore.index("-fw_cfg") + 1] == f"name=opt/org.ntng/backdoor-key,file={key}"
