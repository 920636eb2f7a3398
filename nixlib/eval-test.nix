# Runner entry point for a test script's header: the header was written to `headerFile` as a
# Nix attribute set with the script's own line numbers, so Nix errors point at the script.
{ headerFile, defaults }:
import ./test.nix { header = import headerFile; defaults = builtins.fromJSON defaults; }
