"""A guest that floods the host: the runner's peak RSS stays under a stated bound.  Each
scenario runs in a subprocess (flood.py) so its VmHWM is its own; run with -s to see the
numbers.  NTNG_HOSTILE_FLOOD_MIB sets the flood size (default 1024 MiB)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ntng import client as C

pytestmark = [pytest.mark.timeout(120)]

HERE = Path(__file__).resolve().parent
FLOOD_MIB = int(os.environ.get("NTNG_HOSTILE_FLOOD_MIB", "2048"))
# Peak RSS allowed above the process's RSS after the handshake: the 32 MiB max_output given
# to execute (x2: bytearray growth), a 1 MiB receive window, the decoder's buffer and reads.
SLACK_MIB = 80


def flood(scenario: str) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parents[1] / "python"), str(HERE)]))
    out = subprocess.run([sys.executable, str(HERE / "flood.py"), scenario, str(FLOOD_MIB)],
                         capture_output=True, text=True, timeout=110, env=env, check=False)
    assert out.returncode == 0, out.stderr
    r: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    growth = float(r["peak_mib"]) - float(r["base_mib"])  # type: ignore[arg-type]
    print(f"measured: {scenario}: {FLOOD_MIB} MiB flood: RSS {r['base_mib']:.0f} → peak {r['peak_mib']:.0f} MiB "
          f"(+{growth:.0f}) in {r['seconds']}s; {r.get('error')}: {r.get('message', '')}")
    r["growth_mib"] = growth
    return r


def test_stdout_within_credit_stops_at_max_output() -> None:
    r = flood("stdout_within_credit")
    assert r["error"] == "OutputLimitExceeded", r
    msg = str(r["message"])
    assert "33554432" in msg and "on_stdout=" in msg and "max_output" in msg, msg
    assert r["signals"] == [9], "the command must be killed in the guest (SIGNAL 9)"
    assert float(r["growth_mib"]) < SLACK_MIB  # type: ignore[arg-type]


def test_default_max_output_bounds_memory() -> None:
    r = flood("default_limit")
    if FLOOD_MIB * 1024 * 1024 > C.DEFAULT_MAX_OUTPUT:
        assert r["error"] == "OutputLimitExceeded", r
    bound = C.DEFAULT_MAX_OUTPUT / 2**20 * 2 + SLACK_MIB
    assert float(r["growth_mib"]) < bound  # type: ignore[arg-type]


@pytest.mark.parametrize("scenario", ["stdout_ignoring_credit", "huge_window"])
def test_stdout_ignoring_credit_is_refused(scenario: str) -> None:
    """With an honest window or one of 4294967295 in HELLO_ACK: the host's own window holds."""
    r = flood(scenario)
    assert r["error"] == "BackdoorError" and "flow control" in str(r["message"]), r
    assert float(r["growth_mib"]) < SLACK_MIB  # type: ignore[arg-type]


def test_control_frame_flood_closes_the_link() -> None:
    r = flood("control_flood")
    assert r["error"] == "GuestMisbehaved" and "control frames" in str(r["message"]), r
    assert r["closed"] is True
    assert float(r["growth_mib"]) < SLACK_MIB  # type: ignore[arg-type]


def test_frames_for_unknown_requests_and_pongs_do_not_accumulate() -> None:
    r = flood("unknown_ids")
    assert r["error"] is None and r["closed"] is False and r["pongs_waiting"] == 0, r
    assert float(r["growth_mib"]) < SLACK_MIB  # type: ignore[arg-type]
