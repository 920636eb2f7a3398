# QEMU launch plan for one node, builtins only.
#
# Input: a node record (see ./node.nix for the defaults and validation).
# Output: { prepare; argv; sockets; files; } where `prepare` lists commands to run first
# (the throwaway qcow2 overlay) and `argv` is the complete VMM command line.  The runner
# executes these verbatim: there is one source of truth for how a VM is started.
let
  node = import ./node.nix;
  inherit (builtins) concatStringsSep toString;

  # Under TCG a plain x86-64-v2 model is about twice as fast as "max": glibc then picks
  # SSE string and memory routines, which TCG runs much faster than emulated AVX
  # (measured in the guest: memcpy 43 → 116 MB/s, sha256 17 → 32 MB/s, boot 28 → 25 s).
  tcgCpu = "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt";

  accelArgs = n:
    let cpu = if n.cpu != null then n.cpu else if n.accel == "kvm" then "host" else tcgCpu; in
    [ "-machine" "${n.machineType},accel=${n.accel}" "-cpu" cpu ];

  # Everything the runner connects to lives in the node's state directory.
  paths = n: {
    qmp = "${n.stateDir}/qmp.sock";
    backdoor = "${n.stateDir}/backdoor.sock";
    console = "${n.stateDir}/console.sock";
    consoleLog = "${n.stateDir}/console.log";
    disk = "${n.stateDir}/disk.qcow2";
  };

  socketChardev = id: path: extra:
    [ "-chardev" "socket,id=${id},path=${path},server=on,wait=off${extra}" ];

  portSocket = n: name: "${n.stateDir}/port-${name}.sock";

  # Extra virtio-serial ports (benchmarks' raw baselines, user channels), each on its socket.
  extraPortArgs = n: builtins.concatLists (builtins.genList (i:
    let name = builtins.elemAt n.extraSerialPorts i; id = "port${toString i}"; in
    socketChardev id (portSocket n name) ""
    ++ [ "-device" "virtserialport,bus=vser0.0,chardev=${id},name=${name}" ]
  ) (builtins.length n.extraSerialPorts));

  backdoorArgs = n: p:
    if n.backdoor.transport == "virtio-serial" then
      [ "-device" "virtio-serial-pci,id=vser0" ]
      ++ socketChardev "backdoor" p.backdoor ""
      ++ [ "-device" "virtserialport,bus=vser0.0,chardev=backdoor,name=${n.backdoor.portName}" ]
      ++ extraPortArgs n
    else throw "node '${n.name}': backdoor transport '${n.backdoor.transport}' is not supported by the qemu backend yet";

  kernelArgs = n:
    [ "-kernel" n.kernel ]
    ++ (if n.initrd != null then [ "-initrd" n.initrd ] else [ ])
    ++ [ "-append" (concatStringsSep " " n.kernelParams) ];

  launch = spec:
    let
      n = node.normalise spec;
      p = paths n;
    in {
      name = n.name;
      inherit (n) accel memory cores;
      prepare = [
        [ n.qemuImg "create" "-q" "-f" "qcow2" "-F" n.imageFormat "-b" n.image p.disk ]
      ];
      argv =
        [ n.qemuBinary "-name" "${n.name},process=ntng-${n.name}" ]
        ++ accelArgs n
        ++ [ "-m" (toString n.memory) "-smp" (toString n.cores) ]
        ++ [ "-nodefaults" "-no-user-config" "-display" "none" ]
        ++ (if n.allowReboot then [ ] else [ "-no-reboot" ])
        ++ kernelArgs n
        ++ [ "-drive" "file=${p.disk},if=none,id=disk0,format=qcow2,cache=unsafe,discard=unmap"
             "-device" "virtio-blk-pci,drive=disk0" ]
        ++ [ "-device" "virtio-rng-pci" ]
        ++ socketChardev "qmp" p.qmp "" ++ [ "-mon" "chardev=qmp,mode=control" ]
        ++ socketChardev "console" p.console ",logfile=${p.consoleLog}" ++ [ "-serial" "chardev:console" ]
        ++ backdoorArgs n p
        ++ [ "-nic" "none" ]
        ++ n.extraArgs;
      sockets = { inherit (p) qmp backdoor console; }
        // builtins.listToAttrs (map (name: { name = "port:${name}"; value = portSocket n name; }) n.extraSerialPorts);
      files = { inherit (p) consoleLog disk; };
      backdoor = n.backdoor;
      bootTimeout = n.bootTimeout;
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
in {
  inherit launch probe paths;
}
