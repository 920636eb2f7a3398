# Evaluate modules/<entry>.nix with nixpkgs' lib.evalModules, the NixOS stand-ins and a fake pkgs:
#   nix-instantiate --eval --strict --json --readonly-mode tests/nix/eval-module.nix \
#     --argstr libPath $NIXPKGS_LIB --argstr entry test-node --argstr config '<json module>' \
#     [--argstr journald journald-settings]   # services.journald as the newest nixpkgs declares it
{ libPath, entry ? "test-node", config ? "{}", journald ? "journald" }:
let
  lib = import libPath;
  modulesDir = toString ../../modules;

  fakeDrv = name: extra: { type = "derivation"; inherit name; outPath = "/nix/store/${lib.fixedWidthString 32 "0" ""}-${name}"; } // extra;
  # Just enough of nixpkgs for the modules and nixlib/pkgs/agent.nix; callPackage really
  # calls the file, so its arguments and build script are evaluated too.
  pkgs = {
    coreutils = fakeDrv "coreutils" { };
    util-linux = fakeDrv "util-linux" { };
    systemd = fakeDrv "systemd" { };
    kmod = fakeDrv "kmod" { };
    runtimeShell = "/nix/store/fake-bash/bin/bash";
    # The environment's name lists the packages asked for: "python3-with-construct".
    python3 = fakeDrv "python3" {
      withPackages = f:
        let name = "python3-with-${lib.concatStringsSep "-" (f { construct = "construct"; })}";
        in fakeDrv name { interpreter = "/nix/store/fake-${name}/bin/python3"; };
    };
    runCommand = name: env: script: fakeDrv name { inherit env script; };
    callPackage = path: overrides:
      let f = import path;
      in f (builtins.intersectAttrs (builtins.functionArgs f) pkgs // overrides);
  };

  eval = lib.evalModules {
    modules = [
      ./nixos-stand-ins.nix
      (./fake-nixpkgs/nixos/modules + "/${journald}.nix")
      (../../modules + "/${entry}.nix")
      { _file = "user-config"; imports = [ (builtins.fromJSON config) ]; }
      { _module.args.pkgs = pkgs; }
    ];
  };
  cfg = eval.config;

  # Every option our modules define, e.g. "networking.firewall.allowedTCPPorts".
  options = lib.collect lib.isOption eval.options;
  fromModules = o: lib.any (f: lib.hasPrefix modulesDir (toString f)) o.files;
  agent = cfg.ntng.backdoor.package;
in
{
  failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) cfg.assertions);
  setByModules = map (o: lib.showOption o.loc) (lib.filter fromModules options);
  agent = { inherit (agent) name; script = agent.script or null; env = agent.env or null; };
  config = { inherit (cfg) ntng systemd boot networking documentation system; }
    # (A removed option throws when read.)
    // { services = cfg.services // { journald = removeAttrs cfg.services.journald (lib.optional (journald != "journald") "extraConfig"); }; };
}
