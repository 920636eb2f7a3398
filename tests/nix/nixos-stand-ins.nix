# Stand-ins for the NixOS options that modules/backdoor.nix and modules/test-node.nix set
# (nixpkgs is not available here, only its lib).  Each is declared with the type of the real
# declaration, read in nixpkgs (docs/nixos-fidelity.md names file and commit for every one), and
# without free-form attributes: a misspelt option or a value of the wrong type fails evaluation
# here as it would in NixOS.  What a type cannot say (defaults computed from other modules, the
# unit-file checks beyond Type= and Restart=) is listed in the doc.
{ lib, ... }:
let
  inherit (lib) mkOption types;
  opt = type: default: mkOption { inherit type default; };

  inherit (import ./fake-nixpkgs/nixos/lib/systemd-types.nix { inherit lib; }) unitNameType unitOption serviceConfig;
  units = opt (types.listOf unitNameType) [ ];
  service = types.submodule {
    options = {
      enable = opt types.bool true;
      description = opt types.singleLineStr "";
      wantedBy = units;
      before = units;
      conflicts = units;
      unitConfig = opt (types.attrsOf unitOption) { };
      serviceConfig = opt serviceConfig { };
      path = opt (types.listOf (types.oneOf [ types.package types.str ])) [ ];
      environment = opt (types.attrsOf (types.nullOr (types.oneOf [ types.str types.path types.package ]))) { };
      restartIfChanged = opt types.bool true;
    };
  };
  # nixos/modules/system/boot/kernel.nix
  kernelParam = types.strMatching ''([^"[:space:]]|"[^"]*")+'' // {
    name = "kernelParam";
    description = "string, with spaces inside double quotes";
  };
  # nixos/modules/services/networking/firewall.nix
  portRange = types.attrsOf types.port;
in
{
  # services.journald: ./fake-nixpkgs/nixos/modules/journald.nix (or journald-settings.nix).
  options = {
    assertions = opt (types.listOf types.unspecified) [ ];
    system.stateVersion = opt types.str lib.trivial.release;
    documentation.enable = opt types.bool true;
    documentation.nixos.enable = opt types.bool true;
    boot.kernelModules = opt (types.listOf types.str) [ ];
    boot.kernelParams = opt (types.listOf kernelParam) [ ];
    boot.initrd.availableKernelModules = opt (types.listOf types.str) [ ];
    boot.loader.grub.enable = opt types.bool true;
    systemd.services = opt (types.attrsOf service) { };
    systemd.enableEmergencyMode = opt types.bool true;
    services.getty.autologinUser = opt (types.nullOr types.str) null;
    networking.useDHCP = opt types.bool true;
    networking.usePredictableInterfaceNames = opt types.bool true;
    # Declared (not set by the modules) so that opening a port would evaluate and be caught.
    networking.firewall = {
      allowedTCPPorts = opt (types.listOf types.port) [ ];
      allowedUDPPorts = opt (types.listOf types.port) [ ];
      allowedTCPPortRanges = opt (types.listOf portRange) [ ];
      allowedUDPPortRanges = opt (types.listOf portRange) [ ];
    };
  };
}
