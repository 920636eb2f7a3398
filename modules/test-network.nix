# A node's part of the test's network plan (nixlib/network.nix), made into NixOS networking:
# each NIC is named by its MAC (the plan's ethN), gets the plan's static addresses, and every
# node's name resolves through /etc/hosts.
{ config, lib, ... }:
let
  inherit (lib) mkOption types;
  cfg = config.ntng.network;
in
{
  options.ntng.network = {
    interfaces = mkOption {
      type = types.listOf (types.attrsOf types.anything);
      default = [ ];
      description = "This node's interfaces from the network plan ({ guestName, mac, ipv4, prefixLength4, ipv6, prefixLength6, ... }).";
    };
    hostsFile = mkOption { type = types.lines; default = ""; description = "Hosts entries for every node."; };
  };

  config = {
    # Names follow MACs, not probe order (virtio-mmio and PCI enumerate differently).
    systemd.network.links = lib.listToAttrs (map (i: {
      name = "10-ntng-${i.guestName}";
      value = { matchConfig.MACAddress = i.mac; linkConfig.Name = i.guestName; };
    }) cfg.interfaces);
    networking.interfaces = lib.listToAttrs (map (i: {
      name = i.guestName;
      value = {
        ipv4.addresses = [ { address = i.ipv4; prefixLength = i.prefixLength4; } ];
        ipv6.addresses = [ { address = i.ipv6; prefixLength = i.prefixLength6; } ];
      };
    }) cfg.interfaces);
    networking.extraHosts = cfg.hostsFile;
  };
}
