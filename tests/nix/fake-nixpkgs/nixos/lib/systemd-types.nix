# The types of nixpkgs' nixos/lib/systemd-lib.nix and nixos/lib/systemd-unit-options.nix that
# the stand-ins need (docs/nixos-fidelity.md names the commits they were read at).
#   import ./systemd-types.nix { inherit lib; }
{ lib }:
let
  inherit (lib) types;
  oneOf' = name: values: attrs: !(attrs ? ${name}) || builtins.elem attrs.${name} values;
in
rec {
  unitNameType = types.strMatching "[a-zA-Z0-9@%:_.\\-]+[.](service|socket|device|mount|automount|swap|target|path|timer|scope|slice)";
  # Any value; lists concatenate, other values must agree (mergeEqualOption).
  unitOption = lib.mkOptionType {
    name = "systemd option";
    description = "systemd option";
    merge = loc: defs:
      let defs' = lib.filterOverrides defs; in
      if builtins.isList (builtins.head defs').value
      then lib.concatMap (def:
        if builtins.isList def.value then def.value
        else throw "The definitions for systemd unit options should be either all lists, representing repeatable options, or all non-lists, but for the option ${lib.showOption loc}, they are a mix") defs'
      else lib.mergeEqualOption loc defs';
  };
  # checkService: the value checks the real serviceConfig type makes.
  checkService = attrs:
    oneOf' "Type" [ "exec" "simple" "forking" "oneshot" "dbus" "notify" "idle" ] attrs
    && oneOf' "Restart" [ "no" "on-success" "on-failure" "on-abnormal" "on-abort" "always" ] attrs;
  serviceConfig = types.addCheck (types.attrsOf unitOption) checkService;
}
