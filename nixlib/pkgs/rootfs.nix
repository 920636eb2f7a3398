# A NixOS system's root file system as a raw ext4 image: the closure of its toplevel under
# /nix/store, made by nixlib/scripts/mkext4.sh (mkfs.ext4 -d: no loop mount, no root) — the
# same script the Debian image build runs.  Every backend boots it on virtio-blk as /dev/vda;
# the store is in the image, so no shared folder is needed (Firecracker has none).
{ runCommand, closureInfo, e2fsprogs, coreutils, toplevel, size ? "4G", label ? "nixos" }:
let closure = closureInfo { rootPaths = [ toplevel ]; };
in
runCommand "ntng-rootfs.ext4" { nativeBuildInputs = [ e2fsprogs coreutils ]; } ''
  mkdir -p tree/nix/store tree/etc tree/var tree/tmp tree/root
  # NixOS' stage 2 (activation) makes the rest of the tree at boot.
  xargs -I{} cp -a {} tree/nix/store/ < ${closure}/store-paths
  cp ${closure}/registration tree/nix-path-registration
  sh ${../scripts/mkext4.sh} tree $out ${size} ${label}
''
