# The Debian packages providing nixlib/tools.nix, for ./setup.sh:
#   nix-instantiate --eval --strict --json nixlib/debian-packages.nix -A own   (or -A sid)
# own: from the machine's own suite; sid: the tools Debian packages only there.
let
  tools = builtins.attrValues (import ./tools.nix);
  packages = suite:
    let all = builtins.concatLists (map (t: t.debian) (builtins.filter (t: t.debianSuite == suite) tools));
    in builtins.attrNames (builtins.listToAttrs (map (p: { name = p; value = null; }) all)); # sorted, unique
in
{
  own = packages null;
  sid = packages "sid";
}
