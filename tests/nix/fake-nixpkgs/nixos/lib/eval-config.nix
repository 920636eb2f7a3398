# Stand-in for nixpkgs' nixos/lib/eval-config.nix: the same arguments (no others: a caller that
# passes a misspelt one fails here as it would upstream), lib.evalModules over stand-ins for
# the NixOS options (../modules/stand-ins.nix) and a fake system build (../modules/system.nix)
# instead of nixos/modules/module-list.nix.  As upstream, a module without a file of its own
# (an attribute set or a function) is reported at the file that called eval-config.
{ system ? builtins.currentSystem
, pkgs ? throw "the fake eval-config.nix needs pkgs (there is no nixpkgs to import)"
, baseModules ? [ ../modules/stand-ins.nix ../modules/journald.nix ../modules/system.nix ]
, extraArgs ? { }
, specialArgs ? { }
, modules
, modulesLocation ? (builtins.unsafeGetAttrPos "modules" evalConfigArgs).file or null
, check ? true
, prefix ? [ ]
, lib ? pkgs.lib
, extraModules ? [ ]
}@evalConfigArgs:
let
  # As upstream: the legacy `system` argument becomes nixpkgs.system, `pkgs` is forced.
  pkgsModule = {
    _file = ./eval-config.nix;
    key = ./eval-config.nix;
    config = {
      nixpkgs.system = lib.mkDefault system;
      _module.args.pkgs = lib.mkForce pkgs;
      _module.check = check;
    };
  };
  locatedModules = if modulesLocation == null then modules
    else map (lib.setDefaultModuleLocation modulesLocation) modules;
in
lib.evalModules {
  inherit prefix specialArgs;
  modules = baseModules ++ extraModules ++ [ pkgsModule { _module.args = extraArgs; } ] ++ locatedModules;
}
