# Evaluate nixlib/mkTest.nix without nixpkgs: a fake pkgs (fake-nixpkgs/pkgs.nix) whose
# `path` is a fake nixpkgs tree (fake-nixpkgs/nixos/lib/eval-config.nix: lib.evalModules over
# typed stand-ins for the NixOS options).  Several tests in one evaluation:
#   nix-instantiate --eval --strict --json --readonly-mode tests/nix/eval-mktest.nix \
#     --argstr libPath $NIXPKGS_LIB --argstr tests '{"<key>": <test>, ...}' \
#     [--arg functions '{ f = { nodes, ... }: "..."; }']
# A <test> is mkTest's arguments as JSON: name, nodes (NixOS configurations as JSON), testScript
# (a string, or {"function": "f"} for one of `functions`), and optionally backend, skipLint,
# skipTypeCheck, globalTimeout, defaults, accel, requiredSystemFeatures.  The result maps each key to what the test
# computed: the spec, the run and driver derivations, and per node the evaluated configuration.
{ libPath, tests, functions ? { } }:
let
  lib = import libPath;
  pkgs = import ./fake-nixpkgs/pkgs.nix { inherit lib; };
  mkTest = import ../../nixlib/mkTest.nix;
  ntng = pkgs.runCommand "nixos-test-ng-0.1.0" { meta.mainProgram = "ntng"; } "fake ntng";

  # (Not `outPath`: toJSON would turn the record into that string.)
  drvInfo = d: {
    inherit (d) name;
    path = d.outPath;
    script = d.buildCommand;
    requiredSystemFeatures = d.requiredSystemFeatures or [ ];
    nativeBuildInputs = map toString (d.nativeBuildInputs or [ ]);
    meta = d.meta or { };
  };
  pathOf = d: d.outPath;

  nodeInfo = c: {
    inherit (c.networking) hostName extraHosts interfaces;
    inherit (c.systemd.network) links;
    inherit (c.ntng.vm) nodeOptions;
    inherit (c) virtualisation fileSystems;
    system = c.nixpkgs.system;
    backdoor = c.ntng.backdoor // { package = pathOf c.ntng.backdoor.package; };
    backdoorUnit = c.systemd.services.ntng-backdoor or null;
    serialGettys = lib.filterAttrs (n: _: lib.hasPrefix "serial-getty@" n) c.systemd.services;
    vtGettys = lib.filterAttrs (n: _: lib.hasPrefix "getty@" n || lib.hasPrefix "autovt@" n) c.systemd.services;
    inherit (c.services.getty) autologinUser;
    kernelParams = c.boot.kernelParams;
    isContainer = c.boot.isContainer;
    kernelModules = c.boot.kernelModules;
    initrdKernelModules = c.boot.initrd.kernelModules;
    initrdAvailableKernelModules = c.boot.initrd.availableKernelModules;
    loader = c.system.boot.loader;
    build = lib.mapAttrs (_: pathOf) { inherit (c.system.build) kernel initialRamdisk toplevel; };
    # What mkTest should have made of this node: the same calls give the same fake paths.
    rootfs = drvInfo (pkgs.callPackage ../../nixlib/pkgs/rootfs.nix {
      toplevel = c.system.build.toplevel; size = c.ntng.vm.rootSize; });
    vmlinux = drvInfo (pkgs.callPackage ../../nixlib/pkgs/vmlinux.nix {
      kernel = c.system.build.kernel; kernelFile = c.system.boot.loader.kernelFile; });
  };

  evalOne = t:
    let
      script = if builtins.isAttrs (t.testScript or "") then functions.${t.testScript.function} else t.testScript or "";
      run = mkTest ({
        inherit pkgs ntng;
        inherit (t) name nodes;
        testScript = script;
      } // lib.optionalAttrs (t ? defaults) { inherit (t) defaults; }
        // builtins.intersectAttrs { backend = 1; skipLint = 1; skipTypeCheck = 1; globalTimeout = 1; accel = 1; requiredSystemFeatures = 1; } t);
    in {
      run = drvInfo run;
      driver = drvInfo run.driver;
      driverInteractive = drvInfo run.driverInteractive;
      inherit (run) spec;
      driverSpecIsTheSpec = run.driver.spec == run.spec && run.driverInteractive.spec == run.spec;
      # The files the driver copies: writeText of each spec as JSON.
      specFiles = lib.mapAttrs (accel: s: pkgs.storePath "ntng-spec-${t.name}-${accel}.json" (builtins.toJSON s)) run.spec;
      nodes = lib.mapAttrs (_: s: nodeInfo s.config) run.nodes;
      driverNodesAreTheNodes = builtins.attrNames run.driver.nodes == builtins.attrNames run.nodes;
      packages = lib.mapAttrs (_: pathOf) { inherit ntng; inherit (pkgs) qemu_kvm firecracker cloud-hypervisor systemd util-linux; }
        // { inherit (pkgs) runtimeShell; };
    };
in
lib.mapAttrs (_: evalOne) (builtins.fromJSON tests)
