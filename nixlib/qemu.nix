# QEMU launch plan for one node, builtins only.
#
# Input: a node record (see ./node.nix for the defaults and validation).
# Output: { prepare; argv; sockets; files; } where `prepare` lists commands to run first
# (the throwaway qcow2 overlay) and `argv` is the complete VMM command line.  The runner
# executes these verbatim: there is one source of truth for how a VM is started.
let
  node = import ./node.nix;
  shares = import ./shares.nix;
  inherit (builtins) concatStringsSep toString;

  # Under TCG a plain x86-64-v2 model is about twice as fast as "max": glibc then picks
  # SSE string and memory routines, which TCG runs much faster than emulated AVX
  # (measured in the guest: memcpy 43 → 116 MB/s, sha256 17 → 32 MB/s, boot 28 → 25 s).
  tcgCpu = "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt";

  accelArgs = n:
    let cpu = if n.cpu != null then n.cpu else if n.accel == "kvm" then "host" else tcgCpu; in
    [ "-machine" (machineArg n) "-cpu" cpu ];

  # microvm is the Firecracker shape: no firmware, no PCI, virtio-mmio devices found through
  # ACPI.  The ISA serial port stays for the console (ttyS0, as on Firecracker).
  isMicrovm = n: n.machineType == "microvm";
  machineArg = n:
    if isMicrovm n then "microvm,accel=${n.accel},isa-serial=on,rtc=on"
    else "${n.machineType},accel=${n.accel}";
  # The same virtio device on either bus: virtio-X-pci on q35/pc, virtio-X-device on microvm.
  virtio = n: dev: if isMicrovm n then "virtio-${dev}-device" else "virtio-${dev}-pci";

  # Everything the runner connects to lives in the node's state directory.
  paths = n: {
    qmp = "${n.stateDir}/qmp.sock";
    backdoor = "${n.stateDir}/backdoor.sock";
    console = "${n.stateDir}/console.sock";
    consoleLog = "${n.stateDir}/console.log";
    disk = "${n.stateDir}/disk.qcow2";
    vhostVsock = "${n.stateDir}/vhost-vsock.sock"; # QEMU ↔ vhost-device-vsock
    vsock = "${n.stateDir}/vsock.sock"; # hybrid vsock: the runner connects here
    stderr = "${n.stateDir}/qemu.stderr"; # QEMU's stdout and stderr
    # The run's backdoor secret: the runner writes it (0600, in the 0700 state folder) before
    # QEMU starts; QEMU hands it to the guest as a fw_cfg file, so argv shows only this path.
    backdoorKey = "${n.stateDir}/backdoor.key";
  };

  # The agent reads /sys/firmware/qemu_fw_cfg/by_name/<this>/raw (backdoor/ntng_agent.py).
  keyFwCfgName = "opt/org.ntng/backdoor-key";
  keyArgs = p: [ "-fw_cfg" "name=${keyFwCfgName},file=${p.backdoorKey}" ];

  socketChardev = id: path: extra:
    [ "-chardev" "socket,id=${id},path=${path},server=on,wait=off${extra}" ];

  portSocket = n: name: "${n.stateDir}/port-${name}.sock";

  # Extra virtio-serial ports (benchmarks' raw baselines, user channels), each on its socket.
  extraPortArgs = n: builtins.concatLists (builtins.genList (i:
    let name = builtins.elemAt n.extraSerialPorts i; id = "port${toString i}"; in
    socketChardev id (portSocket n name) ""
    ++ [ "-device" "virtserialport,bus=vser0.0,chardev=${id},name=${name}" ]
  ) (builtins.length n.extraSerialPorts));

  hasSerialPorts = n: n.backdoor.transport == "virtio-serial" || n.extraSerialPorts != [ ];

  serialArgs = n: p:
    (if hasSerialPorts n then [ "-device" "${virtio n "serial"},id=vser0" ] else [ ])
    ++ (if n.backdoor.transport == "virtio-serial" then
      socketChardev "backdoor" p.backdoor ""
      ++ [ "-device" "virtserialport,bus=vser0.0,chardev=backdoor,name=${n.backdoor.portName}" ]
    else [ ])
    ++ extraPortArgs n;

  # Hybrid vsock without /dev/vhost-vsock: vhost-device-vsock serves the device to QEMU over
  # vhost-user (which needs guest RAM in shared memory) and the host side over a unix socket
  # that speaks "CONNECT <port>" like Firecracker's.
  hybridVsock = n: n.backdoor.transport == "vsock" && !n.backdoor.vhost;
  vsockArgs = n: p:
    if n.backdoor.transport != "vsock" then [ ]
    else if n.backdoor.vhost then
      [ "-device" "${if isMicrovm n then "vhost-vsock-device" else "vhost-vsock-pci"},guest-cid=${toString n.backdoor.guestCid}" ]
    else
    # QEMU is the vhost-user client: the helper below listens on this socket.
    [ "-chardev" "socket,id=vsock0,path=${p.vhostVsock}" ]
    ++ [ "-device" "${if isMicrovm n then "vhost-user-vsock-device" else "vhost-user-vsock-pci"},chardev=vsock0" ];

  # vhost-user devices (hybrid vsock, virtiofs) read and write guest RAM from another
  # process: it must be shared memory, once for all of them.
  needsSharedMemory = n: hybridVsock n || shares.hasVirtiofs n.sharedDirs;
  # On q35/pc guest RAM is always that memfd: a snapshot then copies it to a file and leaves it
  # out of the migration stream (x-ignore-shared), and a clone maps the file copy-on-write
  # (share=off) instead of loading a stream of it (python/ntng/backends/qemu_migrate.py).
  # (A cold boot of a clone, after crash(), gets a fresh memfd like any VM.)
  ramPlan = n: if needsSharedMemory n || !(isMicrovm n) then { kind = "memfd"; } else null;
  restoreRamPlan = n:
    if n.restore != null && (n.restore.ram or null) != null then { kind = "file"; path = n.restore.ram; }
    else ramPlan n;
  ramArgs = n: ram:
    let size = "size=${toString n.memory}M"; in
    if ram == null then [ ] else
    [ "-object" (if ram.kind == "file" then "memory-backend-file,id=mem0,${size},mem-path=${ram.path},share=off"
                 else "memory-backend-memfd,id=mem0,${size},share=on")
      "-numa" "node,memdev=mem0" ];

  shareArgs = n: shares.qemuArgs { inherit (n) stateDir; dev = virtio n; microvm = isMicrovm n; } n.sharedDirs;

  helpers = n: p: vsockHelpers n p ++ shares.helpers { inherit (n) stateDir virtiofsd; } n.sharedDirs;

  vsockHelpers = n: p:
    if !(hybridVsock n) then [ ] else [{
      name = "vhost-device-vsock";
      log = "${n.stateDir}/vhost-device-vsock.log";
      argv = [ n.vhostDeviceVsock "--guest-cid=${toString n.backdoor.guestCid}"
        "--socket=${p.vhostVsock}" "--uds-path=${p.vsock}" ];
      # QEMU connects to this socket, so the helper must be listening first.
      waitFor = p.vhostVsock;
      missing = "the vsock backdoor on QEMU needs it (Debian package vhost-device-vsock, from sid on "
        + "bookworm: ./setup.sh installs it), or use backdoor.transport = \"virtio-serial\"";
    }];

  # One NIC per interface of the network plan, on the TAP device the runner made for it; its
  # netdev id is what QMP set_link takes (block/unblock: link = "vmm").
  netdevId = i: "net${toString i}";
  planInterfaces = n: builtins.genList (i: builtins.elemAt n.interfaces i // { netdev = netdevId i; link = "vmm"; })
    (builtins.length n.interfaces);
  nicArgs = n: builtins.concatLists (builtins.genList (i:
    let nic = builtins.elemAt n.interfaces i; id = netdevId i; in
    [ "-netdev" (if nic.vdeSocket or null != null then "vde,id=${id},sock=${nic.vdeSocket}"
                 else "tap,id=${id},ifname=${nic.tap},script=no,downscript=no")
      "-device" "${virtio n "net"},netdev=${id},mac=${nic.mac}" ]
  ) (builtins.length n.interfaces));

  # A TCG microvm guest has only the PIT to calibrate its TSC against, which fails on a busy
  # host and stalls the boot; under TCG the guest TSC is the host's, so tell it the rate.
  tscParams = n:
    if isMicrovm n && n.accel == "tcg" && n.tscKhz != null then [ "tsc_early_khz=${toString n.tscKhz}" ] else [ ];

  # kernel = null: firmware boots the disk (a full image with its own boot loader).
  kernelArgs = n: if n.kernel == null then [ "-boot" "order=c" ] else
    [ "-kernel" n.kernel ]
    ++ (if n.initrd != null then [ "-initrd" n.initrd ] else [ ])
    ++ [ "-append" (concatStringsSep " " (n.kernelParams ++ tscParams n)) ];

  launch = spec:
    let
      n = node.normalise ({ backend = "qemu"; } // spec);
      p = paths n;
      vsock = n.backdoor.transport == "vsock";
      hybrid = hybridVsock n;
      qemuArgv = ram:
        [ n.qemuBinary "-name" "${n.name},process=ntng-${n.name}" ]
        ++ accelArgs n
        ++ [ "-m" (toString n.memory) "-smp" (toString n.cores) ]
        # -display none stays with a VGA device: nothing is shown, QMP screendump still reads it.
        ++ [ "-nodefaults" "-no-user-config" "-display" "none" ]
        ++ (if n.display then [ "-device" "VGA" ] else [ ])
        ++ (if n.allowReboot && !hybrid then [ ] else [ "-no-reboot" ])
        ++ kernelArgs n
        ++ [ "-drive" "file=${p.disk},if=none,id=disk0,format=qcow2,cache=unsafe,discard=unmap"
             "-device" "${virtio n "blk"},drive=disk0" ]
        ++ [ "-device" (virtio n "rng") ]
        ++ keyArgs p
        ++ socketChardev "qmp" p.qmp "" ++ [ "-mon" "chardev=qmp,mode=control" ]
        ++ socketChardev "console" p.console ",logfile=${p.consoleLog}" ++ [ "-serial" "chardev:console" ]
        ++ serialArgs n p
        ++ ramArgs n ram
        ++ vsockArgs n p
        ++ shareArgs n
        ++ (if n.interfaces == [ ] then [ "-nic" "none" ] else nicArgs n)
        ++ n.extraArgs;
    in if n.backend != "qemu" then throw "node '${n.name}': qemu.launch called for backend ${n.backend}" else {
      name = n.name;
      backend = "qemu";
      inherit (n) accel memory cores;
      inherit (n) stateDir; # the node's folder of sockets and files, made private before the VMM starts
      artifacts = node.artifacts n.name; # in the run's folder: console.log, journal.log
      prepare = [
        (if n.restore == null then [ n.qemuImg "create" "-q" "-f" "qcow2" "-F" n.imageFormat "-b" n.image p.disk ]
         else [ n.qemuImg "create" "-q" "-f" "qcow2" "-F" "qcow2" "-b" n.restore.disk p.disk ])
      ];
      # The input of this plan: a clone of this node is the same spec with its own name,
      # state directory, NICs and `restore` (python/ntng/snapshots.py), evaluated here again.
      launchSpec = spec;
      helpers = helpers n p;
      writeFiles = { }; # every backend's plan has the same keys (QEMU needs no config file
      api = [ ]; # and no API calls: all of it is on the command line)
      argv = qemuArgv (ramPlan n);
      # A clone's restore: the same machine, waiting for the saved state (migrate-incoming).
      restoreArgv = if n.restore == null then null else qemuArgv (restoreRamPlan n) ++ [ "-incoming" "defer" ];
      sockets = { inherit (p) qmp console; }
        // (if n.backdoor.transport == "virtio-serial" then { inherit (p) backdoor; } else if hybrid then { inherit (p) vsock; } else { })
        // builtins.listToAttrs (map (name: { name = "port:${name}"; value = portSocket n name; }) n.extraSerialPorts);
      files = { inherit (p) consoleLog disk stderr; };
      ram = ramPlan n; # of argv; null: anonymous RAM (microvm without vhost-user devices)
      restoreRam = if n.restore == null then null else restoreRamPlan n; # of restoreArgv
      backdoor = n.backdoor // { keyFile = p.backdoorKey; } // (if hybrid then { uds = p.vsock; port = n.backdoor.vsockPort; }
        else if vsock then { cid = n.backdoor.guestCid; port = n.backdoor.vsockPort; } else { socket = p.backdoor; });
      console = "socket";
      # A guest reboot resets the vhost-user vsock device, which vhost-device-vsock does not
      # survive (the next boot hangs, measured): such a VM exits on a guest reboot instead and
      # the runner starts it again on the same disk, as it would a Firecracker microVM.
      restartOnReboot = hybrid && n.allowReboot;
      interfaces = planInterfaces n;
      capabilities = n.capabilities;
      bootTimeout = n.bootTimeout;
      display = n.display; # the runner's screenshot/OCR methods need one
      kernel = n.kernel; # for the runner's KVM probe
      shares = n.sharedDirs; # for copy_from_host/copy_from_machine via = "share"
    };

  # A kernel-only boot that ends by itself: without a root fs the kernel panics, panic=-1
  # reboots at once and -no-reboot turns that into QEMU exiting.  If this does not finish in
  # a few seconds under KVM, KVM is present but not usable (nested setups hang here).
  probe = { qemuBinary ? "qemu-system-x86_64", kernel, accel, machineType ? "q35" }: {
    argv = [ qemuBinary "-machine" "${machineType},accel=${accel}" "-cpu" (if accel == "kvm" then "host" else "max")
      "-m" "256" "-nodefaults" "-no-user-config" "-display" "none" "-no-reboot"
      "-kernel" kernel "-append" "console=ttyS0 panic=-1 root=/dev/ntng-probe-nonexistent"
      "-serial" "stdio" ];
    expect = "Kernel panic";
  };
  # Snapshot `name` of a node (python/ntng/backends/qemu_migrate.py writes it: the migration
  # stream, the RAM file where guest RAM is a memfd, the frozen disk, a note).  QEMU is driven
  # over QMP, so there are no API calls; a clone restores it (clone.nix).
  # `migrate`: the migration URIs of QMP's migrate (save) and migrate-incoming (restore).
  snapshot = { spec, name, resume ? true }:
    let
      inherit (node.snapshotPlace spec.stateDir name) directory note;
      files = {
        memory = "${directory}/memory";
        ram = "${directory}/ram";
        disk = "${directory}/disk.qcow2";
        inherit note;
      };
      quote = s: "'${builtins.replaceStrings [ "'" ] [ "'\\''" ] s}'"; # for QEMU's exec: (sh -c)
    in {
      inherit directory files;
      # The origin's overlay as it was (then made read-only: the clones' backing file); a clone
      # restores onto an overlay of it, nothing is copied back.
      copyDisk = { save = node.copyArgv (paths spec).disk files.disk; restore = null; };
      migrate = { save = "exec:cat > ${quote files.memory}"; restore = "exec:cat ${quote files.memory}"; };
      save = [ ];
      restore = [ ];
    };
in {
  inherit launch probe paths snapshot;
}
