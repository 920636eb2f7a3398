# The NixOS options that mkTest's modules (modules/vm.nix, modules/test-network.nix) set, on
# top of ../../../nixos-stand-ins.nix (those of modules/backdoor.nix and test-node.nix).  Typed
# like upstream and closed: a misspelt option or a value of the wrong shape fails evaluation.
{ lib, ... }:
let
  inherit (lib) mkOption types;
  opt = type: default: mkOption { inherit type default; };
  unitSection = opt (types.attrsOf (types.oneOf [ types.bool types.int types.str (types.listOf types.str) ])) { };
  addresses = opt (types.listOf (types.submodule {
    options = {
      address = mkOption { type = types.str; };
      prefixLength = mkOption { type = types.ints.between 0 128; };
    };
  })) [ ];
in
{
  imports = [ ../../../nixos-stand-ins.nix ];

  options = {
    nixpkgs.system = mkOption { type = types.str; };
    boot.initrd.kernelModules = opt (types.listOf types.str) [ ];
    fileSystems = opt (types.attrsOf (types.submodule {
      options = {
        device = opt (types.nullOr types.nonEmptyStr) null;
        fsType = opt types.nonEmptyStr "auto";
        options = opt (types.nonEmptyListOf types.nonEmptyStr) [ "defaults" ];
        neededForBoot = opt types.bool false;
      };
    })) { };
    # Upstream's pattern for networking.hostName.
    networking.hostName = opt (types.strMatching "^$|^[[:alnum:]]([[:alnum:]_-]{0,61}[[:alnum:]])?$") "nixos";
    networking.extraHosts = opt types.lines "";
    networking.interfaces = opt (types.attrsOf (types.submodule {
      options = {
        ipv4.addresses = addresses;
        ipv6.addresses = addresses;
      };
    })) { };
    systemd.network.links = opt (types.attrsOf (types.submodule {
      options = {
        enable = opt types.bool true;
        matchConfig = unitSection;
        linkConfig = unitSection;
      };
    })) { };
    boot.consoleLogLevel = opt types.int 4;
    system.boot.loader = {
      kernelFile = mkOption { type = types.str; };
      initrdFile = opt types.str "initrd";
    };
    system.nixos.release = opt types.str lib.trivial.release;
    # Upstream's system.build is free-form; these are the parts mkTest reads.
    system.build = {
      kernel = mkOption { type = types.package; };
      initialRamdisk = mkOption { type = types.package; };
      toplevel = mkOption { type = types.package; };
    };
  };
}
