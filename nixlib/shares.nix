# Shared directories: host folders seen in the guest through 9p (QEMU's own server) or
# virtiofs (a virtiofsd process per share, over vhost-user).  builtins only.
#
# A node declares  sharedDirs.<tag> = { source; target; type ? "9p"; readOnly ? false;
# securityModel ? (see defaultModel); }  (the tag is the guest's mount source), and shareArtifacts = true
# adds a writable 9p share "shared" at /tmp/shared whose host side is a folder of the run's
# artifact folder (the runner puts that folder in place of the @artifacts@ marker).
let
  inherit (builtins) isAttrs isString isBool attrNames filter elem match toJSON concatStringsSep
    mapAttrs attrValues any concatLists genList length elemAt;

  fail = name: msg: throw "node '${name}': ${msg}";
  check = name: cond: msg: if cond then true else fail name msg;

  artifactsMarker = "@artifacts@";
  artifactsTag = "shared"; # the NixOS driver's writable share: host $SHARED_DIR at /tmp/shared

  shareDefaults = { type = "9p"; readOnly = false; };
  # QEMU runs as root: with 9p's "none" (or "passthrough") guest root makes setuid-root files and
  # device nodes in the host folder.  "mapped-xattr" keeps the guest's modes, owners and special
  # files in xattrs of plain 0600 files instead.  A read-only share gets nothing from the guest.
  # virtiofs has no such model (virtiofsd applies what the guest asks; see the README).
  defaultModel = s: if s.type == "9p" && !s.readOnly then "mapped-xattr" else "none";
  withDefaults = s0: let s = shareDefaults // s0; in { securityModel = defaultModel s; } // s;
  shareKeys = [ "source" "target" "type" "readOnly" "securityModel" ];

  # QEMU option values split on commas and the guest's kernel parameter on spaces and commas.
  plainPath = p: isString p && match "/[^ ,\t\n]*" p != null;

  # One share, checked: every message names the node and the share.
  checkShare = name: backend: caps: tag: s0:
    let
      s = withDefaults s0;
      what = "sharedDirs.${tag}";
      unknown = filter (k: !(elem k shareKeys)) (attrNames s0);
      checks = [
        # mount_tag: QEMU takes at most 31 bytes; the tag is also a QEMU id (a letter first).
        (check name (match "[A-Za-z][A-Za-z0-9_-]{0,30}" tag != null)
          "${what}: the tag must be a letter then letters, digits, - or _ (at most 31 characters)")
        (check name (unknown == [ ]) "${what}: unknown option(s) ${concatStringsSep ", " unknown} (known: ${concatStringsSep ", " shareKeys})")
        (check name (s0 ? source && plainPath s0.source)
          "${what}.source must be an absolute host path without spaces or commas, got ${toJSON (s0.source or null)}")
        (check name (s0 ? target && plainPath s0.target && s0.target != "/")
          "${what}.target must be an absolute guest path (not /) without spaces or commas, got ${toJSON (s0.target or null)}")
        (check name (elem s.type [ "9p" "virtiofs" ]) "${what}.type must be \"9p\" or \"virtiofs\", got ${toJSON s.type}")
        (check name (elem s.type caps.shareTypes)
          "${what}.type: backend ${backend} has no ${toJSON s.type} shares (it has: ${if caps.shareTypes == [ ] then "none" else concatStringsSep ", " caps.shareTypes})")
        (check name (isBool s.readOnly) "${what}.readOnly must be a boolean")
        (check name (elem s.securityModel [ "none" "mapped-xattr" "mapped-file" "passthrough" ])
          "${what}.securityModel must be \"none\", \"mapped-xattr\", \"mapped-file\" or \"passthrough\" (QEMU's 9p security_model), got ${toJSON s.securityModel}")
        (check name (s.type == "9p" || s.securityModel == "none") "${what}.securityModel applies to 9p shares only")
      ];
    in builtins.deepSeq checks (s // { inherit tag; });

  # The node's shares as a list (tags sorted, so plans are stable), the artifacts share last.
  normalise = name: backend: caps: n:
    let
      declared = n.sharedDirs;
      ok = [
        (check name (isAttrs declared) "sharedDirs must be an attribute set { <tag> = { source; target; ... }; }")
        (check name (isBool n.shareArtifacts) "shareArtifacts must be a boolean")
        (check name (!(n.shareArtifacts && isAttrs declared && declared ? ${artifactsTag}))
          "sharedDirs.${artifactsTag}: the tag is taken by shareArtifacts = true")
        (check name (declared == { } && !n.shareArtifacts || caps.shareTypes != [ ])
          "sharedDirs: backend ${backend} lacks the sharedDirs capability (no 9p, no virtiofs); use backend = \"qemu\"")
      ];
      shares = attrValues (mapAttrs (tag: s: checkShare name backend caps tag (if isAttrs s then s else fail name "sharedDirs.${tag} must be an attribute set { source; target; ... }")) declared);
      artifacts = if n.shareArtifacts then [ (withDefaults {
        type = if elem "9p" caps.shareTypes then "9p" else "virtiofs";
        tag = artifactsTag; source = "${artifactsMarker}/${name}-shared"; target = "/tmp/shared";
        create = true; # the runner makes the host folder: it is new each run
      }) ] else [ ];
    in builtins.deepSeq ok (map (s: { create = false; } // s) shares ++ artifacts);

  # Debian guests mount these early (backdoor/debian/ntng-shares); NixOS guests get fileSystems
  # entries from modules/vm.nix instead and ignore the parameter.
  kernelParams = shares: map (s:
    "ntng.share=${s.tag},${s.type},${s.target},${if s.readOnly then "ro" else "rw"}") shares;

  hasVirtiofs = shares: any (s: s.type == "virtiofs") shares;

  socket = stateDir: s: "${stateDir}/virtiofs-${s.tag}.sock";

  # QEMU arguments: 9p is served by QEMU itself; virtiofs by a helper on a vhost-user socket.
  # `dev` names the device for the bus (virtio-9p-pci or virtio-9p-device on microvm).
  qemuArgs = { stateDir, dev, microvm }: shares: concatLists (genList (i:
    let s = elemAt shares i; id = "fs${toString i}"; in
    if s.type == "9p" then
      [ "-fsdev" ("local,id=${id},path=${s.source},security_model=${s.securityModel}"
          + (if s.readOnly then ",readonly=on" else ""))
        "-device" "${dev "9p"},fsdev=${id},mount_tag=${s.tag}" ]
    else
      [ "-chardev" "socket,id=${id},path=${socket stateDir s}"
        "-device" "${if microvm then "vhost-user-fs-device" else "vhost-user-fs-pci"},chardev=${id},tag=${s.tag}" ]
  ) (length shares));

  # One virtiofsd per virtiofs share, listening before QEMU connects.  QEMU 7.2's C virtiofsd
  # has no read-only mode: a readOnly virtiofs share is mounted read-only in the guest.
  helpers = { stateDir, virtiofsd }: shares: map (s: {
    name = "virtiofsd-${s.tag}";
    log = "${stateDir}/virtiofsd-${s.tag}.log";
    argv = [ virtiofsd "--socket-path=${socket stateDir s}" "-o" "source=${s.source}" "-o" "cache=auto" ];
    waitFor = socket stateDir s;
    missing = "virtiofs share '${s.tag}' needs virtiofsd: apt-get install qemu-system-common "
      + "(/usr/lib/qemu/virtiofsd) or the Rust virtiofsd, and point the node's virtiofsd option at it; "
      + "or use type = \"9p\"";
  }) (filter (s: s.type == "virtiofs") shares);
in {
  inherit normalise kernelParams hasVirtiofs qemuArgs helpers socket artifactsMarker artifactsTag;
}
