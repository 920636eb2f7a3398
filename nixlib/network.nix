# Network plan, builtins only: which node sits on which vlan → bridges, TAP devices,
# deterministic MACs, IPv4/IPv6 addresses and hosts entries.  The runner makes the bridges and
# taps (inside its own network namespace) from this plan; guests get the addresses from it.
#
# Addresses follow the NixOS test driver, so scripts that hard-code them keep working:
# node number i (1-based, nodes sorted by name) on vlan v is 192.168.v.i and 2001:db8:v::i.
# MACs and tap names hash the node name and vlan instead, so adding a node never renames
# another node's devices.
let
  inherit (builtins) attrNames listToAttrs concatMap filter length elemAt genList toString
    hashString substring elem foldl' toJSON sort lessThan concatStringsSep;

  hash = s: hashString "sha256" s;

  # 52:54:00 is QEMU's prefix; three more bytes from the hash of "<node>/<vlan>".
  mac = node: vlan:
    let h = hash "ntng-mac/${node}/${toString vlan}"; b = i: substring (2 * i) 2 h; in
    "52:54:00:${b 0}:${b 1}:${b 2}";

  # Linux interface names have at most 15 bytes: a readable prefix of the node name, the vlan,
  # and 4 hex digits of a hash that keep two nodes sharing a prefix apart.
  tapName = node: vlan:
    "${substring 0 6 node}-${toString vlan}-${substring 0 4 (hash "ntng-tap/${node}/${toString vlan}")}";

  bridgeName = vlan: "ntng-br${toString vlan}";

  # The runner's ifb device for host-side impairment of the tap's ingress (python/ntng/netem.py):
  # 48 bits of hash, as "ifb" + the tap name cut to 15 bytes would drop the tap's own hash.
  ifbName = node: vlan: "ifb${substring 0 12 (hash "ntng-ifb/${node}/${toString vlan}")}";

  # Node number i (1-based) on vlan v: the NixOS driver's addresses (clones take the next free i).
  ipv4 = vlan: i: "192.168.${toString vlan}.${toString i}";
  ipv6 = vlan: i: "2001:db8:${toString vlan}::${toString i}";

  # One interface of node `name`: its i-th NIC (ethi in the guest), on vlan `vlan`, number `number`.
  interface = { name, i, vlan, number, impairment ? null }: {
    inherit vlan impairment;
    tap = tapName name vlan;
    ifb = ifbName name vlan;
    mac = mac name vlan;
    bridge = bridgeName vlan;
    # Guest-side name: interfaces are matched by MAC in the guest; ethN is the order the
    # backends create the NICs in, for users who want a name.
    guestName = "eth${toString i}";
    # The guest's IFB device for in-guest impairment of its ingress (python/ntng/netem.py).
    guestIfb = "ifb-eth${toString i}";
    ipv4 = ipv4 vlan number;
    prefixLength4 = 24;
    ipv6 = ipv6 vlan number;
    prefixLength6 = 64;
  };

  # Kernel parameters a kernel-booted guest configures itself from (backdoor/debian/ntng-net;
  # test.nix for nodes, clone.nix for clones): hostname, NICs, hosts entries.
  hostnameParam = name: "systemd.hostname=${name}";
  ifParam = i: "ntng.if=${i.mac},${i.guestName},${i.ipv4}/${toString i.prefixLength4},${i.ipv6}/${toString i.prefixLength6}";
  hostsParam = hosts: "ntng.hosts=${concatStringsSep "," (map (h: "${builtins.head h.names}=${h.address}") hosts)}";
  kernelParams = interfaces: hosts:
    (if interfaces == [ ] then [ ] else [ "net.ifnames=0" ]) # ntng-net names NICs by MAC
    ++ map ifParam interfaces
    ++ (if hosts == [ ] then [ ] else [ (hostsParam hosts) ]);

  # Rootless mode: one switch per vlan (stdin stays open: vde_switch quits at EOF).
  vdeSwitchArgv = sock: [ "vde_switch" "--sock" sock "--dirmode" "0700" ];

  indexOf = x: xs:
    let go = i: if i >= length xs then throw "internal: ${x} not in list" else if elemAt xs i == x then i else go (i + 1);
    in go 0;

  duplicates = xs:
    let sorted = sort lessThan xs;
    in filter (x: x != null) (genList (i: if i > 0 && elemAt sorted i == elemAt sorted (i - 1) then elemAt sorted i else null) (length sorted));

  # nodes: { <name> = { vlans = [ … ]; … }; }  →  the plan.
  plan = nodes:
    let
      names = sort lessThan (attrNames nodes);
      vlansOf = name:
        let vs = nodes.${name}.vlans or [ ]; in
        if !(builtins.isList vs) then throw "node '${name}': vlans must be a list of integers from 1 to 254, got ${toJSON vs}"
        else map (v:
          if !(builtins.isInt v) || v < 1 || v > 254
          then throw "node '${name}': vlans: ${toJSON v} is out of range (vlans are integers from 1 to 254)"
          else v) vs;
      checkedVlans = name:
        let vs = vlansOf name; d = duplicates vs; in
        if d != [ ] then throw "node '${name}': vlans: vlan ${toString (builtins.head d)} is listed twice" else vs;
      number = name: indexOf name names + 1;

      # impairments = [ { vlan = 1; delay = 50; loss = 5; direction = "both"; } … ]: netem on
      # the node's link from the start.  The values are checked by the runner (python/ntng/
      # netem.py, one definition for these and run-time impair() calls); the links here.
      impairmentsOf = name:
        let
          is = nodes.${name}.impairments or [ ];
          vs = vlansOf name;
          ok = i: builtins.isAttrs i && i ? vlan;
        in
        if !(builtins.isList is) || !(builtins.all ok is) then
          throw "node '${name}': impairments must be a list of { vlan = <n>; delay = …; loss = …; … }, got ${toJSON is}"
        else
          let
            bad = filter (i: !(elem i.vlan vs)) is;
            dup = duplicates (map (i: toString i.vlan) is);
          in
          if bad != [ ] then throw "node '${name}': impairments: vlan ${toJSON (builtins.head bad).vlan} is not one of the node's vlans (${concatStringsSep ", " (map toString vs)})"
          else if dup != [ ] then throw "node '${name}': impairments: vlan ${builtins.head dup} is impaired twice"
          else is;
      impairmentOn = name: vlan:
        let found = filter (i: i.vlan == vlan) (impairmentsOf name); in
        if found == [ ] then null else removeAttrs (builtins.head found) [ "vlan" ];

      interfacesOf = name: let vs = checkedVlans name; in genList (i:
        let vlan = elemAt vs i; in
        interface { inherit name i vlan; number = number name; impairment = impairmentOn name vlan; }) (length vs);
      nodePlans = listToAttrs (map (name: { inherit name; value = interfacesOf name; }) names);
      all = concatMap (name: nodePlans.${name}) names;

      allVlans = sort lessThan (foldl' (acc: i: if elem i.vlan acc then acc else acc ++ [ i.vlan ]) [ ] all);
      vlanPlan = v: {
        vlan = v;
        bridge = bridgeName v;
        subnet4 = "${ipv4 v 0}/24";
        subnet6 = "2001:db8:${toString v}::/64";
        members = filter (name: elem v (vlansOf name)) names;
        # The runner's own address on the bridge (forward_port connects from it); nodes use .1-.253.
        hostAddress4 = "192.168.${toString v}.254";
        hostAddress6 = "2001:db8:${toString v}::fffe";
      };

      # Hosts entries: every node by name at its address on its first vlan (as NixOS does).
      hosts = concatMap (name:
        let is = nodePlans.${name}; in
        if is == [ ] then [ ] else [
          { address = (builtins.head is).ipv4; names = [ name ]; }
          { address = (builtins.head is).ipv6; names = [ name ]; }
        ]) names;

      dupMacs = duplicates (map (i: i.mac) all);
      dupTaps = duplicates (map (i: i.tap) all);
    in
      if length names > 253 then throw "network: at most 253 nodes can share the 192.168.<vlan>.0/24 plan (.254 is the runner's), got ${toString (length names)}"
      else if dupMacs != [ ] then throw "network: MAC ${builtins.head dupMacs} collides between two nodes; rename one of them"
      else if dupTaps != [ ] then throw "network: tap name ${builtins.head dupTaps} collides between two nodes; rename one of them"
      else {
        vlans = listToAttrs (map (v: { name = toString v; value = vlanPlan v; }) allVlans);
        nodes = nodePlans;
        inherit hosts;
        hostsFile = concatStringsSep "\n" (map (h: "${h.address} ${concatStringsSep " " h.names}") hosts) + "\n";
      };
in {
  inherit plan mac tapName bridgeName ifbName ipv4 ipv6 interface duplicates
    hostnameParam ifParam hostsParam kernelParams vdeSwitchArgv;
}
