# Cloud Hypervisor launch plan for one node, builtins only.
#
# Input: a node description (see ./node.nix for the defaults and validation; `backend` may be
# left out, `imageFormat` defaults to "raw" here).  Output: the plan record every backend
# shares (see `launch` below).  Two equivalent routes to the same VM:
#   - API (the default): `argv` starts the VMM with only its API socket; the runner then sends
#     `api` in order: PUT vm.create with the whole VmConfig, then PUT vm.boot.
#   - command line: `cliArgv` creates and boots the VM at once (it keeps --api-socket, so
#     pause/resume/snapshot and the vm.info look-up below still work).
# Request bodies follow Cloud Hypervisor's API spec (contract-tested: $NTNG_SPECS/cloud-hypervisor.yaml).
#
# Consoles: the serial port (ttyS0, the kernel and journal console) is written to
# files.consoleLog.  With the "virtconsole" transport the agent uses hvc0, the virtio-console.
# The spec's ConsoleConfig has a `socket` field and ConsoleMode lists "Socket", but Cloud
# Hypervisor accepts Socket for the serial port only: for the virtio-console, vm.create fails
# with "No socket option support for console device" (vmm/src/console_devices.rs at the spec's
# commit ae44c297), and --console's own syntax omits socket=.  The closest documented mode that
# the host can both read and write is Pty: Cloud Hypervisor allocates a pseudo-terminal and
# reports its path in GET /api/v1/vm.info as config.console.file (available right after
# vm.create); `backdoor.pty` says where to find it.  With the "vsock" transport there is no
# virtio-console at all, and the backdoor is hybrid vsock as with Firecracker: the host connects
# to `backdoor.uds` and writes "CONNECT <port>\n".
let
  node = import ./node.nix;
  shares = import ./shares.nix;
  inherit (builtins) concatStringsSep elemAt genList length toJSON;

  backend = "cloud-hypervisor";
  apiBase = "/api/v1"; # the spec's servers[0] URL path

  # Everything the runner creates or connects to lives in the node's state directory.
  paths = n: {
    api = "${n.stateDir}/cloud-hypervisor.sock";
    vsock = "${n.stateDir}/vsock.sock";
    consoleLog = "${n.stateDir}/console.log";
    disk = "${n.stateDir}/disk.raw";
    stderr = "${n.stateDir}/cloud-hypervisor.stderr";
  };

  fail = n: msg: throw "node '${n.name}': ${msg}";

  # A node description meant for another backend is an error, not something to convert.
  forBackend = spec:
    if !(spec ? backend) || spec.backend == backend
    then { imageFormat = "raw"; } // spec // { inherit backend; }
    else throw "node '${spec.name or "?"}': backend ${toJSON spec.backend} is not ${backend} (cloudHypervisor.launch builds Cloud Hypervisor plans only; use ${spec.backend}.launch)";

  checks = n: [
    (n.cpu == null || fail n "cpu ${toJSON n.cpu}: a QEMU CPU model, backend ${backend} has none (leave cpu = null)")
    # QEMU's -no-reboot has no Cloud Hypervisor counterpart: a guest reboot restarts the VM.
    (n.allowReboot || fail n "allowReboot = false: backend ${backend} cannot exit on a guest reboot (it always reboots the VM); leave allowReboot = true")
  ];

  vsock = n: n.backdoor.transport == "vsock";

  nets = n: genList (i:
    let iface = elemAt n.interfaces i; in { tap = iface.tap; mac = iface.mac; id = "net${toString i}"; }
  ) (length n.interfaces);

  # virtiofs shares (the only kind here): virtiofsd reads guest RAM, which must be shared.
  virtiofs = n: shares.hasVirtiofs n.sharedDirs;
  fsConfigs = n: map (s: { inherit (s) tag; socket = shares.socket n.stateDir s; num_queues = 1; queue_size = 1024; }) n.sharedDirs;

  # VmConfig, the body of PUT vm.create.  `net`, `vsock` and `fs` are left out when there are none.
  vmConfig = n: p: {
    cpus = { boot_vcpus = n.cores; max_vcpus = n.cores; };
    memory = { size = n.memory * 1024 * 1024; } # bytes
      // (if virtiofs n then { shared = true; } else { });
    payload = {
      kernel = n.kernel;
      cmdline = concatStringsSep " " n.kernelParams;
    } // (if n.initrd != null then { initramfs = n.initrd; } else { });
    # image_type Raw: no format probing, and no "autodetected raw: sector 0 writes blocked".
    disks = [{ path = p.disk; readonly = false; image_type = "Raw"; id = "rootfs"; }];
    rng = { src = "/dev/urandom"; };
    serial = { mode = "File"; file = p.consoleLog; };
    console = if vsock n then { mode = "Off"; } else { mode = "Pty"; };
  }
  // (if n.interfaces != [ ] then { net = nets n; } else { })
  // (if vsock n then { vsock = { cid = n.backdoor.guestCid; socket = p.vsock; }; } else { })
  // (if n.sharedDirs != [ ] then { fs = fsConfigs n; } else { });

  # The same VmConfig as command-line options.
  cliArgs = n: p:
    let c = vmConfig n p; in
    [ "--kernel" n.kernel ]
    ++ (if n.initrd != null then [ "--initramfs" n.initrd ] else [ ])
    ++ [ "--cmdline" c.payload.cmdline
         "--cpus" "boot=${toString n.cores},max=${toString n.cores}"
         "--memory" "size=${toString n.memory}M${if virtiofs n then ",shared=on" else ""}"
         "--disk" "path=${p.disk},readonly=off,image_type=raw,id=rootfs" ]
    ++ builtins.concatMap (x: [ "--net" "tap=${x.tap},mac=${x.mac},id=${x.id}" ]) (nets n)
    ++ [ "--rng" "src=${c.rng.src}"
         "--serial" "file=${p.consoleLog}"
         "--console" (if vsock n then "off" else "pty") ]
    ++ (if vsock n then [ "--vsock" "cid=${toString n.backdoor.guestCid},socket=${p.vsock}" ] else [ ])
    ++ builtins.concatMap (f: [ "--fs" "tag=${f.tag},socket=${f.socket},num_queues=${toString f.num_queues},queue_size=${toString f.queue_size}" ]) (fsConfigs n);

  # The calls the runner makes while the VM runs (python/ntng/backends/cloud_hypervisor.py):
  # whether the VMM answers, pause and resume, the guest's reboot (what ctrl-alt-delete stands
  # for: there is no keyboard), and the VMM's own shutdown (quit).
  calls = {
    ping = { method = "GET"; path = "${apiBase}/vmm.ping"; };
    pause = { method = "PUT"; path = "${apiBase}/vm.pause"; };
    resume = { method = "PUT"; path = "${apiBase}/vm.resume"; };
    reboot = { method = "PUT"; path = "${apiBase}/vm.reboot"; };
    shutdown = { method = "PUT"; path = "${apiBase}/vmm.shutdown"; };
  };

  launch = spec:
    let
      n = node.normalise (forBackend spec);
      p = paths n;
      apiSocket = [ "--api-socket" "path=${p.api}" ];
    in
    builtins.deepSeq (checks n) {
      name = n.name;
      inherit backend;
      inherit (n) accel memory cores bootTimeout kernel; # kernel: for the runner's KVM probe
      inherit (n) stateDir; # the node's folder of sockets and files, made private before the VMM starts
      artifacts = node.artifacts n.name; # in the run's folder: console.log, journal.log
      prepare = [
        # Cloud Hypervisor replaces a leftover API socket itself, but binds the vsock one.
        ([ "rm" "-f" p.api ] ++ (if vsock n then [ p.vsock ] else [ ]))
        # A private writable disk: the base image stays untouched (sparse, CoW where possible).
        (node.copyArgv n.image p.disk)
      ];
      argv = [ n.cloudHypervisorBinary ] ++ apiSocket ++ n.extraArgs;
      cliArgv = [ n.cloudHypervisorBinary ] ++ apiSocket ++ cliArgs n p ++ n.extraArgs;
      writeFiles = { };
      api = [
        { method = "PUT"; path = "${apiBase}/vm.create"; body = vmConfig n p; }
        { method = "PUT"; path = "${apiBase}/vm.boot"; }
      ];
      sockets = { inherit (p) api; } // (if vsock n then { inherit (p) vsock; } else { });
      files = { inherit (p) consoleLog disk stderr; };
      backdoor =
        if vsock n then {
          transport = "vsock";
          uds = p.vsock;
          port = n.backdoor.vsockPort;
        } else {
          transport = "virtconsole";
          port = null; # hvc0 is the console's only port, it has no name
          # Where the pseudo-terminal's path is, once vm.create has been sent.
          pty = { method = "GET"; path = "${apiBase}/vm.info"; field = [ "config" "console" "file" ]; };
        };
      console = "file";
      inherit calls;
      restartOnReboot = false; # the VMM reboots the guest itself
      # A virtiofsd per share, listening before the VMM starts (vsock needs none here).
      helpers = shares.helpers { inherit (n) stateDir virtiofsd; } n.sharedDirs;
      shares = n.sharedDirs;
      # block/unblock: the host downs the TAP device (no link switch in the API).
      interfaces = map (i: i // { link = "host"; }) n.interfaces;
      inherit (n) capabilities;
      launchSpec = spec // { inherit backend; }; # for `snapshot`
    };

  # Snapshot `name` of a node: where it goes, vm.snapshot (the VM paused) and vm.restore into a
  # fresh VMM.  Devices are restored at the paths they had: the machine it was taken of.
  snapshot = { spec, name, resume ? true }:
    let
      n = node.normalise (forBackend spec);
      inherit (node.snapshotPlace n.stateDir name) directory note;
      files = {
        disk = "${directory}/disk.raw";
        inherit note;
      };
    in {
      inherit directory files;
      # The disk as it was when the snapshot was written, and put back before a restore.
      copyDisk = node.diskRoundTrip (paths n).disk files.disk;
      save = [{ method = "PUT"; path = "${apiBase}/vm.snapshot"; body = { destination_url = "file://${directory}"; }; }];
      restore = [{ method = "PUT"; path = "${apiBase}/vm.restore"; body = { source_url = "file://${directory}"; inherit resume; }; }];
    };
in {
  inherit launch paths snapshot;
}
