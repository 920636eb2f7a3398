"""The host's TSC frequency, for guests that can't measure it themselves.

Under TCG a guest's TSC is the host's TSC.  A q35 guest calibrates it against the emulated HPET;
a microvm guest (no HPET, no ACPI PM timer) only has the PIT, and PIT calibration fails when
the host is busy ("tsc: Unable to calibrate against PIT"), after which the boot stalls.  Passing
the host's rate as `tsc_early_khz=` makes that boot deterministic.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

_PATTERNS = (r"Refined TSC clocksource calibration: ([0-9.]+) MHz", r"tsc: Detected ([0-9.]+) MHz")


def _kernel_log() -> str:
    for cmd in (["dmesg"], ["journalctl", "-k", "-b", "-o", "cat", "--no-pager"]):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0 and "tsc" in r.stdout:
            return r.stdout
    return ""


def host_tsc_khz() -> int | None:
    """The host TSC rate in kHz, from the most exact source available, or None."""
    sysfs = Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
    if sysfs.exists():
        return int(sysfs.read_text())
    log = _kernel_log()
    for pattern in _PATTERNS:  # the refined value is the better one when both are there
        found = re.findall(pattern, log)
        if found:
            return round(float(found[-1]) * 1000)
    # Last resort: on virtual machines and constant-TSC CPUs this is close to the TSC rate.
    m = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", Path("/proc/cpuinfo").read_text(), re.M)
    return round(float(m.group(1)) * 1000) if m else None
