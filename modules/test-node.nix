# Defaults for a nixos-test-ng test VM: the backdoor on, nothing that slows boot or waits for
# hardware a test VM does not have. All mkDefault, so a node's own configuration wins.
{ lib, ... }:
let
  inherit (lib) mkDefault;
in
{
  imports = [ ./backdoor.nix ];

  ntng.backdoor.enable = mkDefault true;

  # Building the manual and man caches costs more than most tests take.
  documentation.enable = mkDefault false;
  documentation.nixos.enable = mkDefault false;

  # The kernel is booted directly by the VMM; there is no boot loader to install.
  boot.loader.grub.enable = mkDefault false;

  # Networks are the test's (static addresses from the network plan), eth0.. as in the NixOS
  # driver; nothing may wait for a DHCP lease or "online".
  networking.useDHCP = mkDefault false;
  networking.usePredictableInterfaceNames = mkDefault false;
  systemd.services.systemd-networkd-wait-online.enable = mkDefault false;

  # The serial console (ttyS0) is logged in as root for `driverInteractive`.  The virtual
  # terminals keep their gettys, as on NixOS test nodes (nixpkgs' nixos/tests/login.nix waits for
  # agetty on tty1 and switches VTs); on a node with a display modules/vm.nix turns the autologin
  # off so that they show a login prompt, as there.
  services.getty.autologinUser = mkDefault "root";

  # A failing boot must stay reachable through the backdoor, not sit in an emergency shell.
  systemd.enableEmergencyMode = mkDefault false;

  system.stateVersion = mkDefault lib.trivial.release;
}
