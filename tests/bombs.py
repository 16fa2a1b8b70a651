"""Image bombs in formats a decoder might accept: a few bytes or kilobytes that claim, or expand to,
far more pixels than download.max_pixels. Some PIL cannot identify at all (OpenCV decodes them)."""
from __future__ import annotations

import struct


def hdr_rle(width: int, height: int) -> bytes:
    """A Radiance .hdr, run-length encoded: about 200 bytes a scanline, 12 bytes a pixel decoded (float32 RGB)."""
    assert 8 <= width < 32768
    head = f"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y {height} +X {width}\n".encode()
    line = bytearray([2, 2, width >> 8, width & 0xFF])
    for value in (128, 64, 32, 129):   # one run-length channel each: r, g, b, shared exponent
        left = width
        while left:
            n = min(127, left)
            line += bytes([128 + n, value])
            left -= n
    return head + bytes(line) * height


def pam_header(side: int) -> bytes:
    """A PAM (P7) header claiming side x side RGB, and a few pixels: OpenCV allocates from the header."""
    return f"P7\nWIDTH {side}\nHEIGHT {side}\nDEPTH 3\nMAXVAL 255\nTUPLTYPE RGB\nENDHDR\n".encode() + b"\0" * 64


def pfm_color(side: int) -> bytes:
    """A colour PFM header (PIL reads only the grey kind) claiming side x side float pixels."""
    return f"PF\n{side} {side}\n-1.0\n".encode() + b"\0" * 64


def gif_screen(side: int) -> bytes:
    """A GIF whose logical screen claims side x side pixels around a 1x1 image."""
    screen = b"GIF89a" + struct.pack("<HHBBB", side, side, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    image = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return screen + image + b"\x3b"
