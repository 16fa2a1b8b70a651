"""Sequential tar reading and writing on streams, at a few microseconds a member.

The stdlib's tarfile parses and builds every header field in Python (about 0.1-0.3 ms a
member), which caps a write task at a few thousand samples a second; shards are plain USTAR
files of small regular members, so 512-byte headers are read and written here directly.
Both sides work on sequential streams (an object store's download or upload), and a reader
treats a stream that ends before the end-of-archive blocks as truncated, never as complete.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import IO

BLOCK = 512
END = bytes(2 * BLOCK)   # end-of-archive: two zero blocks


class TruncatedTar(ValueError):
    """The stream ended inside a member or before the end-of-archive blocks."""


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _read(f: IO[bytes], n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) < n:
        raise TruncatedTar(f"tar stream ends inside {what}")
    return data


def _skip(f: IO[bytes], n: int, what: str) -> None:
    if f.seekable():
        f.seek(n, 1)
    else:
        while n:
            n -= len(_read(f, min(n, 1 << 20), what))


def _header_name(head: bytes) -> str:
    name = head[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    prefix = head[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") if head[257:262] == b"ustar" else ""
    return f"{prefix}/{name}" if prefix else name


def _long_name(meta: bytes, kind: bytes) -> str | None:
    """The next member's name from a GNU long-name (L) or pax (x) header."""
    if kind == b"L":
        return meta.split(b"\0", 1)[0].decode("utf-8", "replace")
    for record in meta.decode("utf-8", "replace").splitlines():
        length_and_key, _, value = record.partition("=")
        if length_and_key.split(" ", 1)[-1] == "path":
            return value
    return None


def members(f: IO[bytes], wanted: set[str] | None = None) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular members in stream order; only `wanted` ones when given, and
    then the scan stops as soon as all were found. Other members' data is skipped unread where
    the file can seek."""
    left = None if wanted is None else set(wanted)
    pending_name = None
    while left is None or left:
        head = f.read(BLOCK)
        if not head:
            raise TruncatedTar("tar stream ends without its end-of-archive blocks")
        if len(head) < BLOCK:
            raise TruncatedTar("tar stream ends inside a header")
        if head == bytes(BLOCK):
            return
        size = int(head[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        kind = head[156:157]
        if kind in (b"L", b"x"):
            pending_name = _long_name(_read(f, _padded(size), "a long-name header")[:size], kind) or pending_name
            continue
        name, pending_name = pending_name or _header_name(head), None
        if kind in (b"0", b"\0") and (left is None or name in left):
            yield name, _read(f, _padded(size), name)[:size]
            if left is not None:
                left.discard(name)
        else:
            _skip(f, _padded(size), name)


def header(name: str, size: int) -> bytes:
    """A USTAR header of a regular file: mode 0644, owner 0, time 0, so equal content gives equal bytes."""
    encoded = name.encode("utf-8")
    if len(encoded) > 100:
        raise ValueError(f"member name longer than 100 bytes: {name!r}")
    h = bytearray(BLOCK)
    h[0:len(encoded)] = encoded
    h[100:108] = b"0000644\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[156:157] = b"0"
    h[257:265] = b"ustar\x0000"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


class TarWriter:
    """Members appended to a sequential output stream; `close` writes the end-of-archive blocks."""

    def __init__(self, f: IO[bytes]):
        self.f = f

    def add(self, name: str, data: bytes) -> None:
        self.f.write(header(name, len(data)))
        self.f.write(data)
        self.f.write(bytes(-len(data) % BLOCK))

    def close(self) -> None:
        self.f.write(END)
