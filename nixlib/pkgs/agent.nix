# The in-guest backdoor agent: ntng_agent.py with the shared protocol module next to it (the
# agent falls back to `import protocol` from its own directory, as in the Debian image).
# Only these two files are sources, so the package does not change when the rest of the repo does.
{ runCommand, python3, runtimeShell }:
let
  python = python3.withPackages (ps: [ ps.construct ]);
in
runCommand "ntng-backdoor" { meta.mainProgram = "ntng-backdoor"; } ''
  install -Dm444 ${../../backdoor/ntng_agent.py} $out/lib/ntng-backdoor/ntng_agent.py
  install -Dm444 ${../../python/ntng/protocol.py} $out/lib/ntng-backdoor/protocol.py
  # Compiled now (hash-checked: the store resets mtimes) as the store is read-only at run time.
  ${python.interpreter} -m compileall -q --invalidation-mode checked-hash $out/lib/ntng-backdoor
  mkdir -p $out/bin
  cat > $out/bin/ntng-backdoor <<EOF
  #!${runtimeShell}
  exec ${python.interpreter} -u $out/lib/ntng-backdoor/ntng_agent.py "\$@"
  EOF
  chmod +x $out/bin/ntng-backdoor
''
