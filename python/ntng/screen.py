"""Screens: screenshot file names (the NixOS driver's rules), PPM → PNG, and OCR with tesseract.

Pure stdlib: QEMU's screendump writes PNG itself since 7.1; older ones write PPM, which
`ppm_to_png` converts with zlib.  OCR reads PPM (raw pixels: no decoder needed) and feeds
tesseract images normalised to dark text on a light background, which its LSTM model reads
best (a VGA console is light grey on black).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

from .errors import SetupError
from .qmp import QMPError

Dump = Callable[[Path, str], None]  # dump(path, format): the screen into a file, "png" or "ppm"

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OCR_PACKAGE = "tesseract-ocr"


class OcrUnavailable(SetupError):
    """tesseract is not on PATH."""


def screenshot_path(filename: str, out_dir: Path) -> Path:
    """As the NixOS driver: no extension gets .png; a bare name goes into out_dir."""
    if "." not in filename:
        filename += ".png"
    if "/" not in filename:
        return out_dir / filename
    return Path(filename)


# -- images ---------------------------------------------------------------------------------------

def parse_ppm(data: bytes) -> tuple[int, int, bytes]:
    """(width, height, RGB bytes) of a binary PPM (P6, maxval 255) as QEMU writes it."""
    fields: list[bytes] = []
    i = 0
    while len(fields) < 4:
        while i < len(data) and data[i:i + 1].isspace():
            i += 1
        if data[i:i + 1] == b"#":  # a comment runs to the end of its line
            i = data.index(b"\n", i)
            continue
        j = i
        while j < len(data) and not data[j:j + 1].isspace():
            j += 1
        if j == i:
            raise ValueError("PPM header truncated")
        fields.append(data[i:j])
        i = j
    magic, w, h, maxval = fields
    if magic != b"P6" or int(maxval) != 255:
        raise ValueError(f"not an 8-bit binary PPM (magic {magic!r}, maxval {maxval!r})")
    width, height = int(w), int(h)
    pixels = data[i + 1:i + 1 + 3 * width * height]  # one whitespace byte ends the header
    if len(pixels) != 3 * width * height:
        raise ValueError(f"PPM of {width}x{height} holds {len(pixels)} bytes of pixels")
    return width, height, pixels


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(width: int, height: int, pixels: bytes, channels: int = 3) -> bytes:
    """An 8-bit RGB (channels=3) or grey (1) PNG of raw rows, unfiltered."""
    stride = width * channels
    raw = b"".join(b"\0" + pixels[y * stride:(y + 1) * stride] for y in range(height))
    colour_type = {1: 0, 3: 2}[channels]
    return (PNG_SIGNATURE
            + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b""))


def ppm_to_png(data: bytes) -> bytes:
    return png(*parse_ppm(data))


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's header; ValueError if it is not one."""
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


_NEGATE = bytes(255 - v for v in range(256))


def _scaled(grey: bytes, width: int, height: int, scale: int) -> bytes:
    out = bytearray()
    for y in range(height):
        row = grey[y * width:(y + 1) * width]
        wide = bytearray(width * scale)
        for k in range(scale):
            wide[k::scale] = row  # nearest neighbour: each pixel `scale` times, at C speed
        out += bytes(wide) * scale
    return bytes(out)


def ocr_images(ppm: bytes) -> list[tuple[str, bytes]]:
    """Images for OCR, best first, as PGM/PPM files: the screen as grey with dark text on light;
    the same twice the size (small fonts); the screen as it is."""
    width, height, rgb = parse_ppm(ppm)
    # Brightest channel: coloured text (red FAILED, green OK) stays as bright as grey text.
    grey = bytes(map(max, rgb[0::3], rgb[1::3], rgb[2::3]))
    if sum(grey) < 128 * len(grey):  # mostly dark: light text on a dark screen
        grey = grey.translate(_NEGATE)

    def pgm(scale: int) -> bytes:
        pixels = grey if scale == 1 else _scaled(grey, width, height, scale)
        return f"P5\n{width * scale} {height * scale}\n255\n".encode() + pixels

    # Measured on a VGA text console: 1x reads best; 2x nearest-neighbour confuses some
    # capitals (Z/C) but catches what 1x splits.
    return [("normalised", pgm(1)), ("scaled", pgm(2)), ("screen", ppm)]


# -- OCR ------------------------------------------------------------------------------------------

def tesseract_path() -> str:
    exe = shutil.which("tesseract")
    if exe is None:
        raise OcrUnavailable(
            f"OCR needs tesseract, which is not on PATH: apt-get install {OCR_PACKAGE} "
            "(Nix: pkgs.tesseract4; the NixOS driver's enableOCR)")
    return exe


def tesseract(image: Path, exe: str | None = None, timeout: float = 120) -> str:
    # LSTM engine (Debian's eng model has no legacy one); psm 11: sparse text, any layout.
    r = subprocess.run([exe or tesseract_path(), str(image), "-", "--oem", "1", "--psm", "11",
                        "-c", "debug_file=/dev/null"], capture_output=True, timeout=timeout, check=False)
    if r.returncode != 0:
        raise SetupError(f"tesseract failed (exit {r.returncode}): {r.stderr.decode(errors='replace')[-500:]}")
    return r.stdout.decode(errors="replace")


def save_png(dump: Dump, path: Path) -> None:
    """The screen as a PNG at `path`: QEMU writes it (7.1+), else PPM converted here."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        dump(path, "png")
        return
    except QMPError as e:
        if "format" not in str(e):  # only "this QEMU has no format argument / no png" falls back
            raise
    with tempfile.TemporaryDirectory(prefix="ntng-shot-") as tmp:
        ppm = Path(tmp) / "screen.ppm"
        dump(ppm, "ppm")
        write_atomically(path, ppm_to_png(ppm.read_bytes()))


def screen_text_variants(dump: Dump, first_only: bool = False) -> list[str]:
    """OCR of a fresh screendump.  One text per image of ocr_images (only the best one with
    first_only)."""
    exe = tesseract_path()  # before the screendump: a missing tool is the message, not a file
    with tempfile.TemporaryDirectory(prefix="ntng-ocr-") as tmp:
        shot = Path(tmp) / "screen.ppm"
        dump(shot, "ppm")
        images = ocr_images(shot.read_bytes())
        texts = []
        for name, data in images[:1] if first_only else images:
            path = Path(tmp) / f"{name}.pnm"
            path.write_bytes(data)
            texts.append(tesseract(path, exe))
        return texts


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
