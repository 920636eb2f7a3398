"""Screens without a VM: file names as the NixOS driver makes them, PPM → PNG, OCR images, the
missing-tesseract error, and Machine's display checks."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from ntng import screen
from ntng.machine import Machine, RequestedAssertionFailed
from ntng.qmp import QMPError


def ppm(width: int, height: int, pixel: bytes = b"\x10\x20\x30", comment: bool = False) -> bytes:
    head = b"P6\n" + (b"# made by a test\n" if comment else b"") + f"{width} {height}\n255\n".encode()
    return head + pixel * (width * height)


def decode_png(data: bytes) -> tuple[int, int, int, bytes]:
    """(width, height, colour type, raw filtered rows) of a PNG made by screen.png."""
    assert data[:8] == screen.PNG_SIGNATURE
    i, idat, ihdr = 8, b"", b""
    while i < len(data):
        (length,) = struct.unpack(">I", data[i:i + 4])
        kind, body = data[i + 4:i + 8], data[i + 8:i + 8 + length]
        assert struct.unpack(">I", data[i + 8 + length:i + 12 + length])[0] == zlib.crc32(kind + body)
        if kind == b"IHDR":
            ihdr = body
        elif kind == b"IDAT":
            idat += body
        i += 12 + length
    w, h, depth, colour = struct.unpack(">IIBB", ihdr[:10])
    assert depth == 8
    return w, h, colour, zlib.decompress(idat)


@pytest.mark.parametrize(("name", "expected"), [
    ("boot", "OUT/boot.png"),          # no extension: .png added
    ("boot.jpg", "OUT/boot.jpg"),      # an extension is kept as given
    ("sub/x", "sub/x.png"),            # a path is used as it is, not put into out_dir
    ("/abs/shot.png", "/abs/shot.png"),
])
def test_screenshot_names_follow_the_nixos_driver(name: str, expected: str) -> None:
    assert str(screen.screenshot_path(name, Path("OUT"))) == expected


def test_ppm_to_png_keeps_size_and_pixels() -> None:
    data = screen.ppm_to_png(ppm(3, 2, b"\x01\x02\x03", comment=True))
    assert screen.png_size(data) == (3, 2)
    w, h, colour, raw = decode_png(data)
    assert (w, h, colour) == (3, 2, 2)
    assert raw == (b"\0" + b"\x01\x02\x03" * 3) * 2  # filter byte 0, then the row as is


def test_bad_images_are_rejected() -> None:
    with pytest.raises(ValueError, match="not a PNG"):
        screen.png_size(b"GIF89a" + b"\0" * 30)
    with pytest.raises(ValueError, match="8-bit binary PPM"):
        screen.parse_ppm(b"P3\n1 1\n255\n0 0 0\n")
    with pytest.raises(ValueError, match="holds"):
        screen.parse_ppm(ppm(4, 4)[:-5])


def test_ocr_images_are_dark_text_on_light() -> None:
    # A dark screen with one light-grey pixel (VGA text is grey on black).
    width, height = 4, 2
    pixels = bytearray(b"\0\0\0" * width * height)
    pixels[0:3] = b"\xaa\xaa\xaa"
    source = f"P6\n{width} {height}\n255\n".encode() + bytes(pixels)
    images = dict(screen.ocr_images(source))
    assert list(images) == ["normalised", "scaled", "screen"]
    head, body = images["normalised"].split(b"255\n", 1)
    assert head == b"P5\n4 2\n" and body[0] == 0x55 and body[1:] == b"\xff" * 7  # dark on white
    head, body = images["scaled"].split(b"255\n", 1)
    assert head == b"P5\n8 4\n" and body[0] == body[1] == body[8] == body[9] == 0x55 and body[2] == 0xFF
    assert images["screen"] == source


def test_png_is_written_by_qemu_or_converted_from_ppm(tmp_path: Path) -> None:
    calls: list[str] = []

    def new_qemu(path: Path, fmt: str) -> None:
        calls.append(fmt)
        path.write_bytes(screen.ppm_to_png(ppm(2, 2)))

    def old_qemu(path: Path, fmt: str) -> None:
        calls.append(fmt)
        if fmt != "ppm":
            raise QMPError("m: QMP screendump failed: GenericError: Parameter 'format' is unexpected")
        path.write_bytes(ppm(5, 3))

    screen.save_png(new_qemu, tmp_path / "a" / "new.png")
    assert calls == ["png"] and screen.png_size((tmp_path / "a" / "new.png").read_bytes()) == (2, 2)
    calls.clear()
    screen.save_png(old_qemu, tmp_path / "old.png")
    assert calls == ["png", "ppm"] and screen.png_size((tmp_path / "old.png").read_bytes()) == (5, 3)


def test_missing_tesseract_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    dumped: list[Path] = []
    with pytest.raises(screen.OcrUnavailable, match="apt-get install tesseract-ocr"):
        screen.screen_text_variants(lambda p, f: dumped.append(p))
    assert dumped == []  # the tool is checked before the screen is dumped


def machine(tmp_path: Path, display: bool) -> Machine:
    plan = {"files": {"disk": str(tmp_path / "state" / "disk.qcow2")}, "stateDir": str(tmp_path / "state"), "display": display}
    return Machine("web", plan, tmp_path / "out", 10.0, log=lambda _m: None)


@pytest.mark.parametrize("method", ["screenshot", "get_screen_text", "get_screen_text_variants", "wait_for_text"])
def test_without_a_display_the_error_says_how_to_get_one(tmp_path: Path, method: str) -> None:
    m = machine(tmp_path, display=False)
    args = ["x"] if method in ("screenshot", "wait_for_text") else []
    with pytest.raises(RequestedAssertionFailed, match=r"needs a display.*nodes\.web = \{ display = true; \}"):
        getattr(m, method)(*args)


def test_with_a_display_a_missing_tesseract_is_the_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    m = machine(tmp_path, display=True)
    with pytest.raises(screen.OcrUnavailable, match="tesseract-ocr"):
        m.wait_for_text("login", timeout=1)
