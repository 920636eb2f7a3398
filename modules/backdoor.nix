# nixosModules.backdoor: the nixos-test-ng agent as an early systemd service, listening on a
# virtio-serial port or a console device such as /dev/hvc0 ("virtconsole"), or on an AF_VSOCK
# port, or (a systemd-nspawn container) on a unix socket in a folder the host bind-mounts,
# never on an IP network.
# Mirrors backdoor/debian/ntng-backdoor.service and journald-console.conf of the Debian image.
{ config, lib, pkgs, options, ... }:
let
  inherit (lib) mkOption types;
  cfg = config.ntng.backdoor;
  vsock = cfg.transport == "vsock";
  # A container (nixlib/nspawn.nix): no kernel modules, no serial line; the agent finds its
  # folder in init's arguments (ntng.backdoor=unix:<folder>, as the Debian image's unit does).
  unix = cfg.transport == "unix";
  # A console device (Cloud Hypervisor's virtio-console is hvc0, it has no port names).
  device = !vsock && !unix && builtins.isString cfg.port && builtins.match "/dev/hvc[0-9]+" cfg.port != null;
  # virtio_console serves named virtio-serial ports; vmw_vsock_virtio_transport needs vsock.
  kernelModules = if unix then [ ] else if vsock then [ "vsock" "vmw_vsock_virtio_transport" ] else [ "virtio_console" ];
  # QEMU hands the run's backdoor key to the guest as a fw_cfg file (nixlib/qemu.nix); the agent
  # reads it from /sys/firmware/qemu_fw_cfg, which this module makes.  Not in the initrd: the
  # agent starts from the root file system.  (No fw_cfg on Firecracker or Cloud Hypervisor: the
  # module loads, finds no device, and the agent serves without a key.)
  # A container's key is a file in its folder (the agent reads it there).
  keyModules = lib.optional (!unix) "qemu_fw_cfg";
  # journald.conf [Journal]: the journal on the serial console the runner streams (a
  # container's console is /dev/console, which nspawn copies to the runner).
  journalConsole = { ForwardToConsole = "yes"; TTYPath = if unix then "/dev/console" else "/dev/ttyS0"; MaxLevelConsole = "info"; };
  listenArgs =
    if unix then "--from-cmdline"
    else if vsock then "--vsock-port ${toString cfg.port}"
    else if device then "--device ${cfg.port}"
    else "--port-name ${toString cfg.port}";
in
{
  # `testing.backdoor` belongs to upstream NixOS' own test driver.
  options.ntng.backdoor = {
    enable = mkOption {
      type = types.bool;
      default = false;
      description = "Run the nixos-test-ng backdoor agent, which gives the test runner a root shell.";
    };
    transport = mkOption {
      type = types.enum [ "virtconsole" "vsock" "unix" ];
      default = "virtconsole";
      description = "Channel to the host: a named virtio-serial port, an AF_VSOCK port, or (a container) a unix socket in a host folder bind-mounted at `port`.";
    };
    port = mkOption {
      type = types.either types.str types.port;
      default = if vsock then 1234 else if unix then "/run/ntng-host" else "org.ntng.backdoor";
      defaultText = lib.literalExpression ''if transport == "vsock" then 1234 else if transport == "unix" then "/run/ntng-host" else "org.ntng.backdoor"'';
      description = "virtio-serial port name or console device /dev/hvcN (virtconsole), vsock port number (vsock), or the folder the host bind-mounts (unix).";
    };
    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ../nixlib/pkgs/agent.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage nixlib/pkgs/agent.nix { }";
      description = "The agent; must provide bin/ntng-backdoor.";
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        # The name goes into ExecStart unquoted and into /dev/virtio-ports/<name>.
        assertion = vsock || unix || device || (builtins.isString cfg.port && builtins.match "[A-Za-z0-9][A-Za-z0-9._-]*" cfg.port != null);
        message = ''ntng.backdoor.port must be a virtio-serial port name like "org.ntng.backdoor" or a console device like "/dev/hvc0" when transport is "virtconsole", got ${builtins.toJSON cfg.port}'';
      }
      {
        assertion = !vsock || builtins.isInt cfg.port;
        message = ''ntng.backdoor.port must be a port number like 1234 when transport is "vsock", got ${builtins.toJSON cfg.port}'';
      }
      {
        # nixlib/nspawn.nix bind-mounts the folder at /run/ntng-host and names it to init.
        assertion = !unix || cfg.port == "/run/ntng-host";
        message = ''ntng.backdoor.port must be "/run/ntng-host" when transport is "unix" (where the runner bind-mounts the backdoor folder), got ${builtins.toJSON cfg.port}'';
      }
    ];

    # systemd-getty-generator starts a getty on hvc0 when it exists: it would read what the
    # host sends the agent.  (A disabled unit is masked.)
    systemd.services."serial-getty@${baseNameOf (toString cfg.port)}" = lib.mkIf device { enable = false; };

    systemd.services.ntng-backdoor = {
      description = "nixos-test-ng backdoor agent";
      # As early as the root file system allows: wait_for_unit and friends are asked through it
      # while the rest of the system is still booting.
      wantedBy = [ "sysinit.target" ];
      before = [ "sysinit.target" "shutdown.target" ];
      conflicts = [ "shutdown.target" ];
      unitConfig = {
        DefaultDependencies = false;
        # Restart=always must not give up after a few quick crashes, nor may isolating
        # rescue/emergency.target stop the only way in.
        StartLimitIntervalSec = 0;
        IgnoreOnIsolate = true;
      } // lib.optionalAttrs unix {
        # systemd checks its own arguments in a container: without the host's folder named
        # there the agent would serve its default virtio-serial port, which a container lacks.
        ConditionKernelCommandLine = "ntng.backdoor=unix:${cfg.port}";
      };
      # Commands run by the agent see the system's PATH (and setuid wrappers); the packages are
      # the fallback for the early boot and for modprobe.
      path = [ "/run/wrappers" "/run/current-system/sw" pkgs.coreutils pkgs.util-linux pkgs.systemd pkgs.kmod ];
      environment = { HOME = "/root"; USER = "root"; };
      # A test that runs switch-to-configuration through the agent must keep its connection.
      restartIfChanged = false;
      serviceConfig = {
        # Load the transport now rather than waiting for systemd-modules-load (part of sysinit).
        ExecStartPre = lib.mkIf (!unix) "-${pkgs.kmod}/bin/modprobe -a ${lib.concatStringsSep " " (kernelModules ++ keyModules)}";
        ExecStart = "${cfg.package}/bin/ntng-backdoor ${listenArgs}";
        Restart = "always";
        RestartSec = 0;
        # Commands are the agent's children: a restarted agent must not kill what a test started.
        KillMode = "process";
        OOMScoreAdjust = -1000;
        # Boot under TCG is CPU-bound: the agent goes first so the host can talk to the guest early.
        Nice = -20;
        CPUWeight = 10000;
        IOWeight = 10000;
        StandardOutput = "journal+console";
      };
    };

    boot.initrd.availableKernelModules = kernelModules;
    boot.kernelModules = kernelModules ++ keyModules;

    # The runner streams the serial console for failure detection. ttyS0 only: every backend
    # (QEMU q35/microvm, Firecracker, Cloud Hypervisor) has that UART, while hvc0 exists only with
    # a virtconsole at port 0, and the last console= becomes /dev/console.
    boot.kernelParams = lib.mkIf (!unix) [ "console=ttyS0,115200" ];
    # The newest nixpkgs declares services.journald.settings and has removed extraConfig (defining
    # it fails evaluation); older ones have extraConfig only.  Whichever this NixOS declares.
    services.journald = if options.services.journald ? settings
      then { settings.Journal = journalConsole; }
      else { extraConfig = lib.concatStrings (lib.mapAttrsToList (k: v: "${k}=${v}\n") journalConsole); };
  };
}
