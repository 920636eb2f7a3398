# Test spec: the nodes a test declares + the runner's defaults → the JSON the runner reads
# (a launch plan per node, the network plan, the test's options).  builtins only.
#
# `header` is what the test declared (NixOS-style `nodes.<name> = { … };`, from a script's `#:`
# lines or from mkTest), `defaults` what the runner knows (kernel, image, accelerator, state
# root).  mkTest evaluates this at build time with stateRoot = "@stateRoot@"; the runner puts
# its run directory in place of that marker (see python/ntng/testspec.py).
{ header, defaults }:
let
  inherit (builtins) attrNames mapAttrs match filter concatStringsSep isAttrs isInt isBool
    isList isString toJSON elem genList length elemAt listToAttrs;
  network = import ./network.nix;
  builders = {
    qemu = import ./qemu.nix;
    firecracker = import ./firecracker.nix;
    cloud-hypervisor = import ./cloud-hypervisor.nix;
    nspawn = import ./nspawn.nix;
  };

  knownTop = [ "nodes" "name" "globalTimeout" "skipLint" "skipTypeCheck" "backend" ];
  unknownTop = filter (k: !(elem k knownTop)) (attrNames header);

  nodes = header.nodes or { machine = { }; };
  names = attrNames nodes;

  validName = n: match "[A-Za-z][A-Za-z0-9_-]{0,30}" n != null;

  checkedNodes = mapAttrs (name: cfg:
    if !(validName name) then
      throw "node name '${name}' is invalid: use a letter then letters, digits, - or _ (at most 31 characters)"
    else if !(isAttrs cfg) then
      throw "node '${name}': expected an attribute set of options, got ${toJSON cfg}"
    else cfg) nodes;

  # "tap": the runner makes bridges and TAP devices in its own network namespace (needs
  # CAP_NET_ADMIN); "vde": rootless, one vde_switch per vlan (no impairment, no counters).
  networkMode = defaults.networkMode or "tap";
  vdeSocket = vlan: "${defaults.stateRoot}/vde${toString vlan}";
  net0 = network.plan checkedNodes;
  net = net0 // {
    mode = networkMode;
    vlans = mapAttrs (v: plan: plan // (if networkMode == "vde"
      # vdeReady: the control socket vde_switch makes in its folder once it serves.
      then { vdeSocket = vdeSocket plan.vlan; vdeSwitch = network.vdeSwitchArgv (vdeSocket plan.vlan); vdeReady = "${vdeSocket plan.vlan}/ctl"; }
      else { vdeSocket = null; vdeSwitch = null; vdeReady = null; })) net0.vlans;
    nodes = mapAttrs (name: map (i: i // { vdeSocket = if networkMode == "vde" then vdeSocket i.vlan else null; })) net0.nodes;
  };

  # A kernel-booted guest (the Debian image) configures its NICs and /etc/hosts from these at
  # boot (backdoor/debian/ntng-net); a NixOS system gets the same from modules/test-network.nix.
  netParams = name: network.kernelParams net.nodes.${name} net.hosts;

  # Each node gets its own vsock CID (3, 4, …): vsock addresses must not clash on one host.
  cid = name: let go = i: if elemAt names i == name then i else go (i + 1); in 3 + go 0;

  nodePlan = name: cfg:
    let
      backend = cfg.backend or header.backend or "qemu";
      builder = if isString backend && builders ? ${backend} then builders.${backend}
        else throw "node '${name}': unknown backend ${toJSON backend} (known: ${concatStringsSep ", " (attrNames builders)})";
      # Firecracker and QEMU's microvm boot an ELF vmlinux, not a bzImage.
      wantsElf = backend == "firecracker" || (cfg.machineType or null) == "microvm";
      kernel = cfg.kernel or (if wantsElf then defaults.vmlinux or defaults.kernel else defaults.kernel);
      spec = removeAttrs defaults [ "stateRoot" "vmlinux" "networkMode" ] // cfg // {
        inherit name backend kernel;
        stateDir = "${defaults.stateRoot}/${name}";
        # Not a list: passed on as it is, for node.nix to reject with the node's name.
        kernelParams = let k = cfg.kernelParams or [ ]; in
          if isList k && kernel != null then [ (network.hostnameParam name) ] ++ netParams name ++ k else k;
        interfaces = net.nodes.${name};
        backdoor = let b = cfg.backdoor or { }; in if isAttrs b then { guestCid = cid name; } // b else b;
      } // (if kernel == null then { initrd = cfg.initrd or null; } else { }); # disk boot: the runner's initrd is not for it
    in builder.launch spec;

  check = cond: msg: if cond then true else throw msg;
  topChecks = [
    (check (unknownTop == [ ]) "unknown test option(s) ${concatStringsSep ", " unknownTop} (known: ${concatStringsSep ", " knownTop})")
    # No nodes is allowed: a host-side test (no VM) still gets the driver, reports and suites.
    (check (isAttrs nodes) "nodes must be an attribute set (node name = options), got ${toJSON nodes}")
    (check (isInt (header.globalTimeout or 3600) && (header.globalTimeout or 3600) > 0) "globalTimeout must be a positive number of seconds, got ${toJSON header.globalTimeout}")
    (check (isBool (header.skipLint or false)) "skipLint must be a boolean")
    (check (isBool (header.skipTypeCheck or false)) "skipTypeCheck must be a boolean")
    (check (isString (header.name or "test")) "name must be a string")
    (check (elem networkMode [ "tap" "vde" ]) "networkMode must be \"tap\" or \"vde\", got ${toJSON networkMode}")
  ];
in
builtins.deepSeq topChecks {
  name = header.name or "test";
  globalTimeout = header.globalTimeout or 3600;
  skipLint = header.skipLint or false;
  skipTypeCheck = header.skipTypeCheck or false;
  nodeNames = names;
  nodes = mapAttrs nodePlan checkedNodes;
  network = net;
}
