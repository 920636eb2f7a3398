# Test helper: apply one nixlib function (dotted, e.g. "firecracker.launch") to every element of
# a JSON list in a single evaluation, so a test can check hundreds of node variants at the cost
# of one nix-instantiate run:
#   nix-instantiate --eval --strict --json tests/nix/eval-many.nix --argstr fn F --argstr args '[...]'
{ fn, args }:
let
  lib = import ../../nixlib/default.nix;
  path = builtins.filter builtins.isString (builtins.split "\\." fn);
  f = builtins.foldl' (acc: k: acc.${k} or (throw "nixlib has no function '${fn}'")) lib path;
in
map f (builtins.fromJSON args)
