# services.journald as the newest nixpkgs declares it: settings.<section>.<key>, and extraConfig
# removed (mkRemovedOptionModule: defining it fails evaluation with the upstream message).
{ lib, ... }:
let
  inherit (lib) mkOption types;
  inherit (import ../lib/systemd-types.nix { inherit lib; }) unitOption;
in
{
  imports = [
    (lib.mkRemovedOptionModule [ "services" "journald" "extraConfig" ] "Use services.journald.settings.Journal instead.")
  ];
  options.services.journald.settings = mkOption {
    type = types.submodule { freeformType = types.attrsOf (types.attrsOf unitOption); };
    default = { };
  };
}
