# A fake nixpkgs package set, just enough for nixlib/mkTest.nix, modules/ and nixlib/pkgs/.
# Nothing is built: a "derivation" is an attribute set with type = "derivation" and an outPath
# whose hash covers what would go into the real one (name, build script, environment), so two
# different calls give two different paths and a test can tell them apart.
#   pkgs = import tests/nix/fake-nixpkgs/pkgs.nix { lib = import <nixpkgs lib>; };
{ lib }:
let
  inherit (builtins) hashString substring toJSON;

  # /nix/store/<32 hex digits of sha256(content)>-<name>; tests may recompute it.
  storePath = name: content: "/nix/store/${substring 0 32 (hashString "sha256" content)}-${name}";
  drv = name: content: extra: { type = "derivation"; inherit name; outPath = storePath name content; meta = { }; } // extra;
  pkg = pname: version: extra: drv "${pname}-${version}" "pkg:${pname}-${version}" ({ inherit pname version; } // extra);

  self = {
    inherit lib storePath;
    # eval-config.nix lives at path + "/nixos/lib/eval-config.nix", as in nixpkgs.
    path = ./.;
    stdenv.hostPlatform = { system = "x86_64-linux"; linux-kernel.target = "bzImage"; };
    runtimeShell = "${storePath "bash-5.2p37" "pkg:bash"}/bin/bash";

    # As nixpkgs' runCommand (stdenv.mkDerivation): every env attribute is an attribute of the
    # result, passthru ones too, but passthru and meta do not change the output path.  The build
    # script is `buildCommand`; `env` keeps what the caller passed.
    runCommand = name: env: script:
      let drvArgs = removeAttrs env [ "passthru" "meta" ]; in
      drv name (toJSON { inherit name script; env = drvArgs; })
        (drvArgs // (env.passthru or { }) // { inherit env; meta = env.meta or { }; buildCommand = script; });
    writeText = name: text: drv name text { inherit text; };
    closureInfo = { rootPaths }: drv "closure-info" (toJSON rootPaths) { inherit rootPaths; };
    # Calls the file for real: its arguments and build script are evaluated.
    callPackage = path: overrides:
      let f = import path;
      in f (builtins.intersectAttrs (builtins.functionArgs f) self // overrides);

    qemu_kvm = pkg "qemu" "9.1.2" { meta.mainProgram = "qemu-kvm"; };
    firecracker = pkg "firecracker" "1.10.1" { meta.mainProgram = "firecracker"; };
    cloud-hypervisor = pkg "cloud-hypervisor" "42.0" { meta.mainProgram = "cloud-hypervisor"; };
    coreutils = pkg "coreutils" "9.5" { };
    gzip = pkg "gzip" "1.13" { };
    xz = pkg "xz" "5.6.3" { };
    zstd = pkg "zstd" "1.5.6" { };
    bzip2 = pkg "bzip2" "1.0.8" { };
    lz4 = pkg "lz4" "1.10.0" { };
    lzop = pkg "lzop" "1.04" { };
    e2fsprogs = pkg "e2fsprogs" "1.47.1" { };
    util-linux = pkg "util-linux" "2.39.4" { };
    systemd = pkg "systemd" "256.8" { };
    kmod = pkg "kmod" "31" { };
    # The host tools of nixlib/tools.nix, under their nixpkgs attribute names.
    nix = pkg "nix" "2.24.10" { };
    vde2 = pkg "vde2" "2.3.3" { };
    vhost-device-vsock = pkg "vhost-device-vsock" "0.2.0" { };
    virtiofsd = pkg "virtiofsd" "1.13.0" { };
    tesseract4 = pkg "tesseract" "4.1.3" { };
    debootstrap = pkg "debootstrap" "1.0.138" { };
    # For nixlib/pkgs/agent.nix: the environment's name lists the packages asked for.
    python3 = pkg "python3" "3.12.8" {
      withPackages = f:
        let name = "python3-with-${lib.concatStringsSep "-" (map (p: p.pname) (f self.python3Packages))}";
        in drv name "pkg:${name}" { interpreter = "${storePath name "pkg:${name}"}/bin/python3"; };
    };
    # Only names nixpkgs' python3Packages really has (docs/nixos-fidelity.md): a misspelt
    # `ps.<name>` in agent.nix or in pyproject.toml's dependencies fails evaluation.
    python3Packages = {
      setuptools = pkg "setuptools" "75.1.0" { };
      construct = pkg "construct" "2.10.70" { };
      cffi = pkg "cffi" "1.17.1" { };
      pyroute2 = pkg "pyroute2" "0.7.12" { };
      mypy = pkg "mypy" "1.11.2" { };
      pyflakes = pkg "pyflakes" "3.2.0" { };
      # As nixpkgs' (python-modules' build helper): here it returns what it was given.
      buildPythonApplication = args: args;
    };
  };
in
self
