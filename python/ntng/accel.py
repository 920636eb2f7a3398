"""Which accelerator actually boots a guest here.

/dev/kvm can exist and still hang every guest (nested virtualisation): KVM is only used after
a short real boot probe (nixlib.qemu.probe: the kernel panics without a root fs and QEMU exits).
auto falls back to TCG with a loud warning; an explicit kvm fails with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import nixeval, paths
from .errors import SetupError
from .plan import ProbePlan, validate

PROBE_TIMEOUT = 20.0  # a working KVM finishes the probe in about a second
CACHE_TTL = 3600.0


@dataclasses.dataclass(frozen=True)
class AccelChoice:
    accel: str  # "kvm" or "tcg"
    reason: str

    @property
    def timeout_scale(self) -> float:
        """Boot and command timeouts are multiplied by this (TCG is ~10x slower)."""
        return 1.0 if self.accel == "kvm" else 4.0


def kvm_device_problem() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist (no hardware virtualisation, or the kvm module is not loaded)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user (add yourself to the kvm group)"
    return None


def probe_kvm(kernel: Path, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Boot `kernel` under KVM until it panics; (works, explanation)."""
    problem = kvm_device_problem()
    if problem:
        return False, problem
    from .pdeathsig import preexec  # cffi: not for `ntng check`, which only asks kvm_unusable_reason

    spec = validate(nixeval.call("qemu.probe", {"kernel": str(kernel), "accel": "kvm"}), ProbePlan,
                    "nixlib's qemu.probe")
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(spec["argv"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=preexec(os.getpid()))
    except FileNotFoundError:
        raise SetupError(f"{spec['argv'][0]} not found: apt-get install qemu-system-x86") from None
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        tail = out.decode(errors="replace").strip().splitlines()[-1:] or ["(no console output)"]
        return False, (f"a KVM guest did not finish a {timeout:.0f}s boot probe (last console line: "
                       f"{tail[0][:100]!r}); nested KVM that hangs at boot looks like this")
    text = out.decode(errors="replace")
    if spec["expect"] in text:
        return True, f"KVM boot probe passed in {time.monotonic() - t0:.1f}s"
    return False, "; ".join(probe_failure_reasons(proc.returncode, text))


def choose(requested: str, kernel: Path, use_cache: bool = True) -> AccelChoice:
    if requested not in ("auto", "kvm", "tcg"):
        raise SetupError(f"--accel must be auto, kvm or tcg, not {requested!r}")
    if requested == "tcg":
        return AccelChoice("tcg", "TCG requested")
    works, why = _cached_probe(kernel, use_cache)
    if works:
        return AccelChoice("kvm", why)
    if requested == "kvm":
        raise SetupError(f"--accel kvm: KVM is not usable here: {why}")
    print(f"ntng: WARNING: KVM not usable ({why}); falling back to TCG software emulation, "
          "which is about 10x slower. Timeouts are scaled accordingly.", file=sys.stderr)
    return AccelChoice("tcg", f"KVM not usable: {why}")


def cached_kvm_verdict() -> tuple[bool, str] | None:
    """The last boot probe's (works, why) on this kernel of the host, if it is recent; it
    probed whichever guest kernel ran last, which is as good a witness as any."""
    try:
        data = json.loads((paths.cache_dir() / "kvm-probe.json").read_text())
        fresh = time.time() - data["time"] < CACHE_TTL
        same_host = str(data["key"]).endswith(f":{os.uname().release}")
        return (bool(data["works"]), str(data["why"])) if fresh and same_host else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def kvm_unusable_reason() -> str | None:
    """Why KVM cannot run a guest here, as far as is known without a boot probe: /dev/kvm's
    state, else a recent probe's verdict; None when it may well work."""
    problem = kvm_device_problem()
    if problem is not None:
        return problem
    verdict = cached_kvm_verdict()
    if verdict is not None and not verdict[0]:
        return f"the last boot probe failed: {verdict[1]}"
    return None


def _cached_probe(kernel: Path, use_cache: bool) -> tuple[bool, str]:
    cache = paths.cache_dir() / "kvm-probe.json"
    key = f"{kernel}:{kernel.stat().st_mtime_ns if kernel.exists() else 0}:{os.uname().release}"
    if use_cache and cache.exists():
        try:
            data = json.loads(cache.read_text())
            if data["key"] == key and time.time() - data["time"] < CACHE_TTL:
                return data["works"], data["why"] + " (cached probe)"
        except (ValueError, KeyError):
            pass
    works, why = probe_kvm(kernel)
    cache.write_text(json.dumps({"key": key, "time": time.time(), "works": works, "why": why}))
    return works, why


def probe_failure_reasons(returncode: int, output: str) -> list[str]:
    """One line per reason a KVM probe boot failed, from QEMU's exit and output (not its
    assertion text)."""
    reasons = []
    if returncode < 0:
        sig = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        reasons.append(f"QEMU was killed by {sig}" + (" (it aborted on an internal check)" if sig == "SIGABRT" else ""))
    else:
        reasons.append(f"QEMU exited with {returncode} before the probe kernel ran")
    for msr in dict.fromkeys(re.findall(r"failed to set MSR (0x[0-9a-fA-F]+)", output)):
        name = KNOWN_MSRS.get(int(msr, 16))
        reasons.append(f"the host's KVM refused to set MSR {msr}{f' ({name})' if name else ''}: nested "
                       "virtualisation (this machine is itself a VM) that does not pass it through")
    for pattern, reason in KNOWN_ERRORS:
        if re.search(pattern, output):
            reasons.append(reason)
    if len(reasons) == 1:  # nothing recognised: QEMU's own first error line, without assertion text
        lines = [ln for ln in output.splitlines() if ln.strip() and "Assertion" not in ln]
        if lines:
            reasons.append(f"QEMU said: {lines[-1].strip()[:160]}")
    return reasons


KNOWN_MSRS = {0x10A: "IA32_ARCH_CAPABILITIES", 0x48: "IA32_SPEC_CTRL", 0x3A: "IA32_FEATURE_CONTROL"}
KNOWN_ERRORS = (
    (r"Could not access KVM kernel module|failed to initialize kvm",
     "QEMU could not open KVM (module not loaded, or /dev/kvm not accessible)"),
    (r"Permission denied", "permission denied: this user may not use /dev/kvm (add it to the kvm group)"),
    (r"host doesn't support requested feature|CPU model .* requires", "the host CPU lacks a feature the guest CPU model needs"),
)
