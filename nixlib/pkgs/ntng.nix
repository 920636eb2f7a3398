# The host-side runner (`ntng`, `nixos-test-ng`) as a Python application of the repo's
# pyproject.toml; nixlib/ ships inside it, since the runner evaluates nixlib for Debian guests.
# Its Python dependencies are pyproject's (plus the `typecheck` extra: mkTest's quick check
# runs mypy), its PATH the tools nixlib/tools.nix marks `wrapped`: neither list is written here.
{ python3Packages, lib, pkgs }:
let
  src = lib.cleanSource ../..;
  project = (builtins.fromTOML (builtins.readFile ../../pyproject.toml)).project;
  deps = import ./python-deps.nix { inherit project; };
  # The one version (python/ntng/protocol.py; pyproject.toml reads it from there too).
  version = builtins.head (builtins.match ".*\nPACKAGE_VERSION = \"([^\"]+)\"\n.*"
    (builtins.readFile ../../python/ntng/protocol.py));
  # An optional tool the caller's nixpkgs lacks is left out (doctor reports it as missing).
  tools = lib.filterAttrs (_: t: t.wrapped && t.nixpkgs != null && pkgs ? ${t.nixpkgs}) (import ../tools.nix);
  toolPackages = lib.unique (lib.mapAttrsToList (_: t: pkgs.${t.nixpkgs}) tools);
in
python3Packages.buildPythonApplication {
  pname = project.name;
  inherit version;
  pyproject = true;
  inherit src;
  build-system = [ python3Packages.setuptools ];
  dependencies = map (name: python3Packages.${name}) deps.attributes;
  # NTNG_DATA: nixlib/ and backdoor/ (python/ntng/paths.py).
  makeWrapperArgs = [ "--prefix" "PATH" ":" (lib.makeBinPath toolPackages)
    "--set-default" "NTNG_DATA" "${src}" ];
  doCheck = false; # the test suite boots VMs: it runs as the flake's checks and in CI
  passthru = { inherit toolPackages; pythonDependencies = deps.attributes; };
  meta.mainProgram = "ntng";
}
