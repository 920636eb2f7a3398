# nixlib: pure functions, builtins only (no nixpkgs needed to evaluate).
{
  node = import ./node.nix;
  capabilities = import ./capabilities.nix;
  network = import ./network.nix;
  shares = import ./shares.nix;
  qemu = import ./qemu.nix;
  firecracker = import ./firecracker.nix;
  cloudHypervisor = import ./cloud-hypervisor.nix;
  nspawn = import ./nspawn.nix;
  testSpec = import ./test.nix;
  clone = import ./clone.nix;
}
