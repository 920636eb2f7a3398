# Node description: defaults and validation shared by every backend, builtins only.
# Every `throw` names the node and the option so a user can find the line at fault.
let
  inherit (builtins) isInt isString isBool isList isAttrs elem attrNames filter concatStringsSep
    toJSON typeOf;

  defaults = {
    memory = 1024; # MiB
    cores = 1;
    accel = "tcg";
    machineType = "q35";
    cpu = null; # QEMU -cpu model; null: "host" under KVM, a fast x86-64-v2 model under TCG
    backend = "qemu";
    qemuBinary = "qemu-system-x86_64";
    qemuImg = "qemu-img";
    imageFormat = "qcow2";
    initrd = null;
    kernelParams = [ ];
    allowReboot = true;
    bootTimeout = null; # seconds; null: the runner's default for the accelerator
    extraArgs = [ ];
    extraSerialPorts = [ ]; # names of additional virtio-serial ports, each on its own socket
    backdoor = { };
  };

  backdoorDefaults = { transport = "virtio-serial"; portName = "org.ntng.backdoor"; vsockPort = 1234; };

  baseKernelParams = [ "root=/dev/vda" "rw" "console=ttyS0,115200" "panic=-1" "quiet"
    "systemd.show_status=auto" "net.ifnames=0" ];

  known = attrNames defaults ++ [ "name" "kernel" "image" "stateDir" ];

  fail = name: msg: throw "node '${name}': ${msg}";

  check = name: cond: msg: if cond then true else fail name msg;

  normalise = spec:
    let
      name = spec.name or (throw "node description without a name: ${toJSON spec}");
      unknown = filter (k: !(elem k known)) (attrNames spec);
      n = defaults // spec // { backdoor = backdoorDefaults // (spec.backdoor or { }); };
      checks = [
        (check name (unknown == [ ]) "unknown option(s) ${concatStringsSep ", " unknown} (known: ${concatStringsSep ", " known})")
        (check name (isInt n.memory) "memory must be an integer number of MiB, got ${typeOf n.memory} ${toJSON n.memory}")
        (check name (isInt n.memory && n.memory >= 128 && n.memory <= 65536) "memory must be between 128 and 65536 MiB, got ${toJSON n.memory}")
        (check name (isInt n.cores && n.cores >= 1 && n.cores <= 64) "cores must be an integer from 1 to 64, got ${toJSON n.cores}")
        (check name (elem n.accel [ "kvm" "tcg" ]) "accel must be \"kvm\" or \"tcg\", got ${toJSON n.accel}")
        (check name (elem n.backend [ "qemu" ]) "unknown backend ${toJSON n.backend} (known: qemu)")
        (check name (spec ? kernel && isString spec.kernel) "kernel (path to the guest kernel) is required")
        (check name (spec ? image && isString spec.image) "image (path to the base disk image) is required")
        (check name (spec ? stateDir && isString spec.stateDir) "stateDir is required")
        (check name (n.cpu == null || isString n.cpu) "cpu must be a QEMU CPU model string or null")
        (check name (isList n.kernelParams) "kernelParams must be a list of strings")
        (check name (isList n.extraArgs) "extraArgs must be a list of strings")
        (check name (isList n.extraSerialPorts && builtins.all (p: isString p && builtins.match "[a-z0-9.-]+" p != null) n.extraSerialPorts)
          "extraSerialPorts must be a list of port names (lower-case letters, digits, dots, dashes)")
        (check name (isBool n.allowReboot) "allowReboot must be a boolean")
        (check name (elem n.backdoor.transport [ "virtio-serial" "vsock" ]) "backdoor.transport must be \"virtio-serial\" or \"vsock\", got ${toJSON n.backdoor.transport}")
      ];
    in
      builtins.deepSeq checks (n // { kernelParams = baseKernelParams ++ n.kernelParams; });
in {
  inherit defaults normalise baseKernelParams;
}
