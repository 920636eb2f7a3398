"""Run one test script: find the image, choose the accelerator, ask nixlib for the plan, drive.

Everything made here (state dir with sockets and overlays, VMs) is removed on success,
failure, Ctrl-C and SIGTERM; VMMs also die with the runner through PDEATHSIG.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from . import accel as accel_mod
from . import hostclock, paths, testspec
from . import image as image_mod
from . import network as network_mod
from .driver import Driver
from .errors import EXIT_OK, EXIT_SETUP, NtngError, SetupError

DEFAULT_BOOT_TIMEOUT = 60.0  # seconds under KVM; scaled for TCG


@dataclasses.dataclass
class RunOptions:
    script: Path
    accel: str = "auto"
    image_dir: str | None = None
    out_dir: Path | None = None
    global_timeout: float | None = None
    boot_timeout: float | None = None
    keep_state: bool = False
    show_trace: bool = False
    serial_stdout: bool = False
    interactive: bool = False
    spec_dir: Path | None = None  # a mkTest driver's evaluated specs (share/ntng)
    network: str = "auto"  # auto | tap | vde
    junit_xml: Path | None = None  # a copy of OUT/junit.xml (the NixOS driver's --junit-xml)


NO_VM = accel_mod.AccelChoice("none", "the test declares no nodes")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare(opts: RunOptions, state_root: Path) -> tuple[testspec.TestSpec, accel_mod.AccelChoice]:
    # A script that does not compile is the user's error: say so before touching any VM.
    script = testspec.read_script(opts.script)
    testspec.compile_script(opts.script, script)
    if opts.spec_dir is not None:
        asked = testspec.spec_file(opts.spec_dir, opts.accel if opts.accel in ("kvm", "tcg") else "kvm")
        prebuilt = testspec.load_prebuilt(opts.script, asked, state_root)
        if not prebuilt.node_names:
            return prebuilt, NO_VM
        # The probe boots one of the test's own kernels (not needed when TCG is asked for).
        kernel = Path("/") if opts.accel == "tcg" else testspec.first_kernel(opts.spec_dir)
        choice = accel_mod.choose(opts.accel, kernel)
        log(f"ntng: accelerator: {choice.accel} ({choice.reason})")
        path = testspec.spec_file(opts.spec_dir, choice.accel)
        return testspec.load_prebuilt(opts.script, path, state_root), choice
    # Validate the declared nodes first (a bad one fails without an image); a script with
    # none needs neither image nor QEMU nor accelerator.
    declared = testspec.load_declared(opts.script, opts.show_trace)
    if not declared.node_names:
        log("ntng: no nodes declared: nothing to boot")
        return declared, NO_VM
    img = image_mod.find_image(opts.image_dir)
    if shutil.which("qemu-system-x86_64") is None:
        raise SetupError("qemu-system-x86_64 not found: apt-get install qemu-system-x86 (or run ./setup.sh)")
    choice = accel_mod.choose(opts.accel, img.kernel)
    log(f"ntng: accelerator: {choice.accel} ({choice.reason})")
    defaults = {
        "kernel": str(img.kernel),
        "vmlinux": str(img.vmlinux),
        "initrd": str(img.initrd),
        "image": str(img.base),
        "imageFormat": "raw",
        "tscKhz": hostclock.host_tsc_khz(),
        "accel": choice.accel,
        "stateRoot": str(state_root),
        "networkMode": network_mod.choose_mode(opts.network, log),
    }
    spec = testspec.load(opts.script, defaults, opts.show_trace)
    return spec, choice


def kept_state_dir(script: Path) -> Path:
    """Where -K keeps a test's disks between runs (per script path, like the NixOS driver's
    state dir): the next -K run boots from them."""
    import hashlib

    key = hashlib.sha256(str(script.resolve()).encode()).hexdigest()[:12]
    return paths.private_dir(paths.cache_dir() / "state" / f"{script.stem}-{key}")


def kept_machines_found(state_root: Path) -> bool:
    """Whether a -K folder holds a machine's disk: a VM's qcow2 overlay, or a container's
    upper layer with something in it (nixlib's nspawn plan: <node>/layer/upper)."""
    if any(state_root.glob("*/disk.qcow2")):
        return True
    return any(any(upper.iterdir()) for upper in state_root.glob("*/layer/upper") if upper.is_dir())


def fresh_state_dir() -> Path:
    """A run's own state folder (0700: it holds the VMs' sockets and the backdoor keys)."""
    return Path(tempfile.mkdtemp(prefix="ntng-run-"))


def reap_stale_state() -> list[Path]:
    """Remove state dirs of runners that died without cleaning up (kill -9).  Their VMs are
    already gone (PDEATHSIG); what is left are sockets and disk overlays."""
    reaped = []
    for d in Path(tempfile.gettempdir()).glob("ntng-run-*"):
        try:
            pid = int((d / "runner.pid").read_text())
            os.kill(pid, 0)
            continue  # its runner is alive
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            # No pid file yet: a runner may be starting right now; leave young dirs alone.
            # Or its runner ended and removed it since the glob: nothing to reap.
            try:
                if time.time() - d.stat().st_mtime < 600:
                    continue
            except FileNotFoundError:
                continue
        shutil.rmtree(d, ignore_errors=True)
        reaped.append(d)
    return reaped


def run(opts: RunOptions) -> int:
    for d in reap_stale_state():
        log(f"ntng: removed {d} left by a runner that died")
    if opts.keep_state:
        state_root = kept_state_dir(opts.script)
        if (state_root / "runner.pid").exists():
            try:
                os.kill(int((state_root / "runner.pid").read_text()), 0)
                log(f"ntng: ERROR (setup): another run keeps its machines in {state_root}")
                return EXIT_SETUP
            except (ProcessLookupError, ValueError):
                pass
        reused = kept_machines_found(state_root)
        log(f"ntng: machine state in {state_root}" + (" (reused from the last -K run)" if reused else ""))
    else:
        state_root = fresh_state_dir()
    (state_root / "runner.pid").write_text(str(os.getpid()))
    out_dir = opts.out_dir or Path.cwd() / "ntng-out"
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # private if we make it
    previous = signal.signal(signal.SIGTERM, _sigterm)
    driver: Driver | None = None
    t0 = time.monotonic()
    try:
        spec, choice = prepare(opts, state_root)
        boot_timeout = opts.boot_timeout or DEFAULT_BOOT_TIMEOUT * choice.timeout_scale
        driver = Driver(spec, out_dir, boot_timeout, opts.global_timeout, log, keep_state=opts.keep_state)
        driver.exit_on_timeout = True  # the process ends after the global timeout, come what may
        if opts.serial_stdout:
            driver.serial_stdout_on()
        if opts.interactive:
            return _interactive(driver)
        driver.run_tests()
        _reports(driver, time.monotonic() - t0, None, opts.junit_xml)
        log(f"ntng: PASS {spec.name} ({time.monotonic() - t0:.1f}s, {choice.accel})")
        return EXIT_OK
    except NtngError as e:
        kind = {1: "FAIL", 2: "ERROR (test script)", 3: "ERROR (setup)", 4: "TIMEOUT"}.get(e.exit_code, "ERROR")
        if driver is not None:
            _reports(driver, time.monotonic() - t0, e, opts.junit_xml)
        log(f"ntng: {kind}: {e}")
        return e.exit_code
    except KeyboardInterrupt as e:
        if driver is not None:
            _reports(driver, time.monotonic() - t0, e, opts.junit_xml)
        log("ntng: interrupted; cleaning up")
        return 130
    finally:
        if driver is not None:
            driver.release()  # saves the journals and consoles into the run's folder
            log(f"ntng: artifacts (reports, consoles, journals, screenshots, copied files): {driver.out_dir}")
        signal.signal(signal.SIGTERM, previous)
        if opts.keep_state:
            (state_root / "runner.pid").unlink(missing_ok=True)
            log(f"ntng: machine state kept in {state_root}; the next run with -K boots from it")
        else:
            shutil.rmtree(state_root, ignore_errors=True)


def _reports(driver: Driver, duration: float, outcome: BaseException | None, copy_to: Path | None) -> None:
    try:
        junit = driver.write_reports(duration, outcome)
        if copy_to is not None:
            shutil.copyfile(junit, copy_to)
        log(f"ntng: reports: {junit}, {driver.events.path}")
    except OSError as e:
        log(f"ntng: could not write the reports: {e}")


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _interactive(driver: Driver) -> int:
    from . import repl

    symbols = driver.test_symbols()
    banner = ("ntng interactive: machines " + ", ".join(m.name for m in driver.machines)
              + "; e.g. start_all(), machine.succeed('uname -a'). Ctrl-D quits.")
    repl.interact(symbols, banner)
    return EXIT_OK

