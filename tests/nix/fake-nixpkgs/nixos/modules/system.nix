# A fake NixOS system build: the kernel, initrd and toplevel as fake derivations whose paths
# name the node (its hostName) and hash the configuration that goes into them, so a test sees
# which node's kernel, initrd or system a VM boots, and that a changed configuration changes it.
# As upstream, the toplevel fails to evaluate while an assertion fails.
{ config, lib, pkgs, ... }:
let
  inherit (config.networking) hostName;
  version = "6.6.63";
  hashed = name: content: extra: {
    type = "derivation";
    inherit name;
    outPath = pkgs.storePath name (builtins.toJSON content);
    meta = { };
  } // extra;
  failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
in
{
  config = {
    boot.kernelParams = lib.mkIf (!config.boot.isContainer) [ "loglevel=${toString config.boot.consoleLogLevel}" ]; # kernel.nix: boot.kernel.enable
    system.boot.loader.kernelFile = lib.mkDefault pkgs.stdenv.hostPlatform.linux-kernel.target;

    system.build.kernel = hashed "linux-${version}-${hostName}" { inherit hostName version; } {
      pname = "linux-${hostName}";
      inherit version;
      modDirVersion = version;
    };
    system.build.initialRamdisk = hashed "initrd-linux-${version}-${hostName}"
      { inherit hostName; inherit (config.boot.initrd) availableKernelModules; } { };
    system.build.toplevel =
      if failedAssertions != [ ]
      then throw "\nFailed assertions:\n${lib.concatMapStrings (m: "- ${m}\n") failedAssertions}"
      else hashed "nixos-system-${hostName}-${config.system.nixos.release}" {
        inherit (config) boot networking systemd fileSystems services;
        kernel = config.system.build.kernel.outPath;
        initrd = config.system.build.initialRamdisk.outPath;
      } { };
  };
}
