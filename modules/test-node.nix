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

  # Headless: the only interactive console is the serial one (ttyS0), logged in as root for
  # `driverInteractive`; no getty on virtual terminals nobody sees.
  services.getty.autologinUser = mkDefault "root";
  systemd.services."getty@tty1".enable = mkDefault false;
  systemd.services."autovt@".enable = mkDefault false;

  # A failing boot must stay reachable through the backdoor, not sit in an emergency shell.
  systemd.enableEmergencyMode = mkDefault false;

  system.stateVersion = mkDefault lib.trivial.release;
}
