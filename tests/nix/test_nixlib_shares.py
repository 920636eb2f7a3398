"""Shared directories in nixlib: node options → QEMU arguments, virtiofsd helpers, guest mounts."""

from __future__ import annotations

from typing import Any

from ntng import nixeval, testspec

BASE = {"name": "m", "kernel": "/k", "image": "/img.qcow2", "stateDir": "/s/m"}
RO9P = {"source": "/srv/ro", "target": "/mnt/ro", "readOnly": True}
VFS = {"source": "/srv/vfs", "target": "/mnt/vfs", "type": "virtiofs"}


def launch(**over: Any) -> Any:
    return nixeval.call("qemu.launch", {**BASE, **over})


def after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_9p_share_is_served_by_qemu() -> None:
    plan = launch(sharedDirs={"ro": RO9P, "rw": {"source": "/srv/rw", "target": "/mnt/rw",
                                                  "securityModel": "mapped-xattr"}})
    argv = plan["argv"]
    assert after(argv, "-fsdev") == ["local,id=fs0,path=/srv/ro,security_model=none,readonly=on",
                                     "local,id=fs1,path=/srv/rw,security_model=mapped-xattr"]
    assert "virtio-9p-pci,fsdev=fs0,mount_tag=ro" in after(argv, "-device")
    assert plan["helpers"] == []
    # 9p needs no shared memory: on microvm (where RAM is a memfd only when shared) there is none
    micro = launch(machineType="microvm", sharedDirs={"ro": RO9P})["argv"]
    assert not any("memory-backend" in a for a in micro) and "-numa" not in micro
    cmdline = after(argv, "-append")[0].split()
    assert "ntng.share=ro,9p,/mnt/ro,ro" in cmdline and "ntng.share=rw,9p,/mnt/rw,rw" in cmdline
    assert [s["tag"] for s in plan["shares"]] == ["ro", "rw"]


def test_virtiofs_share_gets_a_virtiofsd_and_shared_memory() -> None:
    plan = launch(sharedDirs={"vfs": VFS}, virtiofsd="/opt/virtiofsd")
    argv = plan["argv"]
    assert after(argv, "-object") == ["memory-backend-memfd,id=mem0,size=1024M,share=on"]
    assert after(argv, "-numa") == ["node,memdev=mem0"]
    assert "socket,id=fs0,path=/s/m/virtiofs-vfs.sock" in after(argv, "-chardev")
    assert "vhost-user-fs-pci,chardev=fs0,tag=vfs" in after(argv, "-device")
    [helper] = plan["helpers"]
    assert helper["argv"][:2] == ["/opt/virtiofsd", "--socket-path=/s/m/virtiofs-vfs.sock"]
    assert "source=/srv/vfs" in helper["argv"] and helper["waitFor"] == "/s/m/virtiofs-vfs.sock"
    assert "apt-get install qemu-system-common" in helper["missing"]


def test_virtiofs_and_vsock_share_one_memory_backend() -> None:
    plan = launch(sharedDirs={"vfs": VFS}, backdoor={"transport": "vsock"})
    argv = plan["argv"]
    assert after(argv, "-object") == ["memory-backend-memfd,id=mem0,size=1024M,share=on"]
    assert [h["name"] for h in plan["helpers"]] == ["vhost-device-vsock", "virtiofsd-vfs"]
    assert argv.count("-numa") == 1


def test_microvm_uses_mmio_devices() -> None:
    argv = launch(machineType="microvm", sharedDirs={"ro": RO9P, "vfs": VFS})["argv"]
    devices = after(argv, "-device")
    assert "virtio-9p-device,fsdev=fs0,mount_tag=ro" in devices
    assert "vhost-user-fs-device,chardev=fs1,tag=vfs" in devices


def test_artifacts_share_lives_in_the_run_folder() -> None:
    plan = launch(shareArtifacts=True)
    [share] = plan["shares"]
    assert share == {"tag": "shared", "type": "9p", "source": "@artifacts@/m-shared", "target": "/tmp/shared",
                     "readOnly": False, "securityModel": "mapped-xattr", "create": True}
    run = testspec.substitute(plan, testspec.ARTIFACTS_MARKER, "/out/run-1")
    assert "local,id=fs0,path=/out/run-1/m-shared,security_model=mapped-xattr" in after(run["argv"], "-fsdev")


def test_writable_9p_shares_default_to_mapped_xattr() -> None:
    # QEMU runs as root: with "none", guest root makes setuid-root files and device nodes on the host.
    plan = launch(sharedDirs={"ro": RO9P, "rw": {"source": "/srv/rw", "target": "/mnt/rw"},
                              "open": {"source": "/srv/o", "target": "/mnt/o", "securityModel": "none"},
                              "vfs": {"source": "/srv/v", "target": "/mnt/v", "type": "virtiofs"}})
    assert after(plan["argv"], "-fsdev") == ["local,id=fs0,path=/srv/o,security_model=none",
                                             "local,id=fs1,path=/srv/ro,security_model=none,readonly=on",
                                             "local,id=fs2,path=/srv/rw,security_model=mapped-xattr"]
    assert {s["tag"]: s["securityModel"] for s in plan["shares"]} == {
        "open": "none", "ro": "none", "rw": "mapped-xattr", "vfs": "none"}


def test_no_shares_no_arguments() -> None:
    plan = launch()
    assert plan["shares"] == [] and "-fsdev" not in plan["argv"]
    assert not any("ntng.share=" in a for a in plan["argv"])


def test_capabilities_say_which_share_types() -> None:
    plan = launch()
    assert plan["capabilities"]["shareTypes"] == ["9p", "virtiofs"]
    assert "sharedDirs" in plan["capabilities"]["features"]
