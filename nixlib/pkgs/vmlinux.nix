# The uncompressed ELF vmlinux of a kernel package, made by nixlib/scripts/extract-vmlinux.sh —
# the same script the Debian image build runs — for Firecracker and QEMU's microvm.
{ runCommand, coreutils, gzip, xz, zstd, bzip2, lz4, lzop, kernel, kernelFile ? "bzImage" }:
runCommand "vmlinux-${kernel.version or "kernel"}" {
  nativeBuildInputs = [ coreutils gzip xz zstd bzip2 lz4 lzop ];
} ''
  sh ${../scripts/extract-vmlinux.sh} ${kernel}/${kernelFile} $out
''
