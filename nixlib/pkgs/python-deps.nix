# pyproject.toml's runtime dependencies (and the `typecheck` extra) as python3Packages
# attribute names: PEP 508 strings lose their version bounds and markers, names are
# normalised (PEP 503) and mapped where nixpkgs spells them differently.
#   import ./python-deps.nix { project = (builtins.fromTOML (builtins.readFile ../../pyproject.toml)).project; }
{ project, extras ? [ "typecheck" ] }:
let
  inherit (builtins) match head replaceStrings concatLists;
  upper = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  lower = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
  toLower = replaceStrings upper lower;
  # PyPI name → python3Packages attribute, where they differ (normalised PyPI names).
  renames = { };
  pypiName = req:
    let m = match "[[:space:]]*([A-Za-z0-9][A-Za-z0-9._-]*).*" req;
    in if m == null then throw "pyproject.toml: cannot read the requirement ${builtins.toJSON req}"
       else toLower (replaceStrings [ "_" "." ] [ "-" "-" ] (head m));
  attribute = req: let n = pypiName req; in renames.${n} or n;
  requirements = (project.dependencies or [ ])
    ++ concatLists (map (e: project.optional-dependencies.${e} or (throw "pyproject.toml has no extra '${e}'")) extras);
in
{
  pypi = map pypiName requirements;
  attributes = map attribute requirements;
}
