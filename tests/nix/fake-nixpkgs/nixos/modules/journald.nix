# services.journald as nixpkgs declared it until the journald `settings` conversion: a
# free-text extraConfig (nixos/modules/system/boot/systemd/journald.nix).
{ lib, ... }:
{
  options.services.journald.extraConfig = lib.mkOption { type = lib.types.lines; default = ""; };
}
