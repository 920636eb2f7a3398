"""`ntng` / `nixos-test-ng` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import image, protocol
from .errors import EXIT_OK, EXIT_USAGE, NtngError, UsageError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ntng", description="VM integration tests, NixOS-driver compatible")
    ap.add_argument("--version", action="version", version=f"%(prog)s {protocol.PACKAGE_VERSION}")
    sub = ap.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run one test script")
    r.add_argument("script", type=Path)
    r.add_argument("--accel", choices=["auto", "kvm", "tcg"],
                   default=os.environ.get("NTNG_ACCEL", "auto"),
                   help="auto probes KVM with a real boot and falls back to TCG (default: auto)")
    r.add_argument("--image", help="guest image directory (default: the cached Debian image)")
    r.add_argument("--spec-dir", type=Path,
                   help="specs nixlib evaluated at build time (a mkTest driver's share/ntng) "
                        "instead of the script's #: lines and the Debian image")
    r.add_argument("-o", "--output-directory", "--output_directory", dest="out", type=Path,
                   help="each run makes a folder here (OUT/<time>-<test>, OUT/latest) for reports, logs, "
                        "screenshots and copy_from_machine files (default: ./ntng-out)")
    r.add_argument("-g", "--global-timeout", type=float, help="seconds for the whole test")
    r.add_argument("--boot-timeout", type=float, help="seconds to wait for a guest's hello")
    r.add_argument("-K", "--keep-machine-state", "--keep-vm-state", action="store_true",
                   help="keep the machines' disks after the run; the next -K run boots from them")
    r.add_argument("--junit-xml", type=Path, help="also write the JUnit report here (it is always in the run folder, OUT/<time>-<test>/junit.xml)")
    r.add_argument("--show-trace", action="store_true", help="full Nix traces on evaluation errors")
    r.add_argument("--serial-stdout", action="store_true", help="echo guest consoles")
    r.add_argument("-i", "-I", "--interactive", action="store_true", help="a REPL with the machines bound")
    r.add_argument("--network", choices=["auto", "tap", "vde"], default="auto",
                   help="tap: bridges + TAP devices in a private namespace (root); vde: rootless switches")

    t = sub.add_parser("test", help="run a suite: test scripts in parallel, each in its own `ntng run`",
                       description="PATHs are test scripts or directories; in a directory a test is a *.py file "
                                   "with a `#:` header line (not conftest.py, test_*.py, *_test.py).")
    t.add_argument("paths", type=Path, nargs="+", metavar="PATH")
    t.add_argument("-j", "--jobs", type=int, help="tests at once at most (default: the usable cores)")
    t.add_argument("--memory", type=int, metavar="MIB",
                   help="memory budget for the tests' VMs (default: MemAvailable less 10%% of RAM)")
    t.add_argument("-x", "--fail-fast", action="store_true", help="stop at the first test that does not pass")
    t.add_argument("--shard", metavar="I/N", help="run shard I of N (1-based) of the sorted tests (CI matrices)")
    t.add_argument("--resume", action="store_true",
                   help="go on with an interrupted suite in the same -o directory: only tests without a result run")
    t.add_argument("-o", "--output-directory", dest="out", type=Path, default=Path("ntng-out/suite"),
                   help="suite reports (junit.xml, suite.jsonl, suite-state.json) and tests/<test>/ "
                        "(default: ./ntng-out/suite)")
    t.add_argument("--accel", choices=["auto", "kvm", "tcg"], help="passed to every ntng run")
    t.add_argument("--network", choices=["auto", "tap", "vde"], help="passed to every ntng run")
    t.add_argument("--image", help="passed to every ntng run")
    t.add_argument("-g", "--global-timeout", type=float, help="seconds per test (passed to every ntng run)")
    t.add_argument("--boot-timeout", type=float, help="passed to every ntng run")

    c = sub.add_parser("check", help="the quick check: parse, validate nodes, lint (no boot)")
    c.add_argument("scripts", type=Path, nargs="+", metavar="SCRIPT",
                   help="test scripts, or directories searched as `ntng test` does")
    c.add_argument("--spec-dir", type=Path, help="a mkTest driver's evaluated specs (one script)")
    c.add_argument("--no-type-check", action="store_true", help="skip the type check")

    im = sub.add_parser("image", help="guest image")
    im_sub = im.add_subparsers(dest="image_cmd", required=True)
    b = im_sub.add_parser("build", help="debootstrap and build the Debian guest image (cached)")
    b.add_argument("--force", action="store_true")
    im_sub.add_parser("path", help="print the image directory")

    d = sub.add_parser("doctor", help="what works on this machine, and why (and what a script needs)")
    d.add_argument("script", type=Path, nargs="?", metavar="SCRIPT",
                   help="also check what this test script's nodes need; exit 3 when a part is missing")
    d.add_argument("--spec-dir", type=Path, help="a mkTest driver's evaluated specs for SCRIPT")

    args = ap.parse_args(argv)
    try:
        if args.cmd == "run":
            from .runner import RunOptions, run  # the runtime: not loaded for check or doctor

            return run(RunOptions(
                script=args.script, accel=args.accel, image_dir=args.image, out_dir=args.out,
                global_timeout=args.global_timeout, boot_timeout=args.boot_timeout,
                keep_state=args.keep_machine_state, show_trace=args.show_trace,
                serial_stdout=args.serial_stdout, interactive=args.interactive,
                spec_dir=args.spec_dir,
                network=args.network,
                junit_xml=args.junit_xml,
            ))
        if args.cmd == "test":
            return _suite(args)
        if args.cmd == "check":
            return _check(args)
        if args.cmd == "image":
            if args.image_cmd == "build":
                image.build(force=args.force)
            else:
                print(image.find_image().directory)
            return EXIT_OK
        if args.cmd == "doctor":
            if args.spec_dir is not None and args.script is None:
                raise UsageError("--spec-dir belongs to a script: name it")
            return doctor(args.script, args.spec_dir)
    except NtngError as e:
        print(f"ntng: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE


def _check(args: argparse.Namespace) -> int:
    """The quick check of each script; all are checked, the worst exit code is returned."""
    from . import check
    from .suite.discover import discover

    if args.spec_dir is not None and len(args.scripts) != 1:
        raise UsageError("--spec-dir belongs to one script: name exactly one")
    scripts = args.scripts if len(args.scripts) == 1 and not args.scripts[0].is_dir() \
        else [t.path for t in discover(args.scripts)]
    worst = EXIT_OK
    for script in scripts:
        try:
            for f in check.check(script, args.spec_dir, type_check=not args.no_type_check):
                print(f.render(script), file=sys.stderr)
            print(f"ntng check: {script}: ok", file=sys.stderr)
        except check.CheckFailed as e:  # one `path:line: kind: ` line per finding, nothing else
            for f in e.findings:
                print(f.render(script), file=sys.stderr)
            worst = max(worst, e.exit_code)
        except NtngError as e:
            if len(scripts) == 1:
                raise
            print(f"ntng: error: {e}", file=sys.stderr)
            worst = max(worst, e.exit_code)
    if len(scripts) > 1:
        print(f"ntng check: {len(scripts)} scripts, " + ("all ok" if worst == EXIT_OK else "some failed"),
              file=sys.stderr)
    return worst


def _suite(args: argparse.Namespace) -> int:
    from .suite.run import SuiteOptions, run_suite

    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"-j {args.jobs}: at least one test must run at a time")
    if args.memory is not None and args.memory < 1:
        raise UsageError(f"--memory {args.memory}: a budget in MiB, at least 1")
    run_args = []
    for flag, value in (("--accel", args.accel), ("--network", args.network), ("--image", args.image),
                        ("--global-timeout", args.global_timeout), ("--boot-timeout", args.boot_timeout)):
        if value is not None:
            run_args += [flag, str(value)]
    return run_suite(SuiteOptions(paths=args.paths, out_dir=args.out, jobs=args.jobs, memory_mib=args.memory,
                                  fail_fast=args.fail_fast, shard=args.shard, resume=args.resume,
                                  run_args=run_args))


def doctor(script: Path | None = None, spec_dir: Path | None = None) -> int:
    from . import doctor as parts

    return parts.diagnose(netem_on_host, sys.stdout, script, spec_dir)


def netem_on_host() -> bool:
    from .netem import host_netem_supported
    from .netns import NetNamespace

    ns = NetNamespace()  # probe where it cannot disturb the host's devices
    try:
        with ns.iproute() as ipr:
            return host_netem_supported(ipr)
    finally:
        ns.close()


if __name__ == "__main__":
    sys.exit(main())
