"""A guest with a display (one boot): screenshots, OCR of text really on the screen, the error
without tesseract, and the run's artifact folder."""

from __future__ import annotations

import json
import os
import random
import re
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import make_driver
from ntng import screen
from ntng.driver import Driver
from ntng.machine import Machine

SCRIPT = "#: nodes.machine = { display = true; };\n"


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory, guest_image: object) -> Iterator[Driver]:
    with make_driver(tmp_path_factory.mktemp("display"), SCRIPT) as d:
        # Booted to the end: nothing more is printed on the screen, the console has it all.
        d.machines[0].wait_for_unit("multi-user.target")
        yield d


@pytest.fixture(scope="module")
def vm(driver: Driver) -> Machine:
    return driver.machines[0]


def test_kernel_console_on_the_screen_and_the_serial_line(vm: Machine) -> None:
    consoles = vm.succeed("cat /proc/consoles")
    assert re.search(r"^tty0 ", consoles, re.M) and re.search(r"^ttyS0 .*\(E?C", consoles, re.M), consoles


def _png_rgb(data: bytes) -> bytes:
    """The pixels of an 8-bit RGB PNG (QEMU's screendump writes them with row filters)."""
    width, height = screen.png_size(data)
    assert data[24:26] == b"\x08\x02", "not 8-bit RGB"
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        if data[pos + 4:pos + 8] == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * 3
    assert len(raw) == height * (stride + 1)
    out = bytearray()
    prev = bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - 3] if i >= 3 else 0
            b, c = prev[i], prev[i - 3] if i >= 3 else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
            else:
                assert kind == 0, f"PNG filter {kind}"
        out += line
        prev = line
    return bytes(out)


def test_screenshot_is_a_png_of_the_screen(vm: Machine) -> None:
    # Something on the screen first: a getty may just have cleared it, and a blank screen
    # compresses to under 1 KB (a CI run saw 937 bytes where a size check wanted 1000).
    vm.succeed("echo 'SCREENSHOT TEST' > /dev/tty1")
    vm.screenshot("boot")  # NixOS: .png added, into the run's folder
    data = (vm.out_dir / "boot.png").read_bytes()
    # The size the guest itself shows: a framebuffer's, else VGA text mode (9x16 pixel cells).
    fb = vm.execute("cat /sys/class/graphics/fb0/virtual_size")
    if fb[0] == 0:
        width, height = map(int, fb[1].strip().split(","))
    else:
        rows, cols = map(int, vm.succeed("stty -F /dev/tty1 size").split())
        width, height = cols * 9, rows * 16
    assert screen.png_size(data) == (width, height)
    pixels = _png_rgb(data)
    colours = {pixels[i:i + 3] for i in range(0, len(pixels), 3)}
    assert len(colours) >= 2, f"a uniform screen: {colours}"  # the text is there, not a blank frame


def test_ocr_reads_what_was_written_to_the_screen(vm: Machine) -> None:
    # Digits without letter look-alikes (0/O, 1/l, 5/S, 9/g), apart from the word.
    number = "".join(random.choice("234678") for _ in range(5))
    pattern = rf"KESTREL\s*{number}"
    vm.succeed(r"printf '\033[2J\033[H' > /dev/tty1")  # clear tty1 (the visible console)
    assert not any(re.search(pattern, t) for t in vm.get_screen_text_variants())  # not there yet
    vm.succeed(f"echo 'KESTREL {number}' > /dev/tty1")
    t0 = time.monotonic()
    vm.wait_for_text(pattern, timeout=120)
    print(f"wait_for_text: {time.monotonic() - t0:.1f}s")
    assert re.search(pattern, vm.get_screen_text()), vm.get_screen_text()


def test_without_tesseract_the_error_names_the_package(vm: Machine, monkeypatch: pytest.MonkeyPatch) -> None:
    path = [d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "tesseract").exists()]
    monkeypatch.setenv("PATH", os.pathsep.join(path))
    with pytest.raises(screen.OcrUnavailable, match="apt-get install tesseract-ocr"):
        vm.get_screen_text()
    vm.screenshot("still-works")  # a screenshot needs no OCR


def test_nixos_login_test_steps_on_the_virtual_terminals(vm: Machine) -> None:
    """nixpkgs' nixos/tests/login.nix, its VT part: agetty on tty1, alt-f2 starts one on tty2,
    log in there.  (The VT number from sysfs: the image has no fgconsole.)"""
    t0 = time.monotonic()
    vm.wait_for_unit("getty@tty1.service", timeout=60)
    vm.wait_until_succeeds("pgrep -f 'agetty.*tty1'", timeout=60)
    vm.succeed("useradd -m alice", "(echo foobar; echo foobar) | passwd alice")
    vm.fail("pgrep -f 'agetty.*tty2'")
    vm.send_key("alt-f2")
    vm.wait_until_succeeds("[ $(cat /sys/class/tty/tty0/active) = tty2 ]", timeout=30)
    vm.wait_for_unit("getty@tty2.service", timeout=30)
    vm.wait_until_succeeds("pgrep -f 'agetty.*tty2'", timeout=30)
    vm.wait_until_tty_matches("2", "login: ", timeout=30)
    vm.send_chars("alice\n")
    vm.wait_until_tty_matches("2", "login: alice", timeout=30)
    vm.wait_until_succeeds("pgrep login", timeout=30)
    vm.wait_until_tty_matches("2", "Password: ", timeout=30)
    vm.send_chars("foobar\n")
    vm.wait_until_succeeds("pgrep -u alice bash", timeout=30)
    vm.send_chars("touch done\n")
    vm.wait_for_file("/home/alice/done", timeout=30)
    vm.send_chars("exit\n")
    vm.wait_until_fails("pgrep -u alice bash", timeout=30)
    vm.send_key("alt-f1")  # back to the console the other tests read
    vm.wait_until_succeeds("[ $(cat /sys/class/tty/tty0/active) = tty1 ]", timeout=30)
    print(f"login.nix steps: {time.monotonic() - t0:.1f}s")


def test_the_run_folder_holds_console_journal_screenshots_and_copies(driver: Driver, vm: Machine) -> None:
    vm.succeed("echo kept > /root/artifact.txt")
    vm.copy_from_machine("/root/artifact.txt", "copied")
    run = driver.out_dir
    driver.release()  # end of the run: the journal is fetched, the console saved
    assert (run.parent / "latest").resolve() == run.resolve()
    assert (run / "copied" / "artifact.txt").read_text() == "kept\n"
    assert screen.png_size((run / "boot.png").read_bytes())[0] > 0 and (run / "still-works.png").exists()
    assert "ntng-agent: serving on" in (run / "machine" / "console.log").read_text(errors="replace")
    journal = (run / "machine" / "journal.log").read_text(errors="replace")
    assert "Reached target" in journal and "ntng-agent" in journal
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    shots = [e for e in events if e["action"] == "screenshot"]
    assert [Path(e["path"]).name for e in shots] == ["boot.png", "still-works.png"]
