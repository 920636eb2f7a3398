"""The Debian guest image for running tests without Nix: debootstrap → configure → ext4.

Two cache levels under the user's cache dir, each keyed by a hash of its inputs:
  rootfs-<h>/  the debootstrapped tree (minutes; changes only with the package list or suite)
  image-<h>/   root.ext4 + vmlinuz + vmlinux + initrd.img, and tree/ (the configured root tree
               root.ext4 is made from, which containers boot) (seconds; changes with the agent
               or config)
root.ext4 is a raw, sparse ext4 file system made by nixlib/scripts/mkext4.sh and vmlinux the
ELF kernel made by nixlib/scripts/extract-vmlinux.sh: the same artefacts, from the same scripts,
that the Nix derivations make for Firecracker-shaped VMs.  A VM never writes to root.ext4: each
boots on a throwaway qcow2 overlay or a private copy (nixlib computes which).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from . import paths
from .errors import SetupError

PACKAGES = [
    "systemd", "systemd-sysv", "udev", "dbus", "kmod", "python3", "python3-construct",
    "openssh-server", "openssh-client", "iproute2", "iputils-ping", "rsync", "procps",
    "netcat-openbsd", "linux-image-amd64", "initramfs-tools", "psmisc", "less",
]
# virtio_mmio: the Firecracker-shaped boot (QEMU -M microvm) has no PCI bus.
INITRD_MODULES = ["virtio_pci", "virtio_mmio", "virtio_blk", "virtio_console", "virtio_net", "virtio_rng", "ext4",
                  "crc32c_generic"]
IMAGE_SIZE = "6G"  # sparse: only used blocks take space
KEEP_IMAGES = 3  # newest used first
FORMAT_VERSION = "4"  # bump when the configure step changes in ways the hashes can't see


@dataclasses.dataclass(frozen=True)
class GuestImage:
    base: Path  # raw ext4, never written to
    kernel: Path  # bzImage
    vmlinux: Path  # the same kernel as an ELF file (Firecracker, QEMU microvm)
    initrd: Path
    directory: Path

    @property
    def tree(self) -> Path:
        """The configured root tree root.ext4 was made from, for containers (backend nspawn):
        read-only to them (an overlay's lower layer), never written."""
        return self.directory / "tree"

    @classmethod
    def load(cls, directory: Path) -> GuestImage:
        img = cls(directory / "root.ext4", directory / "vmlinuz", directory / "vmlinux",
                  directory / "initrd.img", directory)
        for p in (img.base, img.kernel, img.vmlinux, img.initrd):
            if not p.exists():
                raise SetupError(f"guest image at {directory} is incomplete: {p.name} is missing; "
                                 "run `ntng image build`")
        return img


def apt_mirror(suite_hint: str | None = None) -> tuple[str, str]:
    """The (mirror URI, suite) this machine's own apt uses for Debian main."""
    entries: list[tuple[str, list[str]]] = []
    src = Path("/etc/apt/sources.list.d")
    for f in sorted(src.glob("*.sources")) if src.is_dir() else []:
        for stanza in f.read_text().split("\n\n"):
            fields = dict(
                (m.group(1).lower(), m.group(2).strip())
                for m in re.finditer(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M)
            )
            if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
                for uri in fields.get("uris", "").split():
                    entries.append((uri, fields.get("suites", "").split()))
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            m = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
            if m:
                entries.append((m.group(1), [m.group(2)]))
    for uri, suites in entries:
        plain = [s for s in suites if "-" not in s and "/" not in s]
        if plain and "security" not in uri:
            suite = suite_hint if suite_hint in plain else plain[0]
            return uri.rstrip("/"), suite
    raise SetupError("no Debian mirror in this machine's apt configuration "
                     "(/etc/apt/sources.list[.d]); add one or set NTNG_DEBIAN_MIRROR")


def _hash(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _config_files() -> list[Path]:
    files = [paths.backdoor_dir() / "ntng_agent.py", paths.protocol_source(),
             paths.nixlib_dir() / "scripts" / "mkext4.sh",
             paths.nixlib_dir() / "scripts" / "extract-vmlinux.sh", Path(__file__)]
    files += sorted((paths.backdoor_dir() / "debian").iterdir())
    return files


def image_key() -> tuple[str, str]:
    suite = os.environ.get("NTNG_DEBIAN_SUITE")
    rootfs_key = _hash(FORMAT_VERSION, suite or "default", *PACKAGES)
    image_key = _hash(rootfs_key, *(f.read_bytes() for f in _config_files()))
    return rootfs_key, image_key


def default_image_dir() -> Path:
    return paths.cache_dir() / f"image-{image_key()[1]}"


def prune_images(keep: Path) -> None:
    """Images are ~2 GB each: keep the few newest (switching between branches or checkouts with
    different agents should not rebuild every time) and `keep`, drop the rest, but never one
    whose tree a running container boots."""
    images = [p for p in paths.cache_dir().glob("image-*") if p.is_dir() and not p.name.endswith(".tmp")]
    images.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    busy = trees_in_use()
    for old in images[KEEP_IMAGES:]:
        if old != keep and (old / "tree") not in busy:
            shutil.rmtree(old, ignore_errors=True)


def trees_in_use() -> set[Path]:
    """The trees running containers boot: the --directory= and --overlay= lower layers in the
    argv of every process (systemd-nspawn's, nixlib/nspawn.nix).  A VM holds its base image
    open, so removing that file does not disturb it; an overlay's lower folder removed under a
    live container would take its files away.  Read from /proc rather than a lock or pid file
    the runner writes: a container outliving a killed runner still counts, and nothing can go
    stale.  (mtime alone would not do: find_image touches an image when a run starts, and a
    -K or interactive run may last longer than a few image builds.)"""
    found: set[Path] = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        for arg in args:
            for flag in (b"--directory=", b"--overlay="):
                if arg.startswith(flag):
                    first = arg[len(flag):].split(b":")[0]
                    found.add(Path(os.fsdecode(first)))
    return found


def find_image(explicit: str | None = None) -> GuestImage:
    directory = Path(explicit) if explicit else default_image_dir()
    if not directory.exists():
        raise SetupError(f"no guest image at {directory}: run `ntng image build` first"
                         + ("" if explicit else " (the image is keyed by the agent's source: a "
                            "changed agent needs a rebuild, which reuses the cached rootfs)"))
    if not explicit:
        try:
            os.utime(directory)  # "recently used": the build keeps the newest few
        except OSError:
            pass  # a read-only cache is fine
    return GuestImage.load(directory)


def _run(cmd: list[str], log: Path, **kw: object) -> None:
    print(f"  $ {' '.join(cmd)}", file=sys.stderr, flush=True)
    with open(log, "ab") as out:
        r = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, **kw)  # type: ignore[call-overload]
    if r.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise SetupError(f"{cmd[0]} failed (exit {r.returncode}); last lines of {log}:\n"
                         + "\n".join(tail))


def _need(tool: str, package: str) -> None:
    if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
        raise SetupError(f"{tool} not found: apt-get install {package} (or run ./setup.sh)")


def build_rootfs(key: str, log: Path) -> Path:
    target = paths.cache_dir() / f"rootfs-{key}"
    if (target / ".complete").exists():
        return target
    if os.geteuid() != 0:
        raise SetupError("building the guest rootfs needs root (debootstrap); run it as root once")
    _need("debootstrap", "debootstrap")
    mirror = os.environ.get("NTNG_DEBIAN_MIRROR")
    suite = os.environ.get("NTNG_DEBIAN_SUITE")
    if not mirror:
        mirror, found_suite = apt_mirror(suite)
        suite = suite or found_suite
    suite = suite or "stable"
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"ntng: debootstrap {suite} from {mirror} (a few minutes, cached)", file=sys.stderr)
    _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
          suite, str(tmp), mirror], log)
    (tmp / ".complete").write_text(json.dumps({"suite": suite, "mirror": mirror}))
    os.rename(tmp, target)
    return target


def configure(root: Path) -> None:
    """Install the agent and the settings every test node needs."""
    bd = paths.backdoor_dir()
    agent_dir = root / "usr/lib/ntng-backdoor"
    agent_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(bd / "ntng_agent.py", agent_dir / "ntng_agent.py")
    shutil.copy(paths.protocol_source(), agent_dir / "protocol.py")
    deb = bd / "debian"
    units = root / "etc/systemd/system"
    shutil.copy(deb / "ntng-backdoor.service", units / "ntng-backdoor.service")
    wants = units / "sysinit.target.wants"
    wants.mkdir(exist_ok=True)
    link = wants / "ntng-backdoor.service"
    if not link.is_symlink():
        link.symlink_to("/etc/systemd/system/ntng-backdoor.service")
    si_wants = units / "sysinit.target.wants"
    si_wants.mkdir(exist_ok=True)
    for early in ("ntng-net", "ntng-shares"):  # a script and its unit, before the agent
        shutil.copy(deb / early, agent_dir / early)
        (agent_dir / early).chmod(0o755)
        shutil.copy(deb / f"{early}.service", units / f"{early}.service")
        if not (si_wants / f"{early}.service").is_symlink():
            (si_wants / f"{early}.service").symlink_to(f"/etc/systemd/system/{early}.service")
    for drop_dir, src in (("systemd/journald.conf.d", "journald-console.conf"),
                          ("systemd/system/ssh.service.d", "ssh-hostkeys.conf"),
                          ("systemd/system/serial-getty@ttyS0.service.d", "serial-autologin.conf"),
                          ("ssh/sshd_config.d", "sshd-hostkey.conf")):
        d = root / "etc" / drop_dir
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(deb / src, d / src)
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()  # made at first boot: every node gets its own
    (root / "etc/hostname").write_text("nixos\n")  # the runner passes systemd.hostname=<node>
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n")
    (root / "etc/fstab").write_text("/dev/vda / ext4 rw,relatime 0 1\n")
    (root / "etc/machine-id").write_text("")  # a fresh id per boot
    # Root logs in on the serial console without a password: a test VM, never a server.
    subprocess.run(["chroot", str(root), "passwd", "-d", "root"], check=True, capture_output=True)
    for unit in ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer",
                 "e2scrub_reap.service", "fstrim.timer", "systemd-timesyncd.service",
                 "man-db.timer", "dpkg-db-backup.timer",
                 "systemd-tmpfiles-clean.timer", "proc-sys-fs-binfmt_misc.automount",
                 "systemd-binfmt.service", "systemd-pcrphase.service",
                 "systemd-pcrphase-sysinit.service", "modprobe@dm_mod.service",
                 "modprobe@drm.service", "modprobe@efi_pstore.service"):
        (units / unit).unlink(missing_ok=True)
        (units / unit).symlink_to("/dev/null")
    _nixos_vt_gettys(root)
    (root / "etc/modules-load.d/ntng.conf").write_text("virtio_console\nvirtio_rng\n")
    # A small initrd boots much faster under TCG than Debian's "most" (36 MB): only what
    # mounting the root disk needs.
    conf = root / "etc/initramfs-tools/initramfs.conf"
    conf.write_text(re.sub(r"(?m)^MODULES=.*$", "MODULES=list", conf.read_text()))
    (root / "etc/initramfs-tools/modules").write_text("\n".join(INITRD_MODULES) + "\n")
    subprocess.run(["chroot", str(root), "update-initramfs", "-u", "-k", "all"], check=True,
                   capture_output=True)
    # The agent starts before anything else: precompiled bytecode saves seconds under TCG.
    subprocess.run(["chroot", str(root), "python3", "-m", "compileall", "-q", "/usr/lib/ntng-backdoor"],
                   check=True, capture_output=True)


# NixOS' getty.nix command line for the VT gettys: the tty is on it (Debian's passes "-" and sets
# TTYPath), so nixos/tests/login.nix's `pgrep -f 'agetty.*tty1'` finds them.  Only on nodes with
# a display (the runner adds console=tty0 there): on a headless node nobody sees the VTs, and
# tty1 stays free for a test's own reader.
NIXOS_VT_GETTY = """[Unit]
ConditionKernelCommandLine=console=tty0

[Service]
ExecStart=
ExecStart=-/sbin/agetty --noclear --keep-baud %I 115200,38400,9600 $TERM
"""


def _nixos_vt_gettys(root: Path) -> None:
    """VT gettys as on NixOS test nodes with a display (tty1, and more on a VT switch), and bash
    as new users' shell (NixOS' default; Debian's useradd gives /bin/sh): login.nix's steps run unchanged."""
    dropin = root / "etc/systemd/system/getty@.service.d"
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "nixos-vt-getty.conf").write_text(NIXOS_VT_GETTY)
    useradd = root / "etc/default/useradd"
    if useradd.exists():
        useradd.write_text(re.sub(r"(?m)^#?\s*SHELL=.*$", "SHELL=/bin/bash", useradd.read_text()))


def build(force: bool = False) -> GuestImage:
    rootfs_key, key = image_key()
    out = paths.cache_dir() / f"image-{key}"
    if out.exists() and not force:
        print(f"ntng: guest image is up to date: {out}", file=sys.stderr)
        return GuestImage.load(out)
    _need("mkfs.ext4", "e2fsprogs")
    _need("qemu-img", "qemu-utils")
    log = paths.cache_dir() / f"build-{key}.log"
    log.write_text("")
    rootfs = build_rootfs(rootfs_key, log)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tree = tmp / "tree"
    tmp.mkdir(parents=True)
    print("ntng: configuring the guest tree", file=sys.stderr)
    _run(["cp", "-a", "--reflink=auto", str(rootfs), str(tree)], log)
    (tree / ".complete").unlink(missing_ok=True)
    configure(tree)
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    initrds = sorted((tree / "boot").glob("initrd.img-*"))
    if not kernels or not initrds:
        raise SetupError(f"no kernel or initrd in {tree}/boot: is linux-image-amd64 installed?")
    shutil.copy(kernels[-1], tmp / "vmlinuz")
    shutil.copy(initrds[-1], tmp / "initrd.img")
    scripts = paths.nixlib_dir() / "scripts"
    _run([str(scripts / "extract-vmlinux.sh"), str(tmp / "vmlinuz"), str(tmp / "vmlinux")], log)
    _run([str(scripts / "mkext4.sh"), str(tree), str(tmp / "root.ext4"), IMAGE_SIZE, "ntng"], log)
    # The tree stays for containers (~0.9 GB beside root.ext4): they boot it as an overlay's
    # lower layer; a loop mount of root.ext4 instead would need a mount left on the host.
    (tmp / "manifest.json").write_text(json.dumps(
        {"key": key, "rootfs": rootfs.name, "kernel": kernels[-1].name, "packages": PACKAGES}, indent=1))
    (tmp / "root.ext4").chmod(0o444)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    prune_images(keep=out)
    print(f"ntng: guest image ready: {out}", file=sys.stderr)
    return GuestImage.load(out)
