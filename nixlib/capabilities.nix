# What each backend can do.  The node validation rejects a node that asks for something its
# backend lacks, and the runner (and `ntng check`) use the same table, so a test that needs a
# screenshot on Firecracker fails before anything boots, with the capability named.
{
  qemu = {
    transports = [ "virtio-serial" "vsock" ];
    features = [ "screenshot" "keys" "snapshot" "sharedDirs" "networks" "reboot" "console" ];
    machineTypes = [ "q35" "pc" "microvm" ];
    shareTypes = [ "9p" "virtiofs" ]; # sharedDirs: QEMU's 9p server, virtiofsd over vhost-user
  };
  # Firecracker: virtio-mmio only (no virtio-serial, no display, no virtiofs); a guest reboot
  # makes the VMM exit (reboot=k), so "reboot" is not offered.
  firecracker = {
    transports = [ "vsock" ];
    features = [ "snapshot" "networks" "console" ];
    machineTypes = [ "microvm" ];
    shareTypes = [ ]; # no 9p, no virtiofs device
  };
  # Cloud Hypervisor: one virtio-console (hvc0) instead of named virtio-serial ports, virtiofs
  # through virtiofsd (no 9p), no display.
  cloud-hypervisor = {
    transports = [ "virtconsole" "vsock" ];
    features = [ "snapshot" "sharedDirs" "networks" "reboot" "console" ];
    machineTypes = [ "pc" ];
    shareTypes = [ "virtiofs" ];
  };
  # systemd-nspawn containers: the host's kernel (no kernel parameters, no sch_netem unless
  # the host has it: impairment is refused at start otherwise), a veth per NIC, no screen or keyboard, no snapshots; the console is read-only (the
  # container's output: send_console is refused); a guest reboot ends nspawn, the runner
  # starts it again on the same writable layer.  The backdoor is a unix socket in a folder
  # bind-mounted from the state directory.
  nspawn = {
    transports = [ "unix" ];
    features = [ "sharedDirs" "networks" "reboot" "console" ];
    machineTypes = [ "container" ];
    shareTypes = [ "9p" "virtiofs" ]; # accepted as declared for a VM; made bind mounts (nspawn.nix)
  };
}
