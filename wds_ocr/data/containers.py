"""What an image file's container says before any pixel is decoded: its format, size, EXIF
orientation, and whether it is truncated or malformed (JPEG, PNG, WebP parsed here; TIFF and BMP
left to Pillow). ``images.decode_canonical`` refuses what this finds wrong before decoding."""

from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass

from PIL import Image

from wds_ocr.config import SourceConfig
from wds_ocr.errors import SampleError

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP")
REEXPORT = "re-export the image as JPEG or PNG"
COPY_AGAIN = "copy or download the file again (it is incomplete)"
_JPEG_HEADER_TRUNCATED = f"truncated JPEG: the file ends inside its header; {COPY_AGAIN}"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_EXIF_PREFIX = b"Exif\x00\x00"
ORIENTATION_TAG = 0x0112
# JPEG start-of-frame markers: 0xC0-0xCF except DHT (C4), JPG (C8) and DAC (CC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM and the restart markers RST0-RST7.
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})
# Inside entropy-coded data 0xFF is followed by 0x00 (stuffing), 0xD0-0xD7 (restart) or 0xFF
# (fill); anything else is a real marker.
_MARKER_IN_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_PNG_GRAY, _PNG_RGB = 0, 2
# The default of source.max_jpeg_scans, for callers without a config (predict of one file, read_orientation).
DEFAULT_MAX_JPEG_SCANS = SourceConfig().max_jpeg_scans


@dataclass(frozen=True)
class Layout:
    """What the container says before any pixel is decoded."""

    exif: bytes | None  # TIFF-structured EXIF block (starts with II*\0 or MM\0*)
    defect: str | None  # why the container is truncated or malformed; None when intact
    fast: bool  # 8-bit RGB or gray without alpha: decode with OpenCV
    size: tuple[int, int] | None = None  # (width, height) the header declares; None: ask Pillow


def sniff_format(data: bytes) -> str | None:
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(_PNG_SIGNATURE):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if data[:2] == b"BM":
        return "BMP"
    return None


def not_an_image_reason(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as image:
            other_format = image.format
    except Image.DecompressionBombError:
        # Pillow names the format only after its bomb check; a GIF, PSD ... header declaring more
        # pixels than Pillow's own limit ends here.
        supported = ", ".join(SUPPORTED_FORMATS)
        return (f"unsupported image format whose header declares more pixels than Pillow will open (supported: "
                f"{supported}); {REEXPORT}")
    except Exception:  # noqa: BLE001 - Pillow's plugins raise many types on data that is not theirs
        other_format = None
    if other_format is not None:
        supported = ", ".join(SUPPORTED_FORMATS)
        return f"unsupported image format {other_format} (supported: {supported}); {REEXPORT}"
    return (
        f"not an image: the data starts with {data[:8]!r}, not a JPEG, PNG, WebP, TIFF or BMP signature; "
        "check that the file is really an image"
    )


def inspect_container(data: bytes, image_format: str, max_scans: int = DEFAULT_MAX_JPEG_SCANS) -> Layout:
    if image_format == "JPEG":
        return _inspect_jpeg(data, max_scans)
    if image_format == "PNG":
        return _inspect_png(data)
    if image_format == "WEBP":
        return _inspect_webp(data)
    # TIFF keeps its tags in the file's own IFD0; BMP has no EXIF. Pillow judges their integrity.
    return Layout(exif=data if image_format == "TIFF" else None, defect=None, fast=False)


def _inspect_jpeg(data: bytes, max_scans: int) -> Layout:
    size = len(data)
    exif: bytes | None = None
    precision = components = None
    dimensions: tuple[int, int] | None = None
    pos = 2
    while True:
        if pos < size and data[pos] != 0xFF:
            return Layout(exif, f"corrupt JPEG: expected a marker at byte {pos}; {REEXPORT}", False)
        while pos < size and data[pos] == 0xFF:
            pos += 1
        if pos + 3 > size:
            return Layout(exif, _JPEG_HEADER_TRUNCATED, False)
        marker = data[pos]
        pos += 1
        if marker in _STANDALONE_MARKERS:
            continue
        if marker == 0xD9:
            return Layout(exif, f"corrupt JPEG: end-of-image marker before any image data; {REEXPORT}", False)
        end = pos + int.from_bytes(data[pos : pos + 2], "big")
        if end > size:
            return Layout(exif, _JPEG_HEADER_TRUNCATED, False)
        payload = data[pos + 2 : end]
        if marker == 0xE1 and exif is None and payload.startswith(_EXIF_PREFIX):
            exif = payload[len(_EXIF_PREFIX) :]
        elif marker in _SOF_MARKERS and len(payload) >= 6:
            precision, components = payload[0], payload[5]
            dimensions = (int.from_bytes(payload[3:5], "big"), int.from_bytes(payload[1:3], "big"))
        elif marker == 0xDA:
            break
        pos = end
    if components is None or dimensions is None:
        return Layout(exif, f"corrupt JPEG: image data without a frame header; {REEXPORT}", False)
    if dimensions[0] == 0 or dimensions[1] == 0:
        return Layout(exif, f"unsupported JPEG: its frame header declares {dimensions[0]}x{dimensions[1]} pixels "
                             f"(a zero height is defined later by a DNL marker); {REEXPORT}", False)
    scans = _jpeg_scans_to_end(data, end, max_scans)
    if scans is None:
        return Layout(
            exif, f"truncated JPEG: the file ends before its end-of-image marker; {COPY_AGAIN}", False
        )
    if scans > max_scans:
        return Layout(exif, f"JPEG with more than {max_scans} scans (source.max_jpeg_scans): decoding costs a pass over the whole "
                             f"image per scan (a progressive JPEG has about 10); refused before decoding; "
                             f"{REEXPORT}", False)
    return Layout(exif, None, precision == 8 and components in (1, 3), dimensions)


def _jpeg_scans_to_end(data: bytes, scan_start: int, max_scans: int) -> int | None:
    """Follow the scans (several in a progressive JPEG) up to the end-of-image marker: how many
    there are (None when the file ends first). Counting stops past ``max_scans``."""
    size = len(data)
    pos = scan_start
    scans = 1
    while True:
        found = _MARKER_IN_SCAN.search(data, pos)
        if found is None:
            return None
        marker = data[found.start() + 1]
        if marker == 0xD9:
            return scans
        if marker == 0xDA:
            scans += 1
            if scans > max_scans:
                return scans
        if marker in _STANDALONE_MARKERS:
            pos = found.end()
            continue
        length_at = found.end()
        if length_at + 2 > size:
            return None
        pos = length_at + int.from_bytes(data[length_at : length_at + 2], "big")
        if pos > size:
            return None


def _inspect_png(data: bytes) -> Layout:
    size = len(data)
    exif: bytes | None = None
    bit_depth = color_type = None
    dimensions: tuple[int, int] | None = None
    transparent = False
    seen_image_data = False
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= size:
        length = int.from_bytes(data[pos : pos + 4], "big")
        chunk_type = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > size:
            break
        payload = data[pos + 8 : pos + 8 + length]
        if chunk_type == b"IHDR" and length >= 10:
            bit_depth, color_type = payload[8], payload[9]
            dimensions = (int.from_bytes(payload[0:4], "big"), int.from_bytes(payload[4:8], "big"))
        elif chunk_type == b"eXIf" and exif is None:
            exif = payload[len(_EXIF_PREFIX) :] if payload.startswith(_EXIF_PREFIX) else payload
        elif chunk_type == b"tRNS":
            transparent = True
        elif chunk_type == b"IDAT":
            seen_image_data = True
        elif chunk_type == b"IEND":
            if bit_depth is None:
                return Layout(exif, f"corrupt PNG: no IHDR header chunk; {REEXPORT}", False)
            if not seen_image_data:
                return Layout(exif, f"corrupt PNG: no image data (IDAT) chunk; {REEXPORT}", False)
            if dimensions is None or dimensions[0] == 0 or dimensions[1] == 0:
                return Layout(exif, f"corrupt PNG: its IHDR declares {dimensions} pixels; {REEXPORT}", False)
            fast = bit_depth == 8 and color_type in (_PNG_GRAY, _PNG_RGB) and not transparent
            return Layout(exif, None, fast, dimensions)
        pos = end
    return Layout(exif, f"truncated PNG: the file ends before its IEND chunk; {COPY_AGAIN}", False)


def _inspect_webp(data: bytes) -> Layout:
    size = len(data)
    declared = 8 + int.from_bytes(data[4:8], "little")
    exif: bytes | None = None
    dimensions: tuple[int, int] | None = None
    pos = 12
    while pos + 8 <= min(size, declared):
        chunk_size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        fourcc = data[pos : pos + 4]
        payload = data[pos + 8 : pos + 8 + chunk_size]
        if dimensions is None:
            dimensions = _webp_dimensions(fourcc, payload)
        if fourcc == b"EXIF":
            exif = payload[len(_EXIF_PREFIX) :] if payload.startswith(_EXIF_PREFIX) else payload
            break
        pos += 8 + chunk_size + (chunk_size & 1)
    if size < declared:
        defect = f"truncated WebP: {size} of the {declared} bytes its header declares; {COPY_AGAIN}"
        return Layout(exif, defect, False)
    return Layout(exif, None, False, dimensions)


def _webp_dimensions(fourcc: bytes, payload: bytes) -> tuple[int, int] | None:
    """(width, height) from a VP8X canvas, VP8 key frame or VP8L header; None for other chunks."""
    if fourcc == b"VP8X" and len(payload) >= 10:
        return 1 + int.from_bytes(payload[4:7], "little"), 1 + int.from_bytes(payload[7:10], "little")
    if fourcc == b"VP8 " and len(payload) >= 10 and payload[3:6] == b"\x9d\x01\x2a":
        return int.from_bytes(payload[6:8], "little") & 0x3FFF, int.from_bytes(payload[8:10], "little") & 0x3FFF
    if fourcc == b"VP8L" and len(payload) >= 5 and payload[0] == 0x2F:
        bits = int.from_bytes(payload[1:5], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    return None


def check_pixels(size: tuple[int, int], max_pixels: int, name: str, image_format: str) -> None:
    width, height = size
    if width * height > max_pixels:
        raise SampleError(name, f"image too large: its {image_format} header declares {width}x{height} = "
                                f"{width * height} pixels, over the limit of {max_pixels} (source.max_pixels); "
                                "refused before decoding")


def orientation_from_exif(exif: bytes | None) -> int:
    """The Orientation tag of IFD0 in a TIFF-structured block; 1 when absent or malformed."""
    if exif is None or len(exif) < 8:
        return 1
    if exif[:4] == b"II*\x00":
        order = "<"
    elif exif[:4] == b"MM\x00*":
        order = ">"
    else:
        return 1
    (ifd,) = struct.unpack_from(order + "I", exif, 4)
    if ifd + 2 > len(exif):
        return 1
    (count,) = struct.unpack_from(order + "H", exif, ifd)
    for index in range(count):
        entry = ifd + 2 + 12 * index
        if entry + 12 > len(exif):
            return 1
        tag, field_type = struct.unpack_from(order + "HH", exif, entry)
        if tag != ORIENTATION_TAG:
            continue
        if field_type == 3:  # SHORT, the type the EXIF standard prescribes
            (value,) = struct.unpack_from(order + "H", exif, entry + 8)
        elif field_type == 4:  # LONG, written by a few tools
            (value,) = struct.unpack_from(order + "I", exif, entry + 8)
        else:
            return 1
        return value if 1 <= value <= 8 else 1
    return 1


__all__ = ["COPY_AGAIN", "DEFAULT_MAX_JPEG_SCANS", "ORIENTATION_TAG", "REEXPORT", "SUPPORTED_FORMATS", "Layout",
           "check_pixels", "inspect_container", "not_an_image_reason", "orientation_from_exif", "sniff_format"]
