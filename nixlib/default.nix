# nixlib: pure functions, builtins only (no nixpkgs needed to evaluate).
{
  node = import ./node.nix;
  qemu = import ./qemu.nix;
  testSpec = import ./test.nix;
}
