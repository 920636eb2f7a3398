"""Shared directories (one boot): 9p and virtiofs shares seen both ways, read-only enforced,
copies through the artifacts share, and the error when virtiofsd is missing (no boot)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import make_driver
from ntng.driver import Driver
from ntng.errors import SetupError
from ntng.machine import Machine
from ntng.shares import ShareError


def header(host: Path, virtiofsd: str | None = None) -> str:
    extra = f' virtiofsd = "{virtiofsd}";' if virtiofsd else ""
    return (
        "#: nodes.machine = { shareArtifacts = true;" + extra + "\n"
        f'#:   sharedDirs.rw9p = {{ source = "{host}/rw9p"; target = "/mnt/rw9p"; }};\n'
        f'#:   sharedDirs.ro9p = {{ source = "{host}/ro9p"; target = "/mnt/ro9p"; readOnly = true; }};\n'
        f'#:   sharedDirs.vfs = {{ source = "{host}/vfs"; target = "/mnt/vfs"; type = "virtiofs"; }};\n'
        f'#:   sharedDirs.vfsro = {{ source = "{host}/vfsro"; target = "/mnt/vfsro"; type = "virtiofs"; readOnly = true; }};\n'
        "#: };\n"
    )


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shares-host")
    for d in ("rw9p", "ro9p", "vfs", "vfsro"):
        (root / d).mkdir()
        (root / d / "from-host").write_text(f"hello from the host in {d}\n")
    return root


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory, host: Path, guest_image: object) -> Iterator[Driver]:
    with make_driver(tmp_path_factory.mktemp("shares"), header(host)) as d:
        d.machines[0].start()
        d.machines[0].connect()
        yield d


@pytest.fixture(scope="module")
def vm(driver: Driver) -> Machine:
    return driver.machines[0]


@pytest.mark.parametrize("share", ["rw9p", "ro9p", "vfs", "vfsro"])
def test_host_files_are_seen_in_the_guest(vm: Machine, share: str) -> None:
    assert vm.succeed(f"cat /mnt/{share}/from-host") == f"hello from the host in {share}\n"
    fstype = "9p" if "9p" in share else "virtiofs"
    assert vm.succeed(f"findmnt -n -o FSTYPE /mnt/{share}").strip() == fstype


@pytest.mark.parametrize("share", ["rw9p", "vfs"])
def test_guest_writes_are_seen_on_the_host(vm: Machine, host: Path, share: str) -> None:
    vm.succeed(f"mkdir -p /mnt/{share}/sub && echo guest > /mnt/{share}/sub/from-guest")
    assert (host / share / "sub" / "from-guest").read_text() == "guest\n"
    # and the other way round, after the mount: no stale cache
    (host / share / "later").write_text("later\n")
    assert vm.succeed(f"cat /mnt/{share}/later") == "later\n"


@pytest.mark.parametrize("share", ["ro9p", "vfsro"])
def test_read_only_shares_refuse_writes(vm: Machine, host: Path, share: str) -> None:
    for write in (f"echo x > /mnt/{share}/new", f"touch /mnt/{share}/from-host"):
        status, out = vm.execute(f"{{ {write}; }} 2>&1")
        assert status != 0 and "Read-only file system" in out, (write, out)
    assert not (host / share / "new").exists()


def test_artifacts_share_is_in_the_run_folder(vm: Machine) -> None:
    vm.succeed("echo artefact > /tmp/shared/report.txt")
    assert (vm.out_dir / "machine-shared" / "report.txt").read_text() == "artefact\n"


def test_copy_via_share_both_ways(vm: Machine, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    blob = os.urandom(3 * 1024 * 1024)
    (tree / "a" / "b" / "blob").write_bytes(blob)
    (tree / "top").write_text("top\n")
    vm.copy_from_host(str(tree), "/root/tree", via="share")
    digest = hashlib.sha256(blob).hexdigest()
    assert vm.succeed("sha256sum < /root/tree/a/b/blob").split()[0] == digest
    vm.copy_from_host(str(tree / "top"), "/root/one/top.txt", via="share")
    assert vm.succeed("cat /root/one/top.txt") == "top\n"

    vm.copy_from_machine("/root/tree", "back", via="share")
    assert (vm.out_dir / "back" / "tree" / "a" / "b" / "blob").read_bytes() == blob
    vm.copy_from_vm("/root/one/top.txt", via="share")  # the NixOS name, into out_dir
    assert (vm.out_dir / "top.txt").read_text() == "top\n"
    # nothing staged is left behind on either side
    assert not list((vm.out_dir / "machine-shared").glob(".ntng-copy-*"))
    # the protocol stays the default
    vm.copy_from_host(str(tree / "top"), "/root/proto.txt")
    assert vm.succeed("cat /root/proto.txt") == "top\n"


def test_copy_via_share_errors(vm: Machine, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="via must be one of 'protocol', 'share'"):
        vm.copy_from_machine("/etc/hostname", via="9p")
    with pytest.raises(Exception, match="does not exist in machine"):
        vm.copy_from_machine("/nonexistent", via="share")
    plan = vm.plan
    try:
        vm.plan = {**plan, "shares": [s for s in plan["shares"] if s["readOnly"]]}
        with pytest.raises(ShareError, match=r"needs a writable shared directory.*shareArtifacts = true"):
            vm.copy_from_host(str(Path(__file__)), "/tmp/x", via="share")
    finally:
        vm.plan = plan


def test_missing_virtiofsd_is_a_clear_error_before_qemu_starts(tmp_path: Path, host: Path) -> None:
    with make_driver(tmp_path, header(host, virtiofsd="/nonexistent/virtiofsd")) as d:
        with pytest.raises(SetupError, match=r"/nonexistent/virtiofsd not found; virtiofs share 'vfs' "
                                             r"needs virtiofsd: apt-get install qemu-system-common"):
            d.machines[0].start()
        assert d.machines[0].backend.pid is None  # QEMU was never started


def host_view(vm: Machine, host_dir: Path, guest_dir: str) -> tuple[int, bool]:
    """Guest root makes a 6777 file and a device node in a share: (the host file's mode bits,
    whether the host got a real device node)."""
    vm.succeed(f"rm -f {guest_dir}/suid {guest_dir}/null; touch {guest_dir}/suid && chmod 6777 {guest_dir}/suid")
    vm.execute(f"mknod {guest_dir}/null c 1 3")  # may be refused: fine
    import stat
    mode = stat.S_IMODE((host_dir / "suid").stat().st_mode)
    null = host_dir / "null"
    return mode, null.exists() and stat.S_ISCHR(null.lstat().st_mode)


@pytest.mark.parametrize("share", ["rw9p", "artifacts"])
def test_guest_root_makes_no_setuid_file_or_device_on_the_host_through_9p(vm: Machine, host: Path, share: str) -> None:
    host_dir, guest_dir = ((host / "rw9p", "/mnt/rw9p") if share == "rw9p"
                           else (vm.out_dir / "machine-shared", "/tmp/shared"))
    mode, device = host_view(vm, host_dir, guest_dir)
    assert mode & 0o6000 == 0, oct(mode)
    assert not device
    # the guest still sees what it asked for (kept in the share's xattrs)
    assert vm.succeed(f"stat -c %a {guest_dir}/suid").strip() == "6777"
