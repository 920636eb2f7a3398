#!/bin/sh
# extract-vmlinux.sh BZIMAGE OUT
# The uncompressed ELF vmlinux inside an x86 bzImage, for VMMs without a bzImage loader
# (Firecracker; QEMU -M microvm boots it through its PVH note).  Used by the Nix derivation
# (nixlib/pkgs/vmlinux.nix) and by the Debian image build alike.
#
# The boot protocol header (Documentation/arch/x86/boot.rst, protocol >= 2.08) says where the
# compressed payload is: setup_sects at 0x1f1, payload_offset at 0x248 and payload_length at
# 0x24c, relative to the end of the setup code.  So no magic-number scanning is needed, and a
# file that is not a bzImage is refused with a reason instead of yielding garbage.
set -eu
img=$1 out=$2
die() { echo "extract-vmlinux: $img: $*" >&2; exit 1; }
[ -r "$img" ] || die "cannot read the kernel image"

# Unsigned little-endian integer of $2 bytes at offset $1.
le() { od -An -j "$1" -N "$2" -t "u$2" "$img" | tr -d ' \n'; }
bytes() { od -An -j "$1" -N "$2" -c "$img" | tr -d ' \n'; }

if [ "$(bytes 0 4)" = '177ELF' ]; then
  cp "$img" "$out"  # already a vmlinux
  exit 0
fi
[ "$(bytes 514 4)" = HdrS ] || die "not a bzImage (no HdrS boot header at 0x202)"
version=$(le 518 2)
[ "$version" -ge 520 ] || die "boot protocol $((version >> 8)).$((version & 255)) is older than 2.08: no payload fields"
setup_sects=$(le 497 1)
[ "$setup_sects" -ne 0 ] || setup_sects=4
start=$(( (setup_sects + 1) * 512 + $(le 584 4) ))
length=$(le 588 4)

# The first bytes of the payload name its compression.
magic=$(od -An -j "$start" -N 6 -t x1 "$img" | tr -d ' \n')
case $magic in
  1f8b*) unpack="gzip -dc" ;;
  fd377a585a00) unpack="xz -dc" ;;
  28b52ffd*) unpack="zstd -dcq" ;;
  425a68*) unpack="bzip2 -dc" ;;
  5d0000*) unpack="xz -dc --format=lzma" ;;
  894c5a4f*) unpack="lzop -dc" ;;
  02214c18*) unpack="lz4 -dc" ;;
  *) die "unknown payload compression (first bytes $magic at offset $start)" ;;
esac
tool=${unpack%% *}
command -v "$tool" >/dev/null || die "the payload is compressed with $tool, which is not installed"

tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT
# Some formats carry the uncompressed size after the stream: ignore trailing-garbage complaints
# as long as an ELF file came out.
tail -c "+$((start + 1))" "$img" | head -c "$length" | $unpack > "$tmp" 2>/dev/null || true
[ "$(od -An -N 4 -c "$tmp" | tr -d ' \n')" = '177ELF' ] || die "the $tool payload did not unpack to an ELF vmlinux"
mv "$tmp" "$out"
trap - EXIT
