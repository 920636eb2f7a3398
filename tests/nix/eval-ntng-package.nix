# nixlib/pkgs/ntng.nix called with stand-ins: fake-nixpkgs' packages plus the host tools and a
# python3Packages whose buildPythonApplication returns what it was given, so a test can compare
# the package's dependencies and PATH with pyproject.toml and nixlib/tools.nix.
#   nix-instantiate --eval --strict --json --readonly-mode tests/nix/eval-ntng-package.nix --argstr libPath $NIXPKGS_LIB
{ libPath }:
let
  lib = import libPath;
  fake = import ./fake-nixpkgs/pkgs.nix { inherit lib; };
  pkg = name: { type = "derivation"; inherit name; outPath = fake.storePath name "pkg:${name}"; meta = { }; };
  # Packages nixpkgs has under these names (python3Packages.<name>).
  python3Packages = lib.genAttrs [ "setuptools" "construct" "cffi" "pyroute2" "pyflakes" "mypy" ] (n: pkg "python3.12-${n}")
    // { buildPythonApplication = args: args; };
  tools = lib.genAttrs [ "nix" "vde2" "vhost-device-vsock" "virtiofsd" "tesseract" "debootstrap"
    "util-linux" "systemd" "gzip" "xz" "zstd" "e2fsprogs" "coreutils" "qemu_kvm" "firecracker" "cloud-hypervisor" ] pkg;
  pkgs = fake // tools // { inherit python3Packages pkgs; };
  callPackage = path: let f = import path; in f (builtins.intersectAttrs (builtins.functionArgs f) pkgs);
  app = callPackage ../../nixlib/pkgs/ntng.nix;
in
{
  inherit (app) pname version;
  dependencies = map (d: d.name) app.dependencies;
  pythonDependencies = app.passthru.pythonDependencies;
  path = builtins.elemAt app.makeWrapperArgs 3;
  toolPackages = map (d: d.name) app.passthru.toolPackages;
}
