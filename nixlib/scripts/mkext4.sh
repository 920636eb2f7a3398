#!/bin/sh
# mkext4.sh SRC_DIR OUT_IMAGE SIZE [LABEL]
# An ext4 image of a directory tree without loop mounts or root: mkfs.ext4 -d copies the tree
# (owners, modes, symlinks, devices) into the new file system.  Used by the Nix derivation
# (nixlib/rootfs.nix) and by the Debian image build alike.
set -eu
src=$1 out=$2 size=$3 label=${4:-nixos}
[ -d "$src" ] || { echo "mkext4: $src is not a directory" >&2; exit 2; }
rm -f "$out"
truncate -s "$size" "$out"
# Fixed UUID and hash seed: the same tree gives the same image.
mkfs.ext4 -q -F -L "$label" -U 44444444-4444-4444-8888-888888888888 \
  -E hash_seed=44444444-4444-4444-8888-888888888888,root_owner=0:0 \
  -O ^metadata_csum_seed -d "$src" "$out"
