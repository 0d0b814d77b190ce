"""Small inputs that cost a decoder seconds or hundreds of MB, built in the test run.

Each builder reproduces one input family of issue 13's review (all within the default
request size and pixel limits): repeated JPEG scans, fill bytes, empty segments, private PNG
chunks, amplified EXIF, and a 16-bit interlaced PNG at the pixel limit. Used by
tests/attacks/test_image_cost.py and benchmarks/cost_budget.py.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MiB = 1024 * 1024


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with its correct CRC."""
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def small_jpeg(size: tuple[int, int] = (64, 48), **save: object) -> bytes:
    """A valid red JPEG (the tiny test model answers `red`)."""
    buf = io.BytesIO()
    Image.new("RGB", size, (230, 20, 20)).save(buf, format="JPEG", **save)
    return buf.getvalue()


def small_png(size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (230, 20, 20)).save(buf, format="PNG")
    return buf.getvalue()


# --- JPEG ---------------------------------------------------------------------------------


def _segments(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each marker segment of a Pillow-written JPEG, scans with their data."""
    out, pos = [], 2
    while pos < len(data):
        marker = data[pos + 1]
        if marker == 0xD9:
            out.append((pos, pos + 2))
            break
        (length,) = struct.unpack_from(">H", data, pos + 2)
        end = pos + 2 + length
        if marker == 0xDA:  # entropy-coded data runs to the next real marker
            while True:
                end = data.index(b"\xff", end)
                if data[end + 1] not in (0x00, *range(0xD0, 0xD8)):
                    break
                end += 2
        out.append((pos, end))
        pos = end
    return out


def segment_ends(data: bytes) -> list[int]:
    """Where each segment of a Pillow-written JPEG ends (after SOI)."""
    return [end for _, end in _segments(data)]


def jpeg_repeated_scans(repeats: int, side: int = 4096) -> bytes:
    """A valid progressive `side`² JPEG whose smallest AC scan (and its tables) is repeated."""
    ramp = np.linspace(0, 255, side, dtype=np.uint8)
    img = Image.fromarray(np.stack([np.tile(ramp, (side, 1))] * 3, axis=-1), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", progressive=True, quality=50)
    data = buf.getvalue()
    segs = _segments(data)
    scans = [i for i, (s, _) in enumerate(segs) if data[s + 1] == 0xDA]
    smallest = min(scans[1:], key=lambda i: segs[i][1] - segs[i][0])
    first = smallest
    while first > 0 and data[segs[first - 1][0] + 1] == 0xC4:  # its DHT tables
        first -= 1
    piece = data[segs[first][0]:segs[smallest][1]]
    eoi = segs[-1][0]
    return data[:eoi] + piece * repeats + data[eoi:]


def jpeg_scan_count(data: bytes) -> int:
    """How many scans (SOS markers) a Pillow-written JPEG has."""
    return sum(1 for s, _ in _segments(data) if data[s + 1] == 0xDA)


def jpeg_with_scans(total: int, side: int = 4096) -> bytes:
    """A valid progressive `side`² JPEG with exactly `total` scans (its last AC scan repeated)."""
    base = jpeg_scan_count(jpeg_repeated_scans(0, side))
    return jpeg_repeated_scans(total - base, side)


def jpeg_noise(side: int = 4096, progressive: bool = False, subsampling: int = 2,
               spread: int = 256, quality: int = 75) -> bytes:
    """A `side`² JPEG of noise (values 0..`spread`): entropy data as large as a photo's."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, spread, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=quality,
                                     progressive=progressive, subsampling=subsampling)
    return buf.getvalue()


def jpeg_at_caps(fill: int = 1024, metadata: int = 64, markers: int = 256) -> bytes:
    """A valid JPEG with `fill` fill bytes, `metadata` APP segments and `markers` markers."""
    good = small_jpeg()
    # The walk counts markers after SOI up to the first scan (a baseline scan of every
    # component is the whole image: nothing after it is walked).
    own = [data_start for data_start, _ in _segments(good)].index(
        next(s for s, _ in _segments(good) if good[s + 1] == 0xDA)) + 1
    apps = b"\xff\xe1\x00\x02" * (metadata - 1)
    standalone = b"\xff\xd0" * max(0, markers - own - metadata + 1)  # RSTn outside scans
    return good[:2] + b"\xff" * fill + apps + standalone + good[2:]


def jpeg_fill_bytes(megabytes: float = 9.9) -> bytes:
    """SOI, then `megabytes` of 0xFF fill, then the rest of a valid JPEG."""
    good = small_jpeg()
    return good[:2] + b"\xff" * int(megabytes * MiB) + good[2:]


def jpeg_empty_app_segments(megabytes: float = 9.9) -> bytes:
    """SOI, then `megabytes` of empty APP1 segments (4 bytes each), then a valid JPEG."""
    good = small_jpeg()
    return good[:2] + b"\xff\xe1\x00\x02" * int(megabytes * MiB / 4) + good[2:]


def jpeg_dqt_tables(total: int) -> bytes:
    """A valid JPEG preceded by `total` bytes of DQT segments (65-byte tables, Pillow reads
    each in Python: 9.7 MB cost it about a second)."""
    table = b"\x00" + bytes(range(1, 65))
    segments, left = [], total
    while left > 0:
        count = max(1, min(1000, left // len(table)))
        payload = table * count
        segments.append(b"\xff\xdb" + struct.pack(">H", len(payload) + 2) + payload)
        left -= len(payload)
    good = small_jpeg()
    return good[:2] + b"".join(segments) + good[2:]


def jpeg_photoshop_resources(segments: int, size: int = 65000) -> bytes:
    """A valid JPEG with `segments` APP13 Photoshop segments of empty 12-byte resources."""
    resource = b"8BIM\x04\x04\x00\x00" + struct.pack(">I", 0)
    body = b"Photoshop 3.0\x00" + resource * ((size - 14) // len(resource))
    app13 = b"\xff\xed" + struct.pack(">H", len(body) + 2) + body
    good = small_jpeg()
    return good[:2] + app13 * segments + good[2:]


# --- PNG ----------------------------------------------------------------------------------


def png_private_chunks(megabytes: float = 9.9) -> bytes:
    """A valid PNG with `megabytes` of empty private chunks between IHDR and IDAT."""
    good = small_png()
    empty = png_chunk(b"prVt", b"")
    return good[:33] + empty * int(megabytes * MiB / len(empty)) + good[33:]


def png_at_caps(chunks: int = 4096, ancillary: int = 32, ancillary_bytes: int = 2 * MiB
                ) -> bytes:
    """A valid noisy 1024² PNG split into `chunks` chunks, `ancillary` of them private."""
    rng = np.random.default_rng(1)
    raw = b"".join(b"\x00" + rng.integers(0, 256, 1024 * 3, dtype=np.uint8).tobytes()
                   for _ in range(1024))
    stream = zlib.compress(raw, 1)
    idats = chunks - ancillary - 2  # IHDR and IEND are the other two
    cuts = [len(stream) * i // idats for i in range(idats + 1)]
    parts = [stream[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    each = ancillary_bytes // max(1, ancillary) - 12
    private = png_chunk(b"prVt", bytes(each)) * ancillary
    ihdr = struct.pack(">IIBBBBB", 1024, 1024, 8, 2, 0, 0, 0)
    return (PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + private
            + b"".join(png_chunk(b"IDAT", p) for p in parts) + png_chunk(b"IEND", b""))


def png_zeros(side: int = 4096, depth: int = 8, colour: int = 6, interlaced: bool = False
              ) -> bytes:
    """A valid all-zero `side`² PNG (any depth and colour type): tiny file, full decode."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]
    row = 1 + (side * channels * depth + 7) // 8
    if interlaced:
        return png_rgba16_interlaced(side) if (depth, colour) == (16, 6) else _adam7(
            side, depth, colour)
    raw = bytes(row * side)
    ihdr = struct.pack(">IIBBBBB", side, side, depth, colour, 0, 0, 0)
    return (PNG_SIGNATURE + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(raw, 9)) + png_chunk(b"IEND", b""))


def _adam7(side: int, depth: int, colour: int) -> bytes:
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4),
              (1, 0, 2, 2), (0, 1, 1, 2))
    raw = bytearray()
    for x0, y0, dx, dy in passes:
        cols, rows = (side - x0 + dx - 1) // dx, (side - y0 + dy - 1) // dy
        if cols and rows:
            raw += bytes(rows * (1 + (cols * channels * depth + 7) // 8))
    ihdr = struct.pack(">IIBBBBB", side, side, depth, colour, 0, 0, 1)
    return (PNG_SIGNATURE + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(bytes(raw), 9)) + png_chunk(b"IEND", b""))


def png_rgba16_interlaced(side: int = 4096) -> bytes:
    """A valid 16-bit RGBA Adam7 PNG of `side`² transparent black pixels (about 200 KB)."""
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4),
              (1, 0, 2, 2), (0, 1, 1, 2))
    raw = bytearray()
    for x0, y0, dx, dy in passes:
        cols, rows = (side - x0 + dx - 1) // dx, (side - y0 + dy - 1) // dy
        if cols and rows:
            raw += bytes(rows * (1 + cols * 8))
    ihdr = struct.pack(">IIBBBBB", side, side, 16, 6, 0, 0, 1)
    return (PNG_SIGNATURE + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(bytes(raw), 9)) + png_chunk(b"IEND", b""))


# --- EXIF ---------------------------------------------------------------------------------


def exif_amplified(value_bytes: int = MiB, value_type: int = 5, ifds: int = 4) -> bytes:
    """Little-endian EXIF: orientation 6, and `ifds` IFDs whose big tag all point at the
    same `value_bytes` of RATIONAL (type 5) or SHORT (type 3) values."""
    size = {3: 2, 5: 8}[value_type]
    count = value_bytes // size
    # IFD0: orientation, a big tag, ExifIFD pointer, GPS pointer; next IFD -> IFD1.
    ifd_len = 2 + 4 * 12 + 4
    offsets = [8 + i * ifd_len for i in range(ifds)]
    data_at = 8 + ifds * ifd_len
    out = bytearray(b"II*\x00" + struct.pack("<I", offsets[0]))
    for i in range(ifds):
        entries = [struct.pack("<HHI4s", 0xC350 + i, value_type, count,
                               struct.pack("<I", data_at))]
        if i == 0:
            entries.insert(0, struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0))
            for j, tag in ((1, 0x8769), (2, 0x8825)):
                if j < ifds:
                    entries.append(struct.pack("<HHII", tag, 4, 1, offsets[j]))
        entries = entries[:4]
        while len(entries) < 4:
            entries.append(struct.pack("<HHI4s", 0xC360 + 4 * i + len(entries), value_type, count,
                                       struct.pack("<I", data_at)))
        nxt = offsets[3] if i == 0 and ifds > 3 else 0
        out += struct.pack("<H", 4) + b"".join(entries) + struct.pack("<I", nxt)
    out += bytes(count * size)
    return bytes(out)


def png_with_exif(exif: bytes) -> bytes:
    """A valid PNG carrying `exif` in an eXIf chunk before IDAT."""
    good = small_png((48, 64))
    return good[:33] + png_chunk(b"eXIf", exif) + good[33:]


def jpeg_with_exif(exif: bytes) -> bytes:
    """A valid JPEG carrying `exif` in as many APP1 Exif segments as it takes."""
    good = small_jpeg((48, 64))
    parts = [exif[i:i + 65000] for i in range(0, len(exif), 65000)]
    segs = b"".join(b"\xff\xe1" + struct.pack(">H", len(p) + 8) + b"Exif\x00\x00" + p
                    for p in parts)
    return good[:2] + segs + good[2:]


#: name -> builder: the review's input of each family and later finds (all refused now,
#: see REFUSED), then the costliest inputs each cap still lets through (served).
COSTLY: dict[str, Callable[[], bytes]] = {
    "jpeg-progressive-1600-repeated-scans": lambda: jpeg_repeated_scans(1600),
    "jpeg-soi-plus-9.9MB-fill": jpeg_fill_bytes,
    "jpeg-9.9MB-empty-app-segments": jpeg_empty_app_segments,
    "png-9.9MB-private-chunks": png_private_chunks,
    "png-exif-orientation6-1MB-rationals-4-ifds": lambda: png_with_exif(exif_amplified()),
    "png-exif-orientation6-1MB-shorts-4-ifds": lambda: png_with_exif(
        exif_amplified(value_type=3)),
    "jpeg-exif-orientation6-1MB-rationals-4-ifds": lambda: jpeg_with_exif(exif_amplified()),
    "png-rgba16-interlaced-4096": png_rgba16_interlaced,
    # found after the review, same families: header bytes Pillow parses in Python
    "jpeg-9.7MB-dqt-tables": lambda: jpeg_dqt_tables(9_700_000),
    "jpeg-63-photoshop-segments": lambda: jpeg_photoshop_resources(63),
    # at the caps
    "jpeg-progressive-4096-32-scans": lambda: jpeg_with_scans(32),
    "jpeg-progressive-4096-444-noise": lambda: jpeg_noise(progressive=True, subsampling=0,
                                                          spread=96),
    "jpeg-baseline-4096-noise": jpeg_noise,
    "jpeg-fill-metadata-markers-at-caps": jpeg_at_caps,
    "jpeg-dqt-tables-at-cap": lambda: jpeg_dqt_tables(255 * 1024),
    "jpeg-photoshop-resources-at-cap": lambda: jpeg_photoshop_resources(4, 60000),
    "png-chunks-and-ancillary-at-caps": png_at_caps,
    "png-rgba8-interlaced-4096": lambda: png_zeros(interlaced=True),
    "png-rgb16-4096": lambda: png_zeros(depth=16, colour=2),
    "png-la16-interlaced-4096": lambda: png_zeros(depth=16, colour=4, interlaced=True),
    "png-exif-64KB-rationals-orientation6": lambda: png_with_exif(
        exif_amplified(60 * 1024)),
    "jpeg-exif-64KB-shorts-orientation6": lambda: jpeg_with_exif(
        exif_amplified(60 * 1024, value_type=3)),
}

#: The inputs of COSTLY that must be refused (422 image_too_complex).
REFUSED = tuple(list(COSTLY)[:10])
