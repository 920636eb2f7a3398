# Test spec: the nodes a test script declares + the runner's defaults → a launch plan per node.
# builtins only.  `header` is what the script declared (NixOS-style `nodes.<name> = { … };`),
# `defaults` what the runner knows (kernel, image, accelerator, state root).
{ header, defaults }:
let
  inherit (builtins) attrNames mapAttrs match filter concatStringsSep isAttrs toJSON elem;
  qemu = import ./qemu.nix;

  knownTop = [ "nodes" "name" "globalTimeout" "skipLint" "skipTypeCheck" ];
  unknownTop = filter (k: !(elem k knownTop)) (attrNames header);

  nodes = header.nodes or { machine = { }; };

  validName = n: match "[A-Za-z][A-Za-z0-9_-]{0,30}" n != null;

  nodePlan = name: cfg:
    if !(validName name) then
      throw "node name '${name}' is invalid: use a letter then letters, digits, - or _ (at most 31 characters)"
    else if !(isAttrs cfg) then
      throw "node '${name}': expected an attribute set of options, got ${toJSON cfg}"
    else
      qemu.launch (removeAttrs defaults [ "stateRoot" ] // cfg // {
        inherit name;
        stateDir = "${defaults.stateRoot}/${name}";
        kernelParams = [ "systemd.hostname=${name}" ] ++ (cfg.kernelParams or [ ]);
      });
in
if unknownTop != [ ] then
  throw "unknown test option(s) ${concatStringsSep ", " unknownTop} (known: ${concatStringsSep ", " knownTop})"
else if nodes == { } then
  throw "the test declares no nodes"
else {
  name = header.name or "test";
  globalTimeout = header.globalTimeout or 3600;
  nodeNames = attrNames nodes;
  nodes = mapAttrs nodePlan nodes;
}
