# The VM a test node runs in, as options of the node's own NixOS configuration.  The
# `virtualisation.*` names and defaults are the NixOS test driver's, so node configurations
# written for it keep working; `ntng.vm.*` adds what that driver does not have.  mkTest reads
# these and hands them to nixlib, which computes the VMM's command line or API calls.
{ config, lib, ... }:
let
  inherit (lib) mkOption types;
  cfg = config.virtualisation;

  # The NixOS driver's shape ({ source; target; securityModel; }) plus ntng's type and readOnly.
  share = types.submodule {
    options = {
      source = mkOption { type = types.str; description = "Host directory (absolute)."; };
      target = mkOption { type = types.str; description = "Where the guest mounts it."; };
      securityModel = mkOption {
        type = types.nullOr (types.enum [ "passthrough" "mapped-xattr" "mapped-file" "none" ]);
        default = null;
        description = "QEMU's 9p security_model (null: nixlib's default, mapped-xattr for a writable 9p share).";
      };
      type = mkOption { type = types.enum [ "9p" "virtiofs" ]; default = "9p"; description = "How the guest sees it (virtiofs: a virtiofsd per share)."; };
      readOnly = mkOption { type = types.bool; default = false; description = "Refuse writes from the guest."; };
    };
  };

  # As the NixOS driver mounts its shares (nixos/modules/virtualisation/qemu-vm.nix): 9p over
  # virtio, 9P2000.L, the msize it sets, and cache=loose for the immutable store.
  mountOf = tag: s: {
    device = tag;
    fsType = s.type;
    neededForBoot = tag == "nix-store";
    options = (if s.type == "9p" then
      [ "trans=virtio" "version=9p2000.L" "msize=${toString cfg.msize}" "x-systemd.requires=modprobe@9pnet_virtio.service" ]
      ++ lib.optional (tag == "nix-store") "cache=loose"
    else [ "defaults" ]) ++ lib.optional s.readOnly "ro";
  };

  # Cloud Hypervisor has virtiofs only (nixlib/capabilities.nix): the store and artifacts
  # shares use it there, 9p (nothing to run beside the VMM) elsewhere.
  builtinType = if config.ntng.vm.backend == "cloud-hypervisor" then "virtiofs" else "9p";

  # What nixlib's node description takes (nixlib/shares.nix).
  allShares = lib.mapAttrs (_: lib.filterAttrs (_: v: v != null)) cfg.sharedDirectories // lib.optionalAttrs cfg.mountHostNixStore {
    nix-store = { source = builtins.storeDir; target = "/nix/.ro-store"; securityModel = "none"; type = builtinType; readOnly = true; };
  };
  container = config.ntng.vm.backend == "nspawn";
  uses = type: lib.any (s: s.type == type) (lib.attrValues allShares) || (type == builtinType && config.ntng.vm.shareArtifacts);
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
    sharedDirectories = mkOption {
      type = types.attrsOf share;
      default = { };
      example = { data = { source = "/srv/data"; target = "/mnt/data"; readOnly = true; }; };
      description = "Host directories shared into the guest, by mount tag (at most 31 characters).";
    };
    mountHostNixStore = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Share the host's /nix/store read-only at /nix/.ro-store (9p, tag nix-store), as the NixOS
        driver does.  Off by default: the node's root image already holds its system's closure.'';
    };
    msize = mkOption {
      type = types.ints.positive;
      default = 16384;
      description = "9p msize (bytes per request); larger is faster for big files.";
    };
  };

  options.ntng.vm = {
    backend = mkOption {
      type = types.nullOr (types.enum [ "qemu" "firecracker" "cloud-hypervisor" "nspawn" ]);
      default = null;
      description = "VMM for this node, or \"nspawn\": a systemd-nspawn container (the host's kernel, /nix/store bind-mounted read-only); null: the test's `backend`.";
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
    shareArtifacts = mkOption {
      type = types.bool;
      default = false;
      description = "A writable 9p share at /tmp/shared whose host side is in the run's artifact folder (copy_from_vm(..., via=\"share\")).";
    };
    rootSize = mkOption { type = types.str; default = "4G"; description = "Size of the (sparse) ext4 root image."; };
    extraArgs = mkOption { type = types.listOf types.str; default = [ ]; description = "Extra VMM arguments."; };
    # What nixlib's node description gets from this node (see nixlib/node.nix).
    nodeOptions = mkOption { type = types.attrsOf types.anything; internal = true; readOnly = true; };
  };

  config = {
    # A container (nspawn) boots no kernel: NixOS' own switch for that (no initrd, no kernel,
    # no file systems to mount: nspawn gives it its root folder and bind-mounts the shares).
    boot.isContainer = lib.mkIf container true;

    # The whole system lives in the ext4 image on the first virtio disk (every backend has one).
    fileSystems = lib.mkIf (!container) ({ "/" = { device = "/dev/vda"; fsType = "ext4"; }; }
      // lib.mapAttrs' (tag: s: lib.nameValuePair s.target (mountOf tag s)) allShares
      // lib.optionalAttrs config.ntng.vm.shareArtifacts {
        "/tmp/shared" = mountOf "shared" { type = builtinType; readOnly = false; };
      });
    boot.initrd.availableKernelModules = lib.mkIf (!container) ([ "virtio_pci" "virtio_mmio" "virtio_blk" "ext4" ]
      ++ lib.optionals (uses "9p") [ "9p" "9pnet_virtio" ] ++ lib.optional (uses "virtiofs") "virtiofs");
    # virtio-mmio devices (Firecracker, microvm) have no modalias for udev to load the driver
    # by, so stage 1 loads it outright; without it the root disk never appears.
    boot.initrd.kernelModules = lib.optional
      (config.ntng.vm.backend == "firecracker" || config.ntng.vm.machineType == "microvm") "virtio_mmio";

    # What is on the screen is NixOS': a login prompt on the VT gettys (test-node.nix's
    # autologin is for the serial console of headless nodes).  Above mkDefault, below a node's own.
    services.getty.autologinUser = lib.mkIf config.ntng.vm.display (lib.mkOverride 900 null);

    ntng.vm.nodeOptions = {
      memory = config.virtualisation.memorySize;
      inherit (config.virtualisation) cores vlans;
      inherit (config.ntng.vm) extraArgs display shareArtifacts;
      sharedDirs = allShares;
    } // lib.optionalAttrs (config.ntng.vm.backend != null) { inherit (config.ntng.vm) backend; }
      // lib.optionalAttrs (config.ntng.vm.machineType != null) { inherit (config.ntng.vm) machineType; };
  };
}
