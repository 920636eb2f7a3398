# The VM a test node runs in, as options of the node's own NixOS configuration.  The
# `virtualisation.*` names and defaults are the NixOS test driver's, so node configurations
# written for it keep working; `ntng.vm.*` adds what that driver does not have.  mkTest reads
# these and hands them to nixlib, which computes the VMM's command line or API calls.
{ config, lib, ... }:
let
  inherit (lib) mkOption types;
in
{
  options.virtualisation = {
    memorySize = mkOption { type = types.ints.between 128 65536; default = 1024; description = "Guest memory in MiB."; };
    cores = mkOption { type = types.ints.between 1 64; default = 1; description = "Number of vCPUs."; };
    vlans = mkOption {
      type = types.listOf (types.ints.between 1 254);
      default = [ 1 ];
      description = "Virtual networks the node is on: one NIC each, addresses 192.168.<vlan>.<node number>.";
    };
  };

  options.ntng.vm = {
    backend = mkOption {
      type = types.nullOr (types.enum [ "qemu" "firecracker" "cloud-hypervisor" ]);
      default = null;
      description = "VMM for this node; null: the test's `backend`.";
    };
    machineType = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = "QEMU machine type (q35, microvm); null: the backend's default.";
    };
    display = mkOption {
      type = types.bool;
      default = false;
      description = "A VGA screen (QEMU q35/pc) for screenshot and OCR; the kernel console shows on it too.";
    };
    rootSize = mkOption { type = types.str; default = "4G"; description = "Size of the (sparse) ext4 root image."; };
    extraArgs = mkOption { type = types.listOf types.str; default = [ ]; description = "Extra VMM arguments."; };
    # What nixlib's node description gets from this node (see nixlib/node.nix).
    nodeOptions = mkOption { type = types.attrsOf types.anything; internal = true; readOnly = true; };
  };

  config = {
    # The whole system lives in the ext4 image on the first virtio disk (every backend has one).
    fileSystems."/" = { device = "/dev/vda"; fsType = "ext4"; };
    boot.initrd.availableKernelModules = [ "virtio_pci" "virtio_mmio" "virtio_blk" "ext4" ];
    # virtio-mmio devices (Firecracker, microvm) have no modalias for udev to load the driver
    # by, so stage 1 loads it outright; without it the root disk never appears.
    boot.initrd.kernelModules = lib.optional
      (config.ntng.vm.backend == "firecracker" || config.ntng.vm.machineType == "microvm") "virtio_mmio";

    ntng.vm.nodeOptions = {
      memory = config.virtualisation.memorySize;
      inherit (config.virtualisation) cores vlans;
      inherit (config.ntng.vm) extraArgs display;
    } // lib.optionalAttrs (config.ntng.vm.backend != null) { inherit (config.ntng.vm) backend; }
      // lib.optionalAttrs (config.ntng.vm.machineType != null) { inherit (config.ntng.vm) machineType; };
  };
}
