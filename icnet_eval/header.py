"""Image sizes read from file headers, so that a small file cannot make us decode gigabytes before a size check.

A 210 KB PNG can hold a 6000 x 12000 image (5 GB of class probabilities once evaluated): its size is
known from a few header bytes. PNG, JPEG, BMP, GIF, WebP, TIFF and the PNM family are read here;
so are Sun raster and Radiance HDR; for other formats `image_size` returns None and OpenCV's own pixel limit is what remains.
"""

from __future__ import annotations

import struct

Size = tuple[int, int]  # height, width


def _png(data: bytes) -> Size | None:
    if len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return height, width
    return None


# SOF markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but are not frames.
_JPEG_FRAMES = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg(data: bytes) -> Size | None:
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            position += 2
            continue
        (length,) = struct.unpack(">H", data[position + 2:position + 4])
        if marker in _JPEG_FRAMES:
            if position + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[position + 5:position + 9])
            return height, width
        if marker == 0xDA or length < 2:  # the scan starts before any frame header: not a valid JPEG
            return None
        position += 2 + length
    return None


def _bmp(data: bytes) -> Size | None:
    if len(data) < 26:
        return None
    (header,) = struct.unpack("<I", data[14:18])
    if header == 12:  # BITMAPCOREHEADER
        width, height = struct.unpack("<HH", data[18:22])
        return height, width
    width, height = struct.unpack("<ii", data[18:26])
    return abs(height), abs(width)  # a negative height is a top-down bitmap


def _gif(data: bytes) -> Size | None:
    if len(data) < 10:
        return None
    width, height = struct.unpack("<HH", data[6:10])
    return height, width


def _webp(data: bytes) -> Size | None:
    kind = data[12:16]
    if kind == b"VP8 " and len(data) >= 30:
        width, height = struct.unpack("<HH", data[26:30])
        return height & 0x3FFF, width & 0x3FFF
    if kind == b"VP8L" and len(data) >= 25:
        (bits,) = struct.unpack("<I", data[21:25])
        return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
    if kind == b"VP8X" and len(data) >= 30:
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return height, width
    return None


def _tiff(data: bytes) -> Size | None:
    order = "<" if data[:2] == b"II" else ">"
    if len(data) < 8 or struct.unpack(order + "H", data[2:4])[0] != 42:
        return None  # BigTIFF (43) and others: left to OpenCV
    (offset,) = struct.unpack(order + "I", data[4:8])
    if offset + 2 > len(data):
        return None
    (count,) = struct.unpack(order + "H", data[offset:offset + 2])
    found: dict[int, int] = {}
    for index in range(count):
        entry = offset + 2 + 12 * index
        if entry + 12 > len(data):
            break
        tag, kind = struct.unpack(order + "HH", data[entry:entry + 4])
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT or LONG
            value = struct.unpack(order + ("H" if kind == 3 else "I"), data[entry + 8:entry + (10 if kind == 3 else 12)])
            found[tag] = value[0]
    if 256 in found and 257 in found:
        return found[257], found[256]
    return None


def _pnm(data: bytes) -> Size | None:
    if data[:2] == b"P7":  # PAM: WIDTH and HEIGHT lines
        fields: dict[bytes, int] = {}
        for line in data[2:4096].split(b"\n"):
            parts = line.split()
            if len(parts) == 2 and parts[0] in (b"WIDTH", b"HEIGHT") and parts[1].isdigit():
                fields[parts[0]] = int(parts[1])
            if parts[:1] == [b"ENDHDR"]:
                break
        return (fields[b"HEIGHT"], fields[b"WIDTH"]) if len(fields) == 2 else None
    tokens: list[int] = []
    for line in data[2:4096].split(b"\n"):
        for token in line.split(b"#", 1)[0].split():
            if not token.isdigit():
                return None
            tokens.append(int(token))
            if len(tokens) == 2:
                return tokens[1], tokens[0]
    return None


def _sun_raster(data: bytes) -> Size | None:
    if len(data) < 12:
        return None
    width, height = struct.unpack(">II", data[4:12])
    return height, width


def _radiance(data: bytes) -> Size | None:
    """The resolution line after the blank line that ends the header: `-Y height +X width` (or another order)."""
    end = data.find(b"\n\n", 0, 65536)
    if end < 0:
        return None
    parts = data[end + 2:end + 66].split(b"\n", 1)[0].split()
    if len(parts) != 4 or not (parts[1].isdigit() and parts[3].isdigit()):
        return None
    axes = {parts[0][1:2]: int(parts[1]), parts[2][1:2]: int(parts[3])}
    return (axes[b"Y"], axes[b"X"]) if set(axes) == {b"X", b"Y"} else None


def image_size(data) -> Size | None:
    """(height, width) from an image file's bytes (or a uint8 array of them), or None for a format not read here or
    a broken header. The whole file is given: a TIFF may keep its directory at the end."""
    head = data.tobytes() if hasattr(data, "tobytes") else bytes(data)
    try:
        if head.startswith(b"\x89PNG\r\n\x1a\n"):
            return _png(head)
        if head.startswith(b"\xff\xd8"):
            return _jpeg(head)
        if head.startswith(b"BM"):
            return _bmp(head)
        if head[:6] in (b"GIF87a", b"GIF89a"):
            return _gif(head)
        if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
            return _webp(head)
        if head[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff(head)
        if head.startswith(b"\x59\xa6\x6a\x95"):
            return _sun_raster(head)
        if head.startswith((b"#?RADIANCE", b"#?RGBE")):
            return _radiance(head)
        if len(head) > 2 and head[0:1] == b"P" and head[1:2] in b"1234567" and head[2:3].isspace():
            return _pnm(head)
    except struct.error:
        return None
    return None
