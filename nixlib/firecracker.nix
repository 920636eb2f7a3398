# Firecracker launch plan for one node, builtins only.
#
# Input: a node description (see ./node.nix for the defaults and validation; `backend` may be
# left out, `imageFormat` defaults to "raw" here).  Output: the plan record every backend
# shares (see `launch` below).  Two equivalent routes to the same microVM:
#   - config file (the default): the runner writes `writeFiles` and runs `argv`, which names the
#     file with --config-file; Firecracker configures and boots the guest at once, `api` is empty.
#   - API socket: run `apiRoute.argv` (no --config-file) and send `apiRoute.api` in order.
# Request bodies follow Firecracker's API spec (contract-tested: $NTNG_SPECS/firecracker.yaml).
#
# Firecracker offers virtio-mmio devices only: the backdoor is hybrid vsock (the host connects
# to `backdoor.uds` and writes "CONNECT <port>\n"), the serial console (ttyS0) goes to the VMM's
# stdout, and the kernel must be an uncompressed ELF vmlinux (bzImage is not supported on x86).
let
  node = import ./node.nix;
  inherit (builtins) concatStringsSep elem filter head isString length map split substring toJSON;

  backend = "firecracker";

  # Everything the runner creates or connects to lives in the node's state directory.
  paths = n: {
    api = "${n.stateDir}/firecracker.sock";
    vsock = "${n.stateDir}/vsock.sock";
    config = "${n.stateDir}/firecracker.json";
    consoleLog = "${n.stateDir}/console.log";
    disk = "${n.stateDir}/disk.raw";
    log = "${n.stateDir}/firecracker.log";
    metrics = "${n.stateDir}/firecracker.metrics";
    stderr = "${n.stateDir}/firecracker.stderr"; # the VMM's stderr (its stdout is the console)
  };

  fail = n: msg: throw "node '${n.name}': ${msg}";

  # A node description meant for another backend is an error, not something to convert.
  forBackend = spec:
    if !(spec ? backend) || spec.backend == backend
    then { imageFormat = "raw"; } // spec // { inherit backend; }
    else throw "node '${spec.name or "?"}': backend ${toJSON spec.backend} is not ${backend} (firecracker.launch builds Firecracker plans only; use ${spec.backend}.launch)";

  checks = n: [
    (n.cpu == null || fail n "cpu ${toJSON n.cpu}: a QEMU CPU model, backend ${backend} has none (leave cpu = null)")
    # MachineConfiguration.vcpu_count: minimum 1, maximum 32.
    (n.cores <= 32 || fail n "cores must be at most 32 for backend ${backend} (its vcpu_count limit), got ${toJSON n.cores}")
  ];

  # Firecracker --id: 1 to 64 characters, ASCII letters, digits and '-' (utils::validators).
  instanceId = name:
    substring 0 64 ("ntng-" + concatStringsSep "-" (filter (s: isString s && s != "") (split "[^A-Za-z0-9]+" name)));

  # Parameters Firecracker's guests want (from its DEFAULT_KERNEL_CMDLINE, used only when
  # boot_args is absent): reboot=k makes a guest reboot exit the VMM through its minimal i8042
  # (the microVM does not reboot; "reboot" is not a capability), and the i8042 options skip
  # probing hardware that is not there.  node.nix's panic=-1 already reboots (so exits) at once
  # on a panic, so Firecracker's panic=1 is not added; nor are 8250.nr_uarts=0 (the serial
  # console is wanted), nomodule or pci=off (both would break users who enable them on purpose).
  # A key the node already sets (say reboot=t) is kept and ours is dropped: no conflicting pairs.
  # Firecracker itself appends "root=/dev/vda rw" for the root drive and the virtio_mmio.device=
  # entries; root=/dev/vda rw is also in node.nix's list, with the same values.
  extraKernelParams = [ "reboot=k" "i8042.noaux" "i8042.nomux" "i8042.dumbkbd" ];
  paramKey = p: head (split "=" p);
  kernelParams = n:
    let keys = map paramKey n.kernelParams; in
    n.kernelParams ++ filter (p: !(elem (paramKey p) keys)) extraKernelParams;

  # The config file: the body of each section is the body of the matching PUT.
  config = n: p: {
    "boot-source" = {
      kernel_image_path = n.kernel;
      boot_args = concatStringsSep " " (kernelParams n);
    } // (if n.initrd != null then { initrd_path = n.initrd; } else { });
    drives = [{
      drive_id = "rootfs";
      path_on_host = p.disk;
      is_root_device = true;
      is_read_only = false;
      cache_type = "Unsafe"; # the disk is a throwaway copy: guest flushes are not worth waiting for
    }];
    "machine-config" = {
      vcpu_count = n.cores;
      mem_size_mib = n.memory;
    };
    "network-interfaces" = builtins.genList (i:
      let iface = builtins.elemAt n.interfaces i; in {
        iface_id = "eth${toString i}";
        host_dev_name = iface.tap;
        guest_mac = iface.mac;
      }) (length n.interfaces);
    vsock = {
      guest_cid = n.backdoor.guestCid;
      uds_path = p.vsock;
    };
    logger = {
      log_path = p.log;
      level = "Info";
      show_level = true;
      show_log_origin = false;
    };
    metrics = {
      metrics_path = p.metrics;
    };
  };

  put = path: body: { method = "PUT"; inherit path body; };

  # The API route, in the order Firecracker applies a config file (VmResources::from_json):
  # logger and metrics first, so that an error in a later call is in the log.
  apiCalls = c:
    [ (put "/logger" c.logger) (put "/metrics" c.metrics)
      (put "/machine-config" c."machine-config") (put "/boot-source" c."boot-source") ]
    ++ map (d: put "/drives/${d.drive_id}" d) c.drives
    ++ map (i: put "/network-interfaces/${i.iface_id}" i) c."network-interfaces"
    ++ [ (put "/vsock" c.vsock) (put "/actions" { action_type = "InstanceStart"; }) ];

  # The calls the runner makes while the VM runs (python/ntng/backends/firecracker.py): its
  # state ("Running"/"Paused" in the answer's `state`), pause and resume, and a last metrics
  # flush before the VMM is stopped.
  calls = {
    info = { method = "GET"; path = "/"; };
    pause = { method = "PATCH"; path = "/vm"; body = { state = "Paused"; }; };
    resume = { method = "PATCH"; path = "/vm"; body = { state = "Resumed"; }; };
    flushMetrics = put "/actions" { action_type = "FlushMetrics"; };
  };

  launch = spec:
    let
      n = node.normalise (forBackend spec);
      p = paths n;
      c = config n p;
      vmm = [ n.firecrackerBinary "--api-sock" p.api "--id" (instanceId n.name) ];
    in
    builtins.deepSeq (checks n) {
      name = n.name;
      inherit backend;
      inherit (n) accel memory cores bootTimeout kernel; # kernel: for the runner's KVM probe
      inherit (n) stateDir; # the node's folder of sockets and files, made private before the VMM starts
      artifacts = node.artifacts n.name; # in the run's folder: console.log, journal.log
      prepare = [
        # Firecracker refuses to start on a leftover API socket, and to bind a leftover vsock one.
        [ "rm" "-f" p.api p.vsock ]
        # A private writable disk: the base image stays untouched (sparse, CoW where possible).
        (node.copyArgv n.image p.disk)
        # Firecracker before 1.14 opens the log and metrics files without creating them.
        [ "touch" p.log p.metrics ]
      ];
      argv = vmm ++ [ "--config-file" p.config ] ++ n.extraArgs;
      writeFiles = { ${p.config} = c; };
      api = [ ];
      apiRoute = {
        argv = vmm ++ n.extraArgs;
        api = apiCalls c;
      };
      sockets = { inherit (p) api vsock; };
      files = { inherit (p) consoleLog disk log metrics stderr; };
      backdoor = {
        transport = "vsock";
        uds = p.vsock;
        port = n.backdoor.vsockPort;
      };
      # The serial console (ttyS0) is the VMM's stdout; its stdin is the guest's serial input.
      console = "stdout";
      restartOnReboot = false; # a guest reboot ends the microVM (reboot=k); "reboot" is no capability
      inherit calls;
      helpers = [ ]; # no side processes (QEMU needs vhost-device-vsock for vsock)
      shares = [ ]; # no shared directories on Firecracker
      # block/unblock: the host downs the TAP device (Firecracker has no link switch).
      interfaces = map (i: i // { link = "host"; }) n.interfaces;
      inherit (n) capabilities;
      launchSpec = spec // { inherit backend; }; # for `snapshot`
    };

  # Snapshot `name` of a node: where it goes, and the calls that write it (the VM paused) and
  # load it into a fresh Firecracker (only logger and metrics may come before /snapshot/load).
  # Drives are restored at the paths they had (no override): the machine it was taken of.
  snapshot = { spec, name, resume ? true }:
    let
      n = node.normalise (forBackend spec);
      p = paths n;
      c = config n p;
      inherit (node.snapshotPlace n.stateDir name) directory note;
      files = {
        vmstate = "${directory}/vmstate";
        memory = "${directory}/memory";
        disk = "${directory}/disk.raw";
        inherit note;
      };
      load = {
        snapshot_path = files.vmstate;
        mem_backend = { backend_type = "File"; backend_path = files.memory; };
        resume_vm = resume;
        vsock_override = { uds_path = p.vsock; };
      } // (if c."network-interfaces" == [ ] then { } else {
        network_overrides = map (i: { inherit (i) iface_id host_dev_name; }) c."network-interfaces";
      });
    in {
      inherit directory files;
      # The disk as it was when the snapshot was written, and put back before a restore.
      copyDisk = node.diskRoundTrip p.disk files.disk;
      save = [ (put "/snapshot/create" { snapshot_type = "Full"; snapshot_path = files.vmstate; mem_file_path = files.memory; }) ];
      restore = [ (put "/logger" c.logger) (put "/metrics" c.metrics) (put "/snapshot/load" load) ];
    };
in {
  inherit launch paths instanceId snapshot;
}
