# The flake's offline checks: builtins-only evaluation tests of nixlib, in Nix itself, so that
# `nix flake check` proves the library without nixpkgs, Python or a VM.  (The pytest suite in
# tests/nix covers the same functions more deeply, plus the spec contracts and the modules.)
# Evaluates to { passed; failures = [ ]; } or throws with every failure listed.
let
  nixlib = import ../../nixlib;
  inherit (builtins) length attrNames concatMap filter elem tryEval deepSeq all map toJSON
    concatStringsSep sort lessThan genList elemAt;

  base = { kernel = "/k"; initrd = "/i"; image = "/img"; imageFormat = "raw"; stateDir = "/s"; };
  node = name: extra: base // { inherit name; stateDir = "/s/${name}"; } // extra;

  throws = expr: !(tryEval (deepSeq expr expr)).success;
  unique = xs: let s = sort lessThan xs; in all (i: elemAt s i != elemAt s (i - 1)) (genList (i: i + 1) (length s - 1));
  # Values of "id=" in a QEMU argv: device and backend ids must not repeat.
  ids = argv: concatMap (a: let m = builtins.match ".*(^|,)id=([^,]+).*" a; in if m == null then [ ] else [ (elemAt m 1) ]) argv;

  plan = nixlib.network.plan { a = { vlans = [ 1 2 ]; }; b = { vlans = [ 1 ]; }; c = { }; };
  planWithD = nixlib.network.plan { a = { vlans = [ 1 2 ]; }; b = { vlans = [ 1 ]; }; c = { }; d = { vlans = [ 2 ]; }; };
  interfaces = concatMap (n: plan.nodes.${n}) (attrNames plan.nodes);

  q = nixlib.qemu.launch (node "a" { interfaces = plan.nodes.a; extraSerialPorts = [ "x" ]; });
  qv = nixlib.qemu.launch (node "a" { backdoor.transport = "vsock"; machineType = "microvm"; });
  fc = nixlib.firecracker.launch (node "a" { backend = "firecracker"; interfaces = plan.nodes.a; });
  ch = nixlib.cloudHypervisor.launch (node "a" { backend = "cloud-hypervisor"; interfaces = plan.nodes.a; });
  spec = nixlib.testSpec {
    header = { nodes = { a = { vlans = [ 1 ]; }; b = { vlans = [ 1 ]; memory = 512; }; }; };
    defaults = { kernel = "/k"; image = "/img"; imageFormat = "raw"; accel = "tcg"; stateRoot = "/run"; };
  };

  # Two clones of a in turn (the second sees the first): network.nix's scheme, nothing shared.
  c1 = nixlib.clone.interfaces { nodes = plan.nodes; origin = "a"; clone = "c1"; };
  c2 = nixlib.clone.interfaces { nodes = plan.nodes // { inherit c1; }; origin = "a"; clone = "c2"; };
  cloned = interfaces ++ c1 ++ c2;

  cases = {
    cloneDevicesFollowNetworkNix = map (i: [ i.tap i.mac ]) c1
      == map (i: [ i.tap i.mac ]) (nixlib.network.plan { c1 = { vlans = [ 1 2 ]; }; }).nodes.c1;
    cloneTakesNextNumber = map (i: i.ipv4) c2 == [ "192.168.1.4" "192.168.2.4" ];
    clonesNeverCollide = all (k: unique (map (i: i.${k}) cloned)) [ "tap" "ifb" "mac" "ipv4" "ipv6" ];
    macsUnique = unique (map (i: i.mac) interfaces);
    tapsUnique = unique (map (i: i.tap) interfaces);
    tapsFitIfnames = all (i: builtins.stringLength i.tap <= 15) interfaces;
    addingANodeKeepsOthersDevices = planWithD.nodes.a == plan.nodes.a && planWithD.nodes.b == plan.nodes.b;
    nixosAddresses = (builtins.head plan.nodes.b).ipv4 == "192.168.1.2";
    hostsListEveryNetworkedNode = map (h: builtins.head h.names) plan.hosts == [ "a" "a" "b" "b" ];
    vlanMembers = plan.vlans."1".members == [ "a" "b" ];
    qemuIdsUnique = unique (ids q.argv);
    qemuOneNicPerVlan = length (filter (a: a == "-netdev") q.argv) == 2;
    qemuVsockHelper = (builtins.head qv.helpers).name == "vhost-device-vsock" && elem "vhost-user-vsock-device,chardev=vsock0" qv.argv;
    qemuMicrovmHasNoPci = all (a: builtins.match ".*-pci.*" a == null) qv.argv;
    firecrackerConfigComplete = attrNames (fc.writeFiles.${builtins.head (attrNames fc.writeFiles)}) == [ "boot-source" "drives" "logger" "machine-config" "metrics" "network-interfaces" "vsock" ];
    firecrackerTaps = map (i: i.host_dev_name) (fc.writeFiles.${builtins.head (attrNames fc.writeFiles)})."network-interfaces" == map (i: i.tap) plan.nodes.a;
    cloudHypervisorCreatesThenBoots = map (c: c.path) ch.api == [ "/api/v1/vm.create" "/api/v1/vm.boot" ];
    specHasEveryNode = spec.nodeNames == [ "a" "b" ] && spec.nodes.b.memory == 512;
    specCidsDistinct = spec.nodes.a.backdoor.guestCid != spec.nodes.b.backdoor.guestCid;
    stableAcrossEvaluations = nixlib.qemu.launch (node "a" { }) == nixlib.qemu.launch (node "a" { });

    throwsMemoryNotInteger = throws (nixlib.qemu.launch (node "a" { memory = "1G"; }));
    throwsVlanOutOfRange = throws (nixlib.network.plan { a = { vlans = [ 0 ]; }; });
    throwsUnknownBackend = throws (nixlib.testSpec { header = { nodes.a = { backend = "bochs"; }; }; defaults = base // { accel = "tcg"; stateRoot = "/r"; }; });
    throwsMissingCapability = throws (nixlib.firecracker.launch (node "a" { backend = "firecracker"; backdoor.transport = "virtio-serial"; }));
    throwsFirecrackerOnTcg = throws (nixlib.firecracker.launch (node "a" { backend = "firecracker"; accel = "tcg"; }));
    throwsNodesNotAnAttrset = throws (nixlib.testSpec { header = { nodes = [ "a" ]; }; defaults = { stateRoot = "/r"; }; });
    noNodesIsNoVm = (nixlib.testSpec { header = { nodes = { }; }; defaults = { stateRoot = "/r"; }; }).nodeNames == [ ];
  };

  failures = filter (n: cases.${n} != true) (attrNames cases);
in
if failures == [ ] then { passed = length (attrNames cases); inherit failures; }
else throw "nixlib checks failed: ${concatStringsSep ", " failures}"
