# lib.mkTest: a VM test of NixOS nodes, run by nixos-test-ng.  `pkgs` comes from the caller,
# so the test uses the caller's nixpkgs (no version skew); everything else is nixlib.
#
#   checks.x86_64-linux.sync = nixos-test-ng.lib.mkTest {
#     inherit pkgs; name = "sync";
#     nodes.a = { ... }; nodes.b = { ... };        # NixOS modules
#     testScript = "start_all() ...";              # NixOS test driver API
#   };
#
# Result: the run derivation (requiredSystemFeatures nixos-test + kvm, output = the run's
# artifacts: reports, consoles, journals), with .driver (bin/nixos-test-driver) and .driverInteractive (a REPL), .nodes (the
# evaluated NixOS systems) and .spec (what nixlib computed, per accelerator).
{ pkgs
, name
, nodes
, testScript
, globalTimeout ? 3600
, backend ? "qemu"
, skipLint ? false
, skipTypeCheck ? false
, defaults ? { } # a NixOS module added to every node
  # The accelerator of the run derivation.  "tcg" (QEMU nodes only) builds on machines without
  # KVM, e.g. CI runners without /dev/kvm, about 10x slower.
, accel ? "kvm"
  # What a builder must offer (its `system-features`, /etc/nix/machines): Nix and Hydra place
  # the test only there, so a fleet of builders spreads a suite.  Add your own, e.g. "big-parallel".
, requiredSystemFeatures ? [ "nixos-test" ] ++ (if accel == "kvm" then [ "kvm" ] else [ ])
, ntng ? pkgs.callPackage ./pkgs/ntng.nix { }
, evalConfig ? import (pkgs.path + "/nixos/lib/eval-config.nix")
}:
let
  inherit (pkgs) lib;
  nixlib = import ./default.nix;
  capabilities = import ./capabilities.nix;

  # The agent's side of each nixlib transport (modules/backdoor.nix).
  guestTransport = {
    virtio-serial = { transport = "virtconsole"; port = "org.ntng.backdoor"; };
    virtconsole = { transport = "virtconsole"; port = "/dev/hvc0"; };
    vsock = { transport = "vsock"; port = 1234; };
    unix = { transport = "unix"; port = "/run/ntng-host"; }; # nixlib/nspawn.nix's guestFolder
  };

  # The plan needs every node's vlans and every node needs its part of the plan: both come
  # from the same lazily evaluated systems (as NixOS' own test framework does with `nodes`).
  plan = nixlib.network.plan (lib.mapAttrs (_: s: { vlans = s.config.virtualisation.vlans; }) systems);

  nodeModule = nodeName: { config, lib, ... }: {
    networking.hostName = lib.mkDefault nodeName;
    ntng.vm.backend = lib.mkDefault backend;
    ntng.network = { interfaces = plan.nodes.${nodeName}; inherit (plan) hostsFile; };
    ntng.backdoor = guestTransport.${transportOf config};
  };
  transportOf = config: builtins.head capabilities.backends.${config.ntng.vm.backend}.transports;

  systems = lib.mapAttrs (nodeName: module: evalConfig {
    inherit pkgs;
    inherit (pkgs.stdenv.hostPlatform) system;
    # Errors in the caller's modules name them, not this file (eval-config's default location).
    modules = [ (lib.setDefaultModuleLocation "nodes.${nodeName} (test ${name})" module)
      (lib.setDefaultModuleLocation "defaults (test ${name})" defaults)
      ../modules/test-node.nix ../modules/vm.nix ../modules/test-network.nix (nodeModule nodeName) ];
  }) nodes;

  # What nixlib's node description gets: the VM options plus the boot artefacts each backend
  # needs (an ELF vmlinux for Firecracker and microvm, a bzImage otherwise; the ext4 root).
  nodeRecord = nodeName: s:
    let
      c = s.config;
      kernelPkg = c.system.build.kernel;
      wantsElf = c.ntng.vm.backend == "firecracker" || c.ntng.vm.machineType == "microvm";
      vmlinux = pkgs.callPackage ./pkgs/vmlinux.nix { kernel = kernelPkg; kernelFile = c.system.boot.loader.kernelFile; };
      rootfs = pkgs.callPackage ./pkgs/rootfs.nix { toplevel = c.system.build.toplevel; size = c.ntng.vm.rootSize; };
    in
    c.ntng.vm.nodeOptions // {
      kernel = if wantsElf then "${vmlinux}" else "${kernelPkg}/${c.system.boot.loader.kernelFile}";
      initrd = "${c.system.build.initialRamdisk}/${c.system.boot.loader.initrdFile}";
      image = "${rootfs}";
      imageFormat = "raw";
      kernelParams = c.boot.kernelParams ++ [ "init=${c.system.build.toplevel}/init" ];
      backdoor.transport = transportOf c;
    };

  # A container (ntng.vm.backend = "nspawn"): no kernel, initrd or disk image.  nspawn runs the
  # system's init as PID 1 in a root folder of its own with the host's /nix/store read-only, as
  # NixOS' containers do (nixlib/nspawn.nix); `kernel` and `image` name the same system for
  # node.nix, which wants them.  Only boot.kernelParams reach init (as systemd's arguments): a
  # word there that needs a kernel is refused by the plan, naming it.
  containerRecord = s:
    let c = s.config; init = "${c.system.build.toplevel}/init"; in
    c.ntng.vm.nodeOptions // {
      inherit init;
      kernel = init;
      image = "${c.system.build.toplevel}";
      imageFormat = "raw";
      kernelParams = c.boot.kernelParams;
      backdoor.transport = transportOf c;
    };

  records = lib.mapAttrs (nodeName: s:
    if s.config.ntng.vm.backend == "nspawn" then containerRecord s else nodeRecord nodeName s) systems;
  backends = lib.unique (lib.mapAttrsToList (_: s: s.config.ntng.vm.backend) systems);
  uses = b: builtins.elem b backends;

  # Only the VMMs the test uses become dependencies of the driver.  virtiofsd and
  # vhost-device-vsock are found on the PATH of the runner (`ntng`'s wrapper has them: nixlib/tools.nix);
  # node.nix's virtiofsd default is Debian's /usr/lib/qemu/virtiofsd.
  binaries = { virtiofsd = "virtiofsd"; } // lib.optionalAttrs (uses "qemu") {
    qemuBinary = "${pkgs.qemu_kvm}/bin/qemu-system-x86_64";
    qemuImg = "${pkgs.qemu_kvm}/bin/qemu-img";
  } // lib.optionalAttrs (uses "firecracker") {
    firecrackerBinary = lib.getExe pkgs.firecracker;
  } // lib.optionalAttrs (uses "cloud-hypervisor") {
    cloudHypervisorBinary = lib.getExe pkgs.cloud-hypervisor;
  } // lib.optionalAttrs (uses "nspawn") {
    nspawnBinary = "${pkgs.systemd}/bin/systemd-nspawn";
    unshareBinary = "${pkgs.util-linux}/bin/unshare";
  };

  specFor = accel: import ./test.nix {
    header = { inherit name globalTimeout skipLint skipTypeCheck backend; nodes = records; };
    defaults = binaries // { inherit accel; stateRoot = "@stateRoot@"; };
  };
  # TCG is for QEMU only (interactive use on machines without KVM); the Nix build needs KVM.
  # A container has no accelerator: it runs beside TCG QEMU nodes as well.
  spec = { kvm = specFor "kvm"; } // lib.optionalAttrs (lib.all (b: b == "qemu" || b == "nspawn") backends) { tcg = specFor "tcg"; };
  specFiles = lib.mapAttrs (accel: s: pkgs.writeText "ntng-spec-${name}-${accel}.json" (builtins.toJSON s)) spec;

  script = if lib.isFunction testScript
    # nodes.<name> is the node's config; nodes.<name>.config is the old spelling, still used.
    then testScript { nodes = lib.mapAttrs (_: s: s.config // { inherit (s) config; }) systems; }
    else testScript;
  scriptFile = pkgs.writeText "ntng-test-${name}.py" script;

  checkArgs = lib.optional skipTypeCheck "--no-type-check";

  mkDriver = { interactive }: pkgs.runCommand "ntng-driver-${name}${lib.optionalString interactive "-interactive"}" {
    nativeBuildInputs = [ ntng ];
    passthru = { inherit spec; nodes = systems; };
  } ''
    mkdir -p $out/bin $out/share/ntng
    ${lib.concatStrings (lib.mapAttrsToList (accel: f: "cp ${f} $out/share/ntng/spec-${accel}.json\n") specFiles)}
    cp ${scriptFile} $out/share/ntng/test-script.py
    ${lib.optionalString (!skipLint) ''
      # The quick check: parse, lint and type-check the script against the driver API, no boot.
      ntng check ${lib.escapeShellArgs checkArgs} --spec-dir $out/share/ntng $out/share/ntng/test-script.py
    ''}
    cat > $out/bin/nixos-test-driver <<EOF
    #!${pkgs.runtimeShell}
    exec ${lib.getExe ntng} run --spec-dir $out/share/ntng ${lib.optionalString interactive "--interactive"} "\$@" $out/share/ntng/test-script.py
    EOF
    chmod +x $out/bin/nixos-test-driver
  '';

  driver = mkDriver { interactive = false; };
  driverInteractive = mkDriver { interactive = true; };
  runAccel =
    if !(builtins.elem accel [ "kvm" "tcg" ]) then throw "mkTest ${name}: accel must be \"kvm\" or \"tcg\", got ${builtins.toJSON accel}"
    else if !(spec ? ${accel}) then throw "mkTest ${name}: accel = \"tcg\" needs QEMU nodes only (this test uses ${lib.concatStringsSep ", " backends}); Firecracker and Cloud Hypervisor need KVM"
    else accel;
in
pkgs.runCommand "ntng-test-${name}" {
  inherit requiredSystemFeatures;
  passthru = { inherit driver driverInteractive spec; nodes = systems; };
  meta.timeout = globalTimeout;
} ''
  ${driver}/bin/nixos-test-driver --accel ${runAccel} --output-directory $out
''
