"""Small image files that declare, or hide, far more than they carry: the inputs
an attacker sends to make a decoder allocate gigabytes."""

import io
import struct
import zlib

from PIL import Image

GIF_COLOURS = b"\x00\x00\x00\xff\xff\xff"  # a 2-entry colour table
# A black 4x4 frame, LZW-coded as Pillow codes it: code size 8, then the data.
GIF_CODE_SIZE, GIF_DATA = b"\x08", bytes.fromhex("0001081c48b0208080")
GIF_PIXELS = GIF_CODE_SIZE + bytes([len(GIF_DATA)]) + GIF_DATA + b"\x00"


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header declares width x height pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 65536, 9))
            + chunk(b"IEND", b""))


def _gif_header(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + GIF_COLOURS


def _gif_frame(width: int, height: int, left: int = 0, top: int = 0, data: bytes = GIF_PIXELS) -> bytes:
    control = b"\x21\xf9\x04\x00\x00\x00\x00\x00"  # graphic control extension
    return control + b"\x2c" + struct.pack("<HHHHB", left, top, width, height, 0) + data


def gif_hiding_a_frame(screen=(1, 1), frame=(8000, 8000)) -> bytes:
    """A GIF whose logical screen is tiny and whose one frame is huge."""
    return _gif_header(*screen) + _gif_frame(*frame) + b"\x3b"


def gif_of_frames(count: int, size=(4, 4)) -> bytes:
    """An animation of `count` frames (black, and decodable at 4x4)."""
    return _gif_header(*size) + _gif_frame(*size) * count + b"\x3b"


def gif_of_sub_blocks(count: int) -> bytes:
    """A black 4x4 GIF whose data comes in `count` one-byte sub-blocks (padded with zeros)."""
    pieces = [GIF_DATA[i:i + 1] for i in range(len(GIF_DATA))] + [b"\x00"] * max(0, count - len(GIF_DATA))
    data = GIF_CODE_SIZE + b"".join(b"\x01" + piece for piece in pieces) + b"\x00"
    return _gif_header(4, 4) + _gif_frame(4, 4, data=data) + b"\x3b"


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real 8x8 JPEG whose frame header is rewritten to declare width x height."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    frame = data.index(b"\xff\xc0")
    data[frame + 5:frame + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _jpeg_segments(data: bytes) -> list[tuple[int, bytes]]:
    """A JPEG's segments up to EOI as (marker, bytes); a scan's bytes include its entropy-coded data."""
    segments, position = [], 2
    while position < len(data):
        marker = data[position + 1]
        if marker == 0xD9:
            return segments + [(marker, data[position:position + 2])]
        end = position + 2 + int.from_bytes(data[position + 2:position + 4], "big")
        if marker == 0xDA:  # entropy-coded data runs to the next marker that is not a stuffed 0xFF or a restart
            while not (data[end] == 0xFF and data[end + 1] != 0 and not 0xD0 <= data[end + 1] <= 0xD7):
                end += 1
        segments.append((marker, data[position:end]))
        position = end
    return segments


def jpeg_with_repeated_scan(size: int, repeats: int) -> bytes:
    """A flat progressive JPEG of size x size whose first scan is repeated: few bytes a scan,
    and every scan walks the full size's coefficients when decoded."""
    file = io.BytesIO()
    Image.new("RGB", (size, size), (120, 30, 200)).save(file, "JPEG", quality=90, progressive=True)
    data = file.getvalue()
    segments = _jpeg_segments(data)
    first = next(i for i, (marker, _) in enumerate(segments) if marker == 0xDA)
    parts = [segment for _, segment in segments]
    return data[:2] + b"".join(parts[:first + 1] + [parts[first]] * repeats + parts[first + 1:])
