# Where the stand-ins declare each NixOS option and nixpkgs attribute, for the check of
# docs/nixos-fidelity.md (tests/nix/test_nixos_fidelity.py):
#   nix-instantiate --eval --strict --json tests/nix/eval-stand-ins.nix --argstr libPath $NIXPKGS_LIB
# options: option name -> [ "file:line" ] of its declarations, for the stand-ins mkTest's fake
# eval-config.nix uses plus journald-settings.nix (the newest nixpkgs' services.journald);
# packages: attribute path of fake-nixpkgs -> "file:line"; lib: the names the vendored lib has.
{ libPath }:
let
  lib = import libPath;
  pkgs = import ./fake-nixpkgs/pkgs.nix { inherit lib; };
  root = toString ../.. + "/";
  rel = p: lib.removePrefix root (toString p.file) + ":${toString p.line}";
  # Options and the options of their submodules (systemd.services.<name>.wantedBy, ...).
  withSubOptions = depth: o: [ o ] ++ lib.optionals (depth > 0)
    (lib.concatMap (withSubOptions (depth - 1)) (lib.collect lib.isOption (o.type.getSubOptions o.loc)));
  declared = modules:
    let eval = lib.evalModules { modules = modules ++ [ { _module.args.pkgs = pkgs; } ]; };
    in lib.listToAttrs (map (o: { name = lib.showOption o.loc; value = map rel o.declarationPositions; })
      (lib.concatMap (withSubOptions 3) (lib.collect lib.isOption eval.options)));
  modulesDir = ./fake-nixpkgs/nixos/modules;
  positions = set: lib.mapAttrs (n: _: rel (builtins.unsafeGetAttrPos n set)) set;
in
{
  options = declared [ (modulesDir + "/stand-ins.nix") (modulesDir + "/journald.nix") ]
    // lib.filterAttrs (n: _: lib.hasPrefix "services.journald.settings" n)
      (declared [ ./nixos-stand-ins.nix (modulesDir + "/journald-settings.nix") ]);
  packages = lib.mapAttrs' (n: v: lib.nameValuePair "pkgs.${n}" v) (positions pkgs)
    // lib.mapAttrs' (n: v: lib.nameValuePair "pkgs.python3Packages.${n}" v) (positions pkgs.python3Packages)
    // lib.mapAttrs' (n: v: lib.nameValuePair "pkgs.stdenv.${n}" v) (positions pkgs.stdenv);
  lib = lib.attrNames lib ++ map (n: "types.${n}") (lib.attrNames lib.types)
    ++ map (n: "types.ints.${n}") (lib.attrNames lib.types.ints) ++ map (n: "trivial.${n}") (lib.attrNames lib.trivial);
}
