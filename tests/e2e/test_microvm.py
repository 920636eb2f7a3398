"""The Firecracker shape, for real under TCG: QEMU `-M microvm` (no firmware, no PCI, virtio-mmio)
boots the ELF vmlinux that nixlib/scripts/extract-vmlinux.sh took out of the Debian bzImage,
with the raw ext4 image that nixlib/scripts/mkext4.sh made of the guest tree on virtio-blk, and
the agent answers through the backdoor."""

from __future__ import annotations

from pathlib import Path

from helpers import make_driver
from ntng.image import GuestImage

SCRIPT = '#: nodes.micro = { machineType = "microvm"; memory = 512; };\n'


def test_microvm_boots_vmlinux_and_ext4_and_the_agent_answers(
        tmp_path: Path, guest_image: GuestImage) -> None:
    driver = make_driver(tmp_path, SCRIPT)
    m = driver.machines[0]
    argv = m.backend.plan["argv"]
    assert argv[argv.index("-kernel") + 1] == str(guest_image.vmlinux)
    assert argv[argv.index("-machine") + 1].startswith("microvm,")
    assert guest_image.vmlinux.read_bytes()[:4] == b"\x7fELF"
    with open(guest_image.base, "rb") as f:  # ext4 superblock magic 0xEF53 at 1024 + 56
        f.seek(1024 + 56)
        assert f.read(2) == b"\x53\xef"
    try:
        m.start()
        assert m.succeed("echo answered").strip() == "answered"
        # microvm has fw_cfg too: the agent got the run's key and proved it
        assert m.client is not None and m.client.agent is not None
        assert "auth" in m.client.agent.capabilities
        # No PCI bus at all; the root disk hangs off virtio-mmio.
        assert m.succeed("ls /sys/bus/pci/devices 2>/dev/null | wc -l").strip() == "0"
        # vda → virtio0 → its platform device (ACPI LNRO0005), bound to the virtio-mmio driver.
        driver_link = m.succeed("readlink -f /sys/block/vda/device/../driver").strip()
        assert driver_link.endswith("/virtio-mmio"), driver_link
        assert m.succeed("findmnt -no FSTYPE,SOURCE /").split() == ["ext4", "/dev/vda"]
        assert m.succeed("hostname").strip() == "micro"
    finally:
        driver.release()
    assert not m.backend.alive()
