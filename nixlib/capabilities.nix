# What each backend can do, and what one node of it can do.  The node validation rejects a node
# that asks for something its backend lacks, and the runner (and `ntng check`) use the same
# table, so a test that needs a screenshot on Firecracker fails before anything boots, with the
# capability named.  `effective` is the one judge at run time: each node's plan carries its
# result (plan.capabilities), and python/ntng/caps.py gates the Machine's methods with it.
let
  inherit (builtins) filter attrNames;

  backends = {
    qemu = {
      transports = [ "virtio-serial" "vsock" ];
      # monitor: the human monitor and QMP events (send_monitor_command, wait_for_qmp_event).
      # block: QMP set_link on the NIC.  snapshot/clone: migration to a file (see `effective`).
      features = [ "screenshot" "keys" "snapshot" "clone" "sharedDirs" "networks" "block" "reboot" "console" "consoleInput" "monitor" ];
      machineTypes = [ "q35" "pc" "microvm" ];
      shareTypes = [ "9p" "virtiofs" ]; # sharedDirs: QEMU's 9p server, virtiofsd over vhost-user
    };
    # Firecracker: virtio-mmio only (no virtio-serial, no display, no virtiofs); a guest reboot
    # makes the VMM exit (reboot=k), so "reboot" is not offered.  block: the host downs the
    # node's TAP device (the VMM has no link switch).
    firecracker = {
      transports = [ "vsock" ];
      features = [ "snapshot" "networks" "block" "console" "consoleInput" ];
      machineTypes = [ "microvm" ];
      shareTypes = [ ]; # no 9p, no virtiofs device
    };
    # Cloud Hypervisor: one virtio-console (hvc0) instead of named virtio-serial ports, virtiofs
    # through virtiofsd (no 9p), no display; the serial console is a file the VMM writes:
    # "console" (reading it) but no "consoleInput" (send_console).
    cloud-hypervisor = {
      transports = [ "virtconsole" "vsock" ];
      features = [ "snapshot" "sharedDirs" "networks" "block" "reboot" "console" ];
      machineTypes = [ "pc" ];
      shareTypes = [ "virtiofs" ];
    };
    # systemd-nspawn containers: the host's kernel (no kernel parameters, no sch_netem unless the
    # host has it: impairment is refused at start otherwise), a veth per NIC (block: the host
    # downs its end), no screen or keyboard, no snapshots; the console is read-only (the
    # container's output); a guest reboot ends nspawn, the runner starts it again on the same
    # writable layer.  The backdoor is a unix socket in a folder bind-mounted from the state
    # directory.
    nspawn = {
      transports = [ "unix" ];
      features = [ "sharedDirs" "networks" "block" "reboot" "console" ];
      machineTypes = [ "container" ];
      shareTypes = [ "9p" "virtiofs" ]; # accepted as declared for a VM; made bind mounts (nspawn.nix)
    };
  };

  # Why a backend lacks a feature, where that is not obvious (said in the runner's error).
  noClone = "Firecracker and Cloud Hypervisor restore drives at the paths they had (their restore "
    + "APIs override only NICs and vsock), so a snapshot loads only into the machine it was taken of";
  reasons = {
    firecracker.clone = noClone;
    cloud-hypervisor.clone = noClone;
    cloud-hypervisor.consoleInput = "its serial console is a file the VMM writes (output only)";
    nspawn.snapshot = "a container has no VM state to save (it runs on the host's kernel)";
    nspawn.consoleInput = "a container's console is its output, read-only";
  };

  # What one node (node.nix's normalised record) can do: its backend's features, less those its
  # configuration rules out, with the reason for each.
  withheldOf = backend: n:
    if backend == "qemu" && n.backdoor.transport != "virtio-serial" then
      let why = "QEMU cannot migrate the vhost-user-vsock device (its state lives in vhost-device-vsock); "
        + "declare the node with backdoor.transport = \"virtio-serial\" (the default)"; in
      { snapshot = why; clone = why; }
    else { };

  effective = backend: n:
    let
      caps = backends.${backend};
      withheld = withheldOf backend n;
    in
    caps // {
      features = filter (f: !(withheld ? ${f})) caps.features;
      why = (reasons.${backend} or { }) // withheld;
    };
in {
  inherit backends effective;
  names = attrNames backends;
}
