# Every host executable the runner may start, in one list (builtins only).  From it come the
# Nix wrapper's PATH (pkgs/ntng.nix), `ntng doctor` (python/ntng/doctor.py) and the Debian
# packages ./setup.sh installs; tests/nix/test_tools_list.py fails when the Python starts a
# program that is not here.  Names are what the runner runs: argv[0] literals in python/ntng
# and the binaries nixlib's plans name (node.nix defaults, `prepare` steps, helpers).
#
#   nixpkgs:  the attribute of pkgs that provides it (null: none)
#   debian:   the Debian packages that provide it (empty: none; `debianSuite` = "sid": only there)
#   required: every run needs it (doctor exits non-zero without it); else a feature needs it
#   paths:    where Debian installs it off PATH (doctor looks there too)
#   wrapped:  on the PATH of the flake's `ntng` (false: the Debian image build only, or a VMM
#             mkTest passes by store path, kept out of the closure)
#   neededFor: what a user loses without it
#
# Not here: ip/tc/modprobe (netlink through pyroute2 instead), guest-side commands (they run in
# the guest through the backdoor), and nixlib/scripts/*.sh, started by path (their own tools
# are listed: mkfs.ext4, truncate, od, the decompressors).
let
  tool = attrs: { nixpkgs = null; debian = [ ]; debianSuite = null; required = false; paths = [ ]; wrapped = true; } // attrs;
  coreutils = neededFor: tool { nixpkgs = "coreutils"; debian = [ "coreutils" ]; required = true; inherit neededFor; };
  decompressor = nixpkgs: debian: tool {
    inherit nixpkgs; debian = [ debian ];
    neededFor = "extract-vmlinux.sh, for a Debian kernel compressed this way (Firecracker, microvm)";
  };
in
{
  qemu-system-x86_64 = tool {
    nixpkgs = "qemu_kvm"; debian = [ "qemu-system-x86" ]; required = true;
    neededFor = "QEMU nodes (the default VMM) and the KVM boot probe";
  };
  qemu-img = tool {
    nixpkgs = "qemu_kvm"; debian = [ "qemu-utils" ]; required = true;
    neededFor = "each QEMU node's throwaway disk overlay, and the Debian guest image";
  };
  nix-instantiate = tool {
    nixpkgs = "nix"; debian = [ "nix-bin" ]; required = true;
    neededFor = "every run: nixlib plans each VM's command line";
  };
  vde_switch = tool {
    nixpkgs = "vde2"; debian = [ "vde2" ];
    neededFor = "networks without CAP_NET_ADMIN or /dev/net/tun (rootless, e.g. a Nix build sandbox)";
  };
  vhost-device-vsock = tool {
    nixpkgs = "vhost-device-vsock"; debian = [ "vhost-device-vsock" ]; debianSuite = "sid";
    neededFor = "the vsock backdoor on QEMU without /dev/vhost-vsock (hybrid vsock)";
  };
  virtiofsd = tool {
    nixpkgs = "virtiofsd"; debian = [ "qemu-system-common" ];
    paths = [ "/usr/lib/qemu/virtiofsd" "/usr/libexec/virtiofsd" ];
    neededFor = "virtiofs shared directories (9p needs nothing extra)";
  };
  # tesseract4, as the NixOS driver: nixpkgs' plain `tesseract` is tesseract3, which has no LSTM
  # model for screen.py's `--oem 1` (docs/nixos-fidelity.md).
  tesseract = tool {
    nixpkgs = "tesseract4"; debian = [ "tesseract-ocr" "tesseract-ocr-eng" ];
    neededFor = "OCR: get_screen_text, wait_for_text";
  };
  firecracker = tool {
    nixpkgs = "firecracker"; wrapped = false;
    neededFor = "Firecracker nodes (not packaged in Debian: its GitHub releases)";
  };
  cloud-hypervisor = tool {
    nixpkgs = "cloud-hypervisor"; wrapped = false;
    neededFor = "Cloud Hypervisor nodes (Debian: its GitHub releases)";
  };
  systemd-nspawn = tool {
    nixpkgs = "systemd"; debian = [ "systemd-container" ];
    neededFor = "container nodes (backend = \"nspawn\")";
  };
  unshare = tool {
    nixpkgs = "util-linux"; debian = [ "util-linux" ];
    neededFor = "container nodes: each container's PID namespace ends with its systemd-nspawn";
  };
  debootstrap = tool {
    nixpkgs = "debootstrap"; debian = [ "debootstrap" ]; wrapped = false; paths = [ "/usr/sbin/debootstrap" ];
    neededFor = "building the Debian guest image (ntng image build; not for mkTest)";
  };
  "mkfs.ext4" = tool {
    nixpkgs = "e2fsprogs"; debian = [ "e2fsprogs" ]; wrapped = false; paths = [ "/usr/sbin/mkfs.ext4" "/sbin/mkfs.ext4" ];
    neededFor = "building the Debian guest image (mkext4.sh)";
  };
  chroot = tool {
    nixpkgs = "coreutils"; debian = [ "coreutils" ]; wrapped = false; paths = [ "/usr/sbin/chroot" ];
    neededFor = "building the Debian guest image";
  };
  dmesg = tool {
    nixpkgs = "util-linux"; debian = [ "util-linux" ];
    neededFor = "the host TSC rate for TCG microvm guests, when sysfs lacks it (journalctl is the fallback)";
  };
  journalctl = tool {
    nixpkgs = "systemd"; debian = [ "systemd" ];
    neededFor = "the host TSC rate for TCG microvm guests, when sysfs and dmesg lack it";
  };
  cp = coreutils "copying disks and trees (Firecracker, Cloud Hypervisor, the Debian image)";
  rm = coreutils "removing leftover sockets before a Firecracker or Cloud Hypervisor boot";
  touch = coreutils "Firecracker's log and metrics files";
  truncate = coreutils "mkext4.sh";
  od = coreutils "extract-vmlinux.sh";
  gzip = decompressor "gzip" "gzip";
  xz = decompressor "xz" "xz-utils";
  zstd = decompressor "zstd" "zstd";
}
