# The NixOS options that mkTest's modules (modules/vm.nix, modules/test-network.nix) set or read,
# on top of ../../../nixos-stand-ins.nix (those of modules/backdoor.nix and test-node.nix).
# Declared with the types of the real declarations (docs/nixos-fidelity.md: file and commit of
# each) and closed: a misspelt option or a value of the wrong shape fails evaluation.
{ lib, pkgs, ... }:
let
  inherit (lib) mkOption types;
  opt = type: default: mkOption { inherit type default; };
  inherit (import ../lib/systemd-types.nix { inherit lib; }) unitOption;
  # nixos/modules/tasks/network-interfaces.nix: addrOpts v
  addresses = v: opt (types.listOf (types.submodule {
    options = {
      address = mkOption { type = types.str; };
      prefixLength = mkOption { type = types.addCheck types.int (n: n >= 0 && n <= (if v == 4 then 32 else 128)); };
    };
  })) [ ];
  # nixos/modules/tasks/filesystems.nix
  isNonEmpty = s: (builtins.match "[ \t\n]*" s) == null;
  nonEmptyStr = types.addCheck types.str isNonEmpty;
in
{
  imports = [ ../../../nixos-stand-ins.nix ];

  options = {
    nixpkgs.system = mkOption { type = types.str; };
    boot.initrd.kernelModules = opt (types.listOf types.str) [ ];
    fileSystems = opt (types.attrsOf (types.submodule {
      options = {
        device = opt (types.nullOr nonEmptyStr) null;
        fsType = opt nonEmptyStr "auto";
        options = opt (types.nonEmptyListOf nonEmptyStr) [ "defaults" ];
        # nixos/modules/system/boot/stage-1.nix adds it to the same submodule.
        neededForBoot = opt types.bool false;
      };
    })) { };
    networking.hostName = opt (types.strMatching "^$|^[[:alnum:]]([[:alnum:]_-]{0,61}[[:alnum:]])?$") "nixos";
    networking.extraHosts = opt types.lines "";
    networking.interfaces = opt (types.attrsOf (types.submodule {
      options = {
        ipv4.addresses = addresses 4;
        ipv6.addresses = addresses 6;
      };
    })) { };
    # nixos/modules/system/boot/networkd.nix: linkOptions (its [Match]/[Link] key checks omitted).
    systemd.network.links = opt (types.attrsOf (types.submodule {
      options = {
        enable = opt types.bool true;
        matchConfig = opt (types.attrsOf unitOption) { };
        linkConfig = opt (types.attrsOf unitOption) { };
      };
    })) { };
    boot.consoleLogLevel = opt types.int 4;
    # nixos/modules/system/activation/top-level.nix
    system.boot.loader = {
      kernelFile = opt types.str pkgs.stdenv.hostPlatform.linux-kernel.target;
      initrdFile = opt types.str "initrd";
    };
    system.nixos.release = mkOption { type = types.str; default = lib.trivial.release; readOnly = true; };
    # Upstream's system.build is free-form (lazyAttrsOf (uniq unspecified)); toplevel is declared
    # as a package, kernel and initialRamdisk are set by kernel.nix and stage-1.nix.
    system.build = {
      kernel = mkOption { type = types.package; };
      initialRamdisk = mkOption { type = types.package; };
      toplevel = mkOption { type = types.package; };
    };
    boot.isContainer = opt types.bool false; # nixos/modules/virtualisation/nixos-containers.nix
  };
}
