# Snapshots and clones, builtins only: where a snapshot of a node goes and which API calls save
# and load it (each backend's `snapshot`), and the plan of a clone restored from one.
#
# A clone is its origin's launch spec with its own name, state directory, NICs and `restore`,
# evaluated by the backend's `launch` again: the device list stays the origin's (QEMU loads the
# saved device state only into the same machine shape).  Its NICs follow network.nix's scheme:
# the origin's vlans in the same order, tap and MAC hashed from the clone's name, and the next
# free node number after every node's and earlier clone's (nodes hold .1 to .N, .254 is the
# runner's), so the NixOS-style numbering of the declared nodes never changes.
let
  network = import ./network.nix;
  capabilities = import ./capabilities.nix;
  builders = {
    qemu = import ./qemu.nix;
    firecracker = import ./firecracker.nix;
    cloud-hypervisor = import ./cloud-hypervisor.nix;
  };
  inherit (builtins) attrNames concatMap concatStringsSep elem filter foldl' head isList length match
    substring stringLength toJSON genList elemAt;

  hasPrefix = p: s: substring 0 (stringLength p) s == p;
  backendOf = spec: spec.backend or "qemu";

  # Where snapshot `name` of the node with launch spec `spec` lives, and its calls.
  # guestPrepare: commands run in the guest before it is saved, so its clones need not run
  # them (an exec in a freshly restored TCG guest is slow): the folder `identity` writes to.
  snapshot = { spec, name, resume ? true }:
    builders.${backendOf spec}.snapshot { inherit spec name resume; } // {
      guestPrepare = if elem "clone" capabilities.backends.${backendOf spec}.features
        then [ [ "mkdir" "-p" "/run/ntng" ] ] else [ ];
    };

  # nodes: the network plan's nodes (with earlier clones); the clone's interfaces.
  interfaces = { nodes, origin, clone }:
    let
      all = concatMap (n: nodes.${n}) (attrNames nodes);
      hostNumber = i: let m = match ".*\\.([0-9]+)" i.ipv4; in if m == null then 0 else builtins.fromJSON (head m);
      number = foldl' (acc: i: if hostNumber i > acc then hostNumber i else acc) 0 all + 1;
      ifaces = genList (k:
        let old = elemAt nodes.${origin} k; in
        old // network.interface { name = clone; i = k; vlan = old.vlan; inherit number; }
      ) (length (nodes.${origin} or [ ]));
      taken = key: map (i: i.${key}) all;
      clash = key: filter (i: elem i.${key} (taken key)) ifaces;
    in
    if nodes ? ${clone} then throw "clone ${toJSON clone}: there is a node or clone of that name already"
    else if !(nodes ? ${origin}) then throw "clone ${toJSON clone}: no node called ${toJSON origin}"
    else if ifaces != [ ] && number > 253 then throw "clone ${toJSON clone}: no address left on the vlans (.1-.253 are taken)"
    else if clash "mac" != [ ] then throw "clone ${toJSON clone}: MAC ${(head (clash "mac")).mac} collides with another node's; use another name"
    else if clash "tap" != [ ] then throw "clone ${toJSON clone}: tap ${(head (clash "tap")).tap} collides with another node's; use another name"
    else ifaces;

  # The origin's kernel parameters with the clone's hostname, NICs and hosts entry (a later cold
  # boot of the clone, after crash(), comes up as itself; a restore ignores them).
  kernelParams = { params, clone, old, new, hosts }:
    let
      ifFor = w: filter (k: hasPrefix "ntng.if=${(elemAt old k).mac}," w) (genList (k: k) (length old));
      entry = if new == [ ] then [ ] else [{ address = (head new).ipv4; names = [ clone ]; }];
    in
    if !(isList params) then params else map (w:
      if hasPrefix "systemd.hostname=" w then network.hostnameParam clone
      else if ifFor w != [ ] then network.ifParam (elemAt new (head (ifFor w)))
      else if hasPrefix "ntng.hosts=" w then network.hostsParam (hosts ++ entry)
      else w) params;

  # What a clone is told right after its restore (python/ntng/clones.py sends it): its hostname,
  # its hosts entry, and `nics`, one shell command giving its NICs their own MACs and addresses
  # (virtio-net migrates the origin's MAC, so the guest keeps it unless told; one `ip -batch`:
  # each exec is slow in a freshly restored TCG guest).  `script`: all of it as one shell script
  # for an agent without the IDENTITY request, the run-time values (the host's clock, the clone
  # id) in $NTNG_EPOCH and $NTNG_CLONE_ID (/run/ntng: made in the origin before the snapshot).
  identity = { clone, interfaces }:
    let
      hosts = if interfaces == [ ] then [ ] else [ "${(head interfaces).ipv4} ${clone}" ];
      nicLines = concatMap (i: let dev = i.guestName; in [
        "link set dev ${dev} down"
        "link set dev ${dev} address ${i.mac}"
        "addr flush dev ${dev}"
        "addr add ${i.ipv4}/${toString i.prefixLength4} dev ${dev}"
        "addr add ${i.ipv6}/${toString i.prefixLength6} dev ${dev} nodad"
        "link set dev ${dev} up"
      ]) interfaces;
      nics = if nicLines == [ ] then "" else concatStringsSep "\n" ([ "ip -batch - <<'EOF'" ] ++ nicLines ++ [ "EOF" ]);
    in {
      hostname = clone;
      inherit hosts nics;
      script = concatStringsSep "\n" ([
        "date -s \"@$NTNG_EPOCH\" >/dev/null" # first: the clock matters most
        "echo ${clone} > /proc/sys/kernel/hostname"
        "echo ${clone} > /etc/hostname"
        "echo \"$NTNG_CLONE_ID\" > /run/ntng/clone-id"
      ] ++ (if nics == "" then [ ] else [ nics ]) ++ map (h: "echo '${h}' >> /etc/hosts") hosts);
    };

  # The clone's launch spec and plan.  snapshot: this module's `snapshot` result for the origin;
  # nodes/hosts: the network plan's (nodes with earlier clones; hosts of the declared nodes).
  plan = { spec, clone, snapshot, ram ? false, nodes ? { }, hosts ? [ ] }:
    let
      backend = backendOf spec;
      caps = capabilities.backends.${backend};
      new = if spec.interfaces or [ ] == [ ] then [ ] else interfaces { inherit nodes clone; origin = spec.name; };
      cloneSpec = spec // {
        name = clone;
        stateDir = "${dirOf spec.stateDir}/${clone}";
        interfaces = new;
        restore = { disk = snapshot.files.disk; ram = if ram then snapshot.files.ram else null; };
        kernelParams = kernelParams { params = spec.kernelParams or [ ]; inherit clone new hosts; old = spec.interfaces or [ ]; };
      };
    in
    if match "[A-Za-z][A-Za-z0-9_-]{0,30}" clone == null then
      throw "clone name ${toJSON clone} is invalid: use a letter then letters, digits, - or _ (at most 31 characters)"
    else if !(elem "clone" caps.features) then
      throw "clone ${toJSON clone}: backend ${backend} cannot clone: ${(capabilities.effective backend { backdoor = { }; }).why.clone or "no clone feature"}"
    else { interfaces = new; identity = identity { inherit clone; interfaces = new; }; plan = builders.${backend}.launch cloneSpec; };
in {
  inherit snapshot interfaces kernelParams identity plan;
}
