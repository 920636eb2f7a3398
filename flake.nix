{
  description = "nixos-test-ng: VM integration tests for NixOS and Linux services (QEMU, Firecracker, Cloud Hypervisor)";

  # No inputs on purpose: `lib.mkTest` and the packages take `pkgs` from the caller, so a test
  # uses the caller's nixpkgs and nothing here pins another one.
  outputs = { self }:
    let
      nixlib = import ./nixlib;
      systems = [ "x86_64-linux" ];
      forAllSystems = f: builtins.listToAttrs (map (system: { name = system; value = f system; }) systems);

      packagesFor = pkgs: {
        ntng = pkgs.callPackage ./nixlib/pkgs/ntng.nix { };
        backdoor = pkgs.callPackage ./nixlib/pkgs/agent.nix { };
        vmlinux = kernel: pkgs.callPackage ./nixlib/pkgs/vmlinux.nix { inherit kernel; };
        rootfs = toplevel: pkgs.callPackage ./nixlib/pkgs/rootfs.nix { inherit toplevel; };
      };
    in
    {
      # Builtins-only builders (qemu, firecracker, cloudHypervisor, network, testSpec, node,
      # capabilities), plus mkTest and the packages as functions of the caller's pkgs.
      lib = nixlib // {
        mkTest = import ./nixlib/mkTest.nix;
        inherit packagesFor;
      };

      nixosModules = {
        backdoor = import ./modules/backdoor.nix;
        testNode = import ./modules/test-node.nix;
        vm = import ./modules/vm.nix;
        testNetwork = import ./modules/test-network.nix;
        default = self.nixosModules.backdoor;
      };

      overlays.default = final: _prev: {
        nixos-test-ng = (packagesFor final).ntng;
        ntng-backdoor = (packagesFor final).backdoor;
      };

      # Offline: evaluating tests/nix/checks.nix runs nixlib's evaluation tests (it throws,
      # naming every failed case).  The derivation carrying the result uses Nix's built-in
      # buildenv builder: no nixpkgs, no /bin/sh in the sandbox needed.
      checks = forAllSystems (system: {
        nixlib = derivation {
          name = "nixlib-eval-tests";
          inherit system;
          builder = "builtin:buildenv";
          derivations = [ ];
          manifest = builtins.toFile "nixlib-eval-tests.json" (builtins.toJSON (import ./tests/nix/checks.nix));
        };
      });
    };
}
