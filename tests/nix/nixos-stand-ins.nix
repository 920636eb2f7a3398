# Minimal stand-ins for the NixOS options that modules/backdoor.nix and modules/test-node.nix set
# (nixpkgs is not available here, only its lib). Typed like upstream, and without free-form
# attributes, so that a misspelt option in a module fails evaluation instead of vanishing.
{ lib, ... }:
let
  inherit (lib) mkOption types;
  opt = type: default: mkOption { inherit type default; };
  strs = opt (types.listOf types.str) [ ];
  unitSection = opt (types.attrsOf (types.oneOf [ types.bool types.int types.str (types.listOf types.str) ])) { };
  service = types.submodule {
    options = {
      enable = opt types.bool true;
      description = opt types.str "";
      wantedBy = strs;
      before = strs;
      conflicts = strs;
      unitConfig = unitSection;
      serviceConfig = unitSection;
      path = opt (types.listOf (types.either types.package types.str)) [ ];
      environment = opt (types.attrsOf (types.nullOr types.str)) { };
      restartIfChanged = opt types.bool true;
    };
  };
  portRange = types.submodule { options = { from = opt types.port 0; to = opt types.port 0; }; };
in
{
  options = {
    assertions = opt (types.listOf (types.submodule {
      options = { assertion = opt types.bool true; message = opt types.str ""; };
    })) [ ];
    system.stateVersion = opt types.str "";
    documentation.enable = opt types.bool true;
    documentation.nixos.enable = opt types.bool true;
    boot.kernelModules = strs;
    boot.kernelParams = strs;
    boot.initrd.availableKernelModules = strs;
    boot.loader.grub.enable = opt types.bool true;
    systemd.services = opt (types.attrsOf service) { };
    systemd.enableEmergencyMode = opt types.bool true;
    services.journald.extraConfig = opt types.lines "";
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
