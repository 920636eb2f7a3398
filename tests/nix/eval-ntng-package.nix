# nixlib/pkgs/ntng.nix called with fake-nixpkgs' packages (the host tools among them), whose
# python3Packages.buildPythonApplication returns what it was given, so a test can compare
# the package's dependencies and PATH with pyproject.toml and nixlib/tools.nix.
#   nix-instantiate --eval --strict --json --readonly-mode tests/nix/eval-ntng-package.nix --argstr libPath $NIXPKGS_LIB
{ libPath }:
let
  lib = import libPath;
  fake = import ./fake-nixpkgs/pkgs.nix { inherit lib; };
  pkgs = fake // { inherit pkgs; };
  callPackage = path: let f = import path; in f (builtins.intersectAttrs (builtins.functionArgs f) pkgs);
  app = callPackage ../../nixlib/pkgs/ntng.nix;
in
{
  inherit (app) pname version;
  dependencies = map (d: d.pname) app.dependencies;
  pythonDependencies = app.passthru.pythonDependencies;
  path = builtins.elemAt app.makeWrapperArgs 3;
  # The attribute names of the tool packages (derivations compare by output path).
  toolPackages = lib.attrNames (lib.filterAttrs (_: v: lib.isDerivation v && builtins.elem v app.passthru.toolPackages) fake);
}
