# Entry point for the runner: `nix-instantiate --eval --strict --json nixlib/eval.nix
#   --argstr fn qemu.launch --argstr arg '<json>'` applies a nixlib function to JSON input.
{ fn, arg }:
let
  lib = import ./default.nix;
  path = builtins.filter builtins.isString (builtins.split "\\." fn);
  f = builtins.foldl' (acc: k: acc.${k} or (throw "nixlib has no function '${fn}'")) lib path;
in
f (builtins.fromJSON arg)
