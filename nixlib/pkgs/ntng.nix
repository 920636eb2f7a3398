# The host-side runner (`ntng`, `nixos-test-ng`) as a Python application of the repo's
# pyproject.toml; nixlib/ ships inside it, since the runner evaluates nixlib for Debian guests.
{ python3Packages, nix, qemu_kvm, lib }:
let
  src = lib.cleanSource ../..;
  # The one version (python/ntng/protocol.py; pyproject.toml reads it too).
  version = builtins.head (builtins.match ".*\nPACKAGE_VERSION = \"([^\"]+)\"\n.*"
    (builtins.readFile ../../python/ntng/protocol.py));
in
python3Packages.buildPythonApplication {
  pname = "nixos-test-ng";
  inherit version;
  pyproject = true;
  inherit src;
  build-system = [ python3Packages.setuptools ];
  dependencies = with python3Packages; [ construct cffi ];
  # nix-instantiate evaluates nixlib for tests without a prebuilt spec; QEMU is the default VMM;
  # NTNG_DATA: nixlib/ and backdoor/ (python/ntng/paths.py).
  makeWrapperArgs = [ "--prefix" "PATH" ":" (lib.makeBinPath [ nix qemu_kvm ])
    "--set-default" "NTNG_DATA" "${src}" ];
  doCheck = false; # the test suite boots VMs: it runs as the flake's checks and in CI
  meta.mainProgram = "ntng";
}
