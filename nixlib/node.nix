# Node description: defaults and validation shared by every backend, builtins only.
# Every `throw` names the node and the option so a user can find the line at fault.
let
  inherit (builtins) isInt isString isBool isList isAttrs elem attrNames filter concatStringsSep
    toJSON typeOf all;
  capabilities = import ./capabilities.nix;
  shares = import ./shares.nix;

  defaults = {
    memory = 1024; # MiB
    cores = 1;
    accel = "tcg";
    backend = "qemu";
    machineType = null; # null: the backend's first machine type (q35 for QEMU)
    cpu = null; # QEMU -cpu model; null: "host" under KVM, a fast x86-64-v2 model under TCG
    qemuBinary = "qemu-system-x86_64";
    qemuImg = "qemu-img";
    firecrackerBinary = "firecracker";
    cloudHypervisorBinary = "cloud-hypervisor";
    vhostDeviceVsock = "vhost-device-vsock"; # QEMU's hybrid vsock (Debian package vhost-device-vsock)
    virtiofsd = "/usr/lib/qemu/virtiofsd"; # virtiofs shares (Debian package qemu-system-common)
    nspawnBinary = "systemd-nspawn"; # containers (Debian package systemd-container)
    unshareBinary = "unshare"; # a container's PID namespace dies with nspawn (util-linux)
    imageFormat = "qcow2"; # of `image`; Firecracker and Cloud Hypervisor need "raw"
    initrd = null;
    kernelParams = [ ];
    allowReboot = true;
    display = false; # a VGA screen (QEMU, not microvm): screenshot and OCR; kernel console on tty0 too
    # Guest address-space randomisation. null: off under TCG, on otherwise.  TCG finds the code
    # it already translated by virtual address, so with randomised mappings every exec
    # translates ld.so and libc again: measured in the guest, spawning /bin/true 58 → 18 ms,
    # `bash -c date` 224 → 55 ms.  true/false force it either way (norandmaps when off).
    aslr = null;
    tscKhz = null; # host TSC rate: lets a TCG microvm guest skip PIT calibration (python/ntng/hostclock.py)
    bootTimeout = null; # seconds; null: the runner's default for the accelerator
    extraArgs = [ ];
    extraSerialPorts = [ ]; # names of additional virtio-serial ports, each on its own socket
    backdoor = { };
    vlans = [ ]; # the test's network plan turns these into `interfaces`
    impairments = [ ]; # the network plan checks these and puts them on the interfaces
    interfaces = [ ];
    requires = [ ]; # features the test needs from the backend (see capabilities.nix)
    # A clone restored from a snapshot (QEMU): { disk = <the snapshot's frozen qcow2>; ram = <its
    # RAM file, mapped copy-on-write>; }; its disk is an overlay on that one and the plan gets
    # restoreArgv (QEMU waits for the device state).
    restore = null;
    sharedDirs = { }; # <tag> = { source; target; type ? "9p"; readOnly ? false; } (see shares.nix)
    shareArtifacts = false; # a writable share at /tmp/shared, on the host in the run's artifacts
  };

  backdoorDefaults = backend: {
    transport = builtins.head capabilities.backends.${backend}.transports;
    portName = "org.ntng.backdoor";
    vsockPort = 1234;
    guestCid = 3;
    # vsock host side: false = hybrid (a unix socket, vhost-device-vsock on QEMU); true = the
    # kernel's vhost-vsock (/dev/vhost-vsock), the host connects with AF_VSOCK to guestCid.
    vhost = false;
  };

  # The runner's artifacts of node `name` in the run's folder (the runner puts that folder in
  # place of shares.nix's @artifacts@ marker): the console as it arrived, the journal at the end.
  artifacts = name: {
    consoleLog = "${shares.artifactsMarker}/${name}/console.log";
    journal = "${shares.artifactsMarker}/${name}/journal.log";
  };

  # A disk image copied: sparse, CoW where the file system can (a node's private disk, and a
  # snapshot's copy of it).
  copyArgv = source: target: [ "cp" "--sparse=always" "--reflink=auto" source target ];

  # Where snapshot `name` of the node whose state folder is `stateDir` goes (beside the nodes'
  # folders, so that it outlives a node's restart), and its note.  Every backend's `snapshot`.
  snapshotPlace = stateDir: name: rec {
    directory = "${dirOf stateDir}/snapshots/${name}";
    note = "${directory}/ntng-snapshot.json";
  };
  # A disk saved with the snapshot and put back before a restore (backends that restore a VM
  # into the machine it was taken of, at the paths it had).
  diskRoundTrip = disk: saved: { save = copyArgv disk saved; restore = copyArgv saved disk; };

  baseKernelParams = [ "root=/dev/vda" "rw" "console=ttyS0,115200" "panic=-1" "quiet"
    "systemd.show_status=auto" "net.ifnames=0" ];

  aslrOff = n: n.aslr == false || (n.aslr == null && n.accel == "tcg");

  # Tells a Debian guest's agent where to serve (NixOS guests get it from modules/backdoor.nix).
  backdoorParam = b: "ntng.backdoor=" + {
    virtio-serial = "virtio-serial:${b.portName}";
    vsock = "vsock:${toString b.vsockPort}";
    virtconsole = "virtconsole:hvc0";
    unix = "unix:/run/ntng-host"; # a container's bind-mounted folder (nspawn.nix: guestFolder)
  }.${b.transport};

  # The options users set (`#:` lines, mkTest's nodes): an unknown option's error lists these,
  # and `ntng check` offers the closest one.  The others are the runner's and nixlib's own.
  userOptions = [ "memory" "cores" "accel" "backend" "machineType" "cpu" "kernel" "initrd"
    "kernelParams" "image" "imageFormat" "allowReboot" "display" "aslr" "bootTimeout" "extraArgs"
    "extraSerialPorts" "backdoor" "vlans" "impairments" "requires" "sharedDirs" "shareArtifacts"
    "qemuBinary" "qemuImg" "firecrackerBinary" "cloudHypervisorBinary" "vhostDeviceVsock" "virtiofsd"
    "nspawnBinary" "unshareBinary" ];
  internalOptions = [ "name" "stateDir" "tscKhz" "interfaces" "restore" ];
  known = userOptions ++ internalOptions;
  # Every default is one or the other (a new option must be put in one list).
  unlisted = filter (k: !(elem k known)) (attrNames defaults ++ [ "kernel" "image" ]);
  backends = capabilities.names;

  fail = name: msg: throw "node '${name}': ${msg}";
  check = name: cond: msg: if cond then true else fail name msg;
  list = xs: concatStringsSep ", " xs;

  isPort = p: isInt p && p >= 1 && p <= 4294967294;
  validInterface = i: isAttrs i && i ? tap && isString i.tap && i ? mac && isString i.mac
    && builtins.match "([0-9a-f]{2}:){5}[0-9a-f]{2}" i.mac != null;

  normalise = spec:
    assert unlisted == [ ]; # an option in neither userOptions nor internalOptions
    let
      name = spec.name or (throw "node description without a name: ${toJSON spec}");
      backend = spec.backend or defaults.backend;
      caps = if isString backend && capabilities.backends ? ${backend} then capabilities.backends.${backend}
        else fail name "unknown backend ${toJSON backend} (known: ${list backends})";
      unknown = filter (k: !(elem k known)) (attrNames spec);
      # Firecracker and Cloud Hypervisor run on KVM only: their accel defaults to kvm.
      # A container (nspawn) has no accelerator: whatever the run chose is kept.
      n0 = defaults // { accel = if backend == "qemu" || backend == "nspawn" then defaults.accel else "kvm"; } // spec;
      n = n0 // {
        inherit name; # a missing name is this message, not Nix's "attribute 'name' missing"
        machineType = if n0.machineType == null then builtins.head caps.machineTypes else n0.machineType;
        backdoor = backdoorDefaults backend // (if isAttrs n0.backdoor then n0.backdoor else { });
      };
      executables = [ "qemuBinary" "qemuImg" "firecrackerBinary" "cloudHypervisorBinary" "vhostDeviceVsock" "virtiofsd" "nspawnBinary" "unshareBinary" ];
      notStrings = filter (k: !(isString n.${k})) executables;
      missing = filter (f: !(elem f (capabilities.effective backend n).features)) (if isList n.requires then n.requires else [ ]);
      checks = [
        (check name (unknown == [ ]) "unknown option(s) ${list unknown} (known: ${list userOptions})")
        (check name (isAttrs caps) "")
        (check name (isInt n.memory) "memory must be an integer number of MiB, got ${typeOf n.memory} ${toJSON n.memory}")
        (check name (n.memory >= 128 && n.memory <= 65536) "memory must be between 128 and 65536 MiB, got ${toJSON n.memory}")
        (check name (isInt n.cores && n.cores >= 1 && n.cores <= 64) "cores must be an integer from 1 to 64, got ${toJSON n.cores}")
        (check name (elem n.accel [ "kvm" "tcg" ]) "accel must be \"kvm\" or \"tcg\", got ${toJSON n.accel}")
        (check name (backend == "qemu" || backend == "nspawn" || n.accel == "kvm")
          "accel: backend ${backend} needs KVM, it has no TCG (use backend = \"qemu\" with machineType = \"microvm\" for the same shape without KVM)")
        (check name (elem n.machineType caps.machineTypes) "machineType ${toJSON n.machineType} is not offered by backend ${backend} (it has: ${list caps.machineTypes})")
        (check name (notStrings == [ ]) "${list notStrings}: expected the path or name of an executable (a string)")
        (check name (spec ? kernel && (isString spec.kernel || spec.kernel == null)) "kernel (path to the guest kernel) is required (null: boot the disk's own boot loader)")
        (check name (n.kernel != null || (backend == "qemu" && n.machineType != "microvm"))
          "kernel = null (disk boot) needs firmware: only backend qemu with machineType q35 or pc has it")
        (check name (n.kernel != null || (n.initrd == null && n.kernelParams == [ ]))
          "initrd and kernelParams have no effect with kernel = null (the disk's boot loader chooses them)")
        (check name (spec ? image && isString spec.image) "image (path to the base disk image) is required")
        (check name (spec ? stateDir && isString spec.stateDir) "stateDir is required")
        (check name (n.initrd == null || isString n.initrd) "initrd must be a path or null")
        (check name (elem n.imageFormat [ "qcow2" "raw" ]) "imageFormat must be \"qcow2\" or \"raw\", got ${toJSON n.imageFormat}")
        (check name (backend == "qemu" || n.imageFormat == "raw") "imageFormat: backend ${backend} boots raw images only (an ext4 file system image), got ${toJSON n.imageFormat}")
        (check name (n.cpu == null || isString n.cpu) "cpu must be a QEMU CPU model string or null")
        (check name (isList n.kernelParams && all isString n.kernelParams) "kernelParams must be a list of strings")
        (check name (isList n.extraArgs && all isString n.extraArgs) "extraArgs must be a list of strings")
        (check name (isList n.extraSerialPorts && all (p: isString p && builtins.match "[a-z0-9.-]+" p != null) n.extraSerialPorts)
          "extraSerialPorts must be a list of port names (lower-case letters, digits, dots, dashes)")
        (check name (n.extraSerialPorts == [ ] || elem "virtio-serial" caps.transports) "extraSerialPorts: backend ${backend} has no virtio-serial ports")
        (check name (isBool n.allowReboot) "allowReboot must be a boolean")
        (check name (isBool n.display) "display must be a boolean, got ${toJSON n.display}")
        (check name (n.display != true || elem "screenshot" caps.features)
          "display: backend ${backend} lacks the screenshot capability (it has: ${list caps.features}); use backend = \"qemu\"")
        (check name (n.display != true || n.machineType != "microvm")
          "display: machineType microvm has no PCI bus for a VGA device; use machineType = \"q35\" or \"pc\"")
        (check name (n.aslr == null || isBool n.aslr) "aslr must be true, false or null (off under TCG only), got ${toJSON n.aslr}")
        (check name (n.tscKhz == null || (isInt n.tscKhz && n.tscKhz > 0)) "tscKhz must be a positive integer (kHz) or null")
        (check name (n.bootTimeout == null || (isInt n.bootTimeout && n.bootTimeout > 0)) "bootTimeout must be a positive number of seconds or null")
        (check name (isAttrs n0.backdoor) "backdoor must be an attribute set ({ transport = ...; })")
        (check name (elem n.backdoor.transport [ "virtio-serial" "virtconsole" "vsock" "unix" ]) "backdoor.transport must be \"virtio-serial\", \"virtconsole\", \"vsock\" or \"unix\" (containers), got ${toJSON n.backdoor.transport}")
        (check name (elem n.backdoor.transport caps.transports) "backdoor.transport: backend ${backend} lacks the ${n.backdoor.transport} transport (it has: ${list caps.transports})")
        (check name (isString n.backdoor.portName && builtins.match "[a-z0-9.-]+" n.backdoor.portName != null)
          "backdoor.portName must be a port name (lower-case letters, digits, dots, dashes), got ${toJSON n.backdoor.portName}")
        (check name (isPort n.backdoor.vsockPort) "backdoor.vsockPort must be a port number from 1, got ${toJSON n.backdoor.vsockPort}")
        (check name (isInt n.backdoor.guestCid && n.backdoor.guestCid >= 3) "backdoor.guestCid must be an integer >= 3 (0-2 are reserved), got ${toJSON n.backdoor.guestCid}")
        (check name (isBool n.backdoor.vhost) "backdoor.vhost must be a boolean, got ${toJSON n.backdoor.vhost}")
        (check name (!n.backdoor.vhost || (backend == "qemu" && n.backdoor.transport == "vsock"))
          "backdoor.vhost = true needs backend qemu and transport \"vsock\" (got backend ${backend}, transport ${toJSON n.backdoor.transport}); Firecracker and Cloud Hypervisor always use hybrid vsock")
        (check name (isList n.vlans && all (v: isInt v && v >= 1 && v <= 254) n.vlans) "vlans must be a list of integers from 1 to 254, got ${toJSON n.vlans}")
        (check name (isList n.interfaces && all validInterface n.interfaces) "interfaces must be a list of { tap; mac = \"xx:xx:xx:xx:xx:xx\"; ... } (the network plan makes them)")
        (check name (n.interfaces == [ ] || elem "networks" caps.features) "interfaces: backend ${backend} has no networking")
        (check name (backend == "qemu" || all (i: i.vdeSocket or null == null) n.interfaces)
          "interfaces: backend ${backend} needs TAP networking (CAP_NET_ADMIN); rootless VDE networking is QEMU-only")
        (check name (!(isList n.kernelParams && all isString n.kernelParams) || builtins.stringLength (concatStringsSep " " n.kernelParams) <= 1900)
          "kernelParams: the kernel command line would be ${toString (builtins.stringLength (concatStringsSep " " n.kernelParams))} bytes; Linux on x86 takes 2048 (with many nodes, ntng.hosts grows: use fewer nodes or a NixOS system)")
        (check name (n.restore == null || (isAttrs n.restore && isString (n.restore.disk or null) && backend == "qemu"
            && (let r = n.restore.ram or null; in r == null || isString r)))
          "restore must be null or { disk = \"<frozen qcow2 of a snapshot>\"; ram = <its RAM file> or null; } on backend qemu, got ${toJSON n.restore} on ${backend}")
        (check name (isList n.requires && all isString n.requires) "requires must be a list of feature names")
        (check name (missing == [ ]) "requires ${list missing}, which backend ${backend} lacks (it has: ${list caps.features})")
      ];
      sharedDirs = shares.normalise name backend caps n;
    in
      builtins.deepSeq checks (n // {
        inherit sharedDirs;
        # console=tty0 before ttyS0: the last one is /dev/console, which must stay the serial
        # line (the journal is forwarded there for failure detection).
        kernelParams = (if n.display then [ "console=tty0" ] else [ ]) ++ baseKernelParams
          ++ [ (backdoorParam n.backdoor) ] ++ shares.kernelParams sharedDirs
          ++ (if aslrOff n then [ "norandmaps" ] else [ ]) ++ n.kernelParams;
        capabilities = capabilities.effective backend n;
      });
in {
  inherit defaults normalise baseKernelParams capabilities userOptions artifacts copyArgv
    snapshotPlace diskRoundTrip;
}
