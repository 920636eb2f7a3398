# systemd-nspawn launch plan for one node (a container: no kernel of its own), builtins only.
#
# Input: a node description (see ./node.nix; `backend` may be left out).  Output: the plan
# record every backend shares (see `launch` below); the runner runs `argv` and builds none.
#
# The container boots the image's configured root tree (`tree`, by default the `tree` folder
# beside `image`: python/ntng/image.py keeps it) read-only, as the lower layer of an overlay
# whose upper layer (`files.disk`, the "disk") is the node's own: the cache is never written,
# and the upper layer survives crash()/start() and reboots, and with -K the run.
#
# A NixOS system (mkTest, `init` given: its toplevel's init) boots instead from an empty root
# folder of its own (`files.disk`), with the host's /nix/store bind-mounted read-only and the
# init run as the container's PID 1, as NixOS' own containers do (nixos-containers.nix):
# stage 2 activates the system there and hands init's arguments to systemd.
#
# The backdoor is a unix socket the agent makes in `backdoor.folder`, a private (0700) folder
# of the state directory bind-mounted at `backdoor.guestFolder`; the run's key is a root-only
# file there.  The agent learns the folder from init's arguments (`ntng.backdoor=unix:<dir>`):
# a container has no kernel command line, systemd reads its own arguments instead.
#
# systemd-nspawn runs as PID 1 of a PID namespace of its own (unshare --pid --kill-child): a
# SIGKILLed nspawn (the runner's death signal) does not take its container with it, but the
# end of that namespace kills every process in it, the container's included.
let
  node = import ./node.nix;
  inherit (builtins) filter match toJSON concatStringsSep substring;

  backend = "nspawn";
  guestFolder = "/run/ntng-host";

  paths = n: rec {
    layer = "${n.stateDir}/layer"; # nspawn makes the overlay's work folder here, beside upper
    disk = "${layer}/upper";
    root = "${layer}/root"; # a NixOS container's root folder (its "disk")
    folder = "${n.stateDir}/backdoor";
    backdoor = "${folder}/backdoor.sock";
    keyFile = "${folder}/backdoor-key";
    consoleLog = "${n.stateDir}/console.log";
    stderr = "${n.stateDir}/nspawn.stderr"; # unshare's and nspawn's own messages
  };

  nspawnMissing = "systemd-nspawn is in the Debian package systemd-container (apt-get install systemd-container, or run ./setup.sh)";

  fail = n: msg: throw "node '${n.name}': ${msg}";

  # A node description meant for another backend is an error, not something to convert.
  forBackend = spec:
    if !(spec ? backend) || spec.backend == backend
    then { imageFormat = "raw"; } // removeAttrs spec [ "tree" "init" ] // { inherit backend; }
    else throw "node '${spec.name or "?"}': backend ${toJSON spec.backend} is not ${backend} (nspawn.launch builds container plans only; use ${spec.backend}.launch)";

  # Words of the kernel command line that mean something to a container's init: systemd's
  # own (systemd.hostname=, systemd.unit=, ...), ours (ntng.*: read by the agent and the
  # Debian units' ConditionKernelCommandLine, which systemd checks against its arguments in a
  # container) and "quiet".  Others need a kernel of the container's own.
  forInit = p: match "(systemd|ntng)\\..*|quiet" p != null;
  # What test.nix and node.nix add for every node; anything else came from the user.
  planned = p: forInit p || match "net\\.ifnames=0|root=/dev/vda|rw|console=.*|panic=-1|norandmaps" p != null;

  checks = n: [
    (n.cpu == null || fail n "cpu ${toJSON n.cpu}: a QEMU CPU model; a container runs on the host's CPU (leave cpu = null)")
    (let user = filter (p: !(planned p)) n.kernelParams; in user == [ ]
      || fail n "kernelParams ${concatStringsSep " " user}: backend ${backend} lacks kernel parameters (a container shares the host's kernel); only systemd.* and ntng.* words reach its init")
  ];

  # The container's end of a NIC's veth pair: made in the test's network namespace beside the
  # host end (named as a VM's tap, on the vlan's bridge), moved into the container's namespace
  # by the runner once its init exists, found and renamed there by its MAC (ntng-net waits for
  # it).  Not nspawn's --network-interface: nspawn looks the device up in /sys, which shows the
  # host's namespace, not the test's.  15 bytes at most, like every interface name.
  peerName = tap: "nc" + substring 0 12 (builtins.hashString "sha256" "ntng-veth/${tap}");

  # sharedDirs (any type: 9p and virtiofs are the VMs' ways) are bind mounts, read-only where
  # asked.  nspawn splits --bind on ':', so a path must not hold one.
  bindArg = s: "--bind${if s.readOnly then "-ro" else ""}=${s.source}:${s.target}";
  shareChecks = n: map (s:
    (match "[^:]*" s.source != null && match "[^:]*" s.target != null)
      || fail n "sharedDirs.${s.tag}: backend ${backend} bind-mounts shares and cannot take a ':' in their paths (${s.source}, ${s.target})")
    n.sharedDirs;

  # nspawn --machine: the container's name and the base of its veths' names (vb-<name>).
  machineName = name: substring 0 64 name;

  launch = spec:
    let
      n = node.normalise (forBackend spec);
      p = paths n;
      init = spec.init or null; # a NixOS system's toplevel/init (mkTest)
      nixos = init != null;
      tree = if nixos then null else spec.tree or "${dirOf n.image}/tree";
      disk = if nixos then p.root else p.disk;
      # Debian: the image's tree as an overlay's lower layer, booted by nspawn (--boot looks
      # for its init).  NixOS: the root folder as it is, the store read-only from the host,
      # the system's init given as the command (PID 1; no --boot: the root has no init).
      root = if nixos then [ "--directory=${p.root}" "--bind-ro=/nix/store" ]
        else [ "--boot" "--directory=${tree}" "--overlay=${tree}:${p.disk}:/" ];
      # node.nix puts ntng.backdoor=unix:${guestFolder} in kernelParams (backdoorParam).  No
      # ntng.share=: the shares are bind mounts already, nothing for ntng-shares to mount.
      initArgs = filter (p: forInit p && match "ntng\\.share=.*" p == null) n.kernelParams;
    in
    builtins.deepSeq (checks n ++ shareChecks n) {
      name = n.name;
      inherit backend tree;
      inherit (n) accel memory cores bootTimeout kernel;
      inherit (n) stateDir; # the node's folder of sockets and files, made private before the VMM starts
      artifacts = node.artifacts n.name; # in the run's folder: console.log, journal.log
      machine = machineName n.name;
      prepare = [ ];
      writeFiles = { };
      api = [ ];
      # Looked for before anything is prepared, each with what to install.
      checkBinaries = [
        { path = n.unshareBinary; missing = "unshare is in the Debian package util-linux"; }
        { path = n.nspawnBinary; missing = nspawnMissing; }
      ];
      folders = [ p.layer p.folder ]; # made by the runner, 0700, before nspawn starts
      argv = [ n.unshareBinary "--pid" "--fork" "--kill-child" "--mount-proc"
        n.nspawnBinary "--quiet" "--register=no" "--keep-unit"
        "--machine=${machineName n.name}"
      ] ++ root ++ [
        "--bind=${p.folder}:${guestFolder}"
        "--console=read-only" # the container's /dev/console is a pty nspawn copies to stdout
        "--private-network" # its own network namespace: only lo, unless the test gives it NICs
      ] ++ map bindArg n.sharedDirs ++ n.extraArgs ++ (if nixos then [ init ] else [ ]) ++ initArgs;
      inherit init;
      # What the runner makes in a fresh NixOS root before nspawn starts (nixos-containers.nix
      # does the same): nspawn refuses a folder without /usr as a root; the rest is for stage 2.
      # Folders 0755 (root's home 0700), files empty.  Nothing for a Debian tree.
      rootSkeleton = if nixos then {
        folders = [ "usr/bin" "etc" "var/lib" ];
        private = [ "root" "var/lib/private" ];
        files = [ "etc/os-release" "etc/machine-id" ];
      } else null;
      sockets = { inherit (p) backdoor; };
      files = { inherit (p) consoleLog layer stderr; inherit disk; };
      backdoor = {
        transport = "unix";
        inherit (p) folder keyFile;
        socket = p.backdoor;
        inherit guestFolder;
      };
      console = "stdout";
      # A guest reboot ends nspawn with exit status 133; the runner starts it again on the
      # same upper layer.  SIGINT to the container's init is its ctrl-alt-delete (a reboot),
      # SIGRTMIN+4 its poweroff.
      restartOnReboot = true;
      rebootExitStatus = 133;
      helpers = [ ];
      shares = n.sharedDirs; # for the runner: the artifacts share's folder, copies via="share"
      missing = nspawnMissing;
      # Each NIC is a veth pair: `tap` the host end (on `bridge`), `peer` the container's.
      interfaces = map (i: i // { peer = peerName i.tap; link = "host"; }) n.interfaces;
      inherit (n) capabilities;
      launchSpec = spec // { inherit backend; };
    };
in {
  inherit launch paths guestFolder peerName;
}
