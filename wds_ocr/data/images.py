"""Image file bytes -> the canonical upright image: (H, W, 3) uint8 RGB with EXIF Orientation applied.

Conventions every later stage relies on:

- Orientation comes from the EXIF Orientation tag (0x0112) read here from the container
  (JPEG APP1, PNG eXIf, WebP EXIF chunk, TIFF IFD0) and is applied with ``orient_array``, never
  by a decoder's own auto-rotation, so pixels and polygon maps (``orient_points``) agree exactly.
  Missing or out-of-range tags mean 1 (as stored).
- Alpha is composited over white: ``out = (color * a + 255 * (255 - a) + 127) // 255`` per
  channel (documents are printed on white paper, so a transparent background is white).
- 16-bit samples keep their high byte (``value >> 8``), the exact inverse of 8 -> 16 bit
  widening, never clipping.
- Grayscale and 1-bit images are replicated into three equal channels; CMYK (including Adobe's
  inverted CMYK JPEG) and palette images are converted by Pillow.

Decoder choice: the common case, 8-bit RGB or gray JPEG and PNG without transparency, goes
through ``cv2.imdecode`` (a 4961x7016 receipt JPEG: ~150 ms against Pillow's ~410-490 ms; 2x on
PNG; pixel-identical output); every other mode goes through Pillow. Truncation is decided here from the
container structure (JPEG end-of-image marker, PNG IEND chunk, WebP RIFF size), not from a
decoder's warnings, so a partially decoded image is never returned whatever the decoder does.
TIFF and BMP have no such end marker; for them Pillow's strict loading decides (it raises on a
short file unless someone sets ``ImageFile.LOAD_TRUNCATED_IMAGES``, which this package never does).

Hostile files: ``read_image_bytes`` opens without blocking and reads regular files only (a FIFO,
a device such as ``/dev/zero``, or a symbolic link to one is a reject, not a hang or a
MemoryError), and never more than ``max_bytes``. ``decode_canonical`` reads the pixel count from
the container header (JPEG frame header, PNG IHDR, WebP VP8/VP8L/VP8X, Pillow's lazy header parse
for TIFF and BMP) and refuses more than ``max_pixels`` before a decoder allocates anything; any
exception a decoder raises on hostile data (``cv2.error`` included) becomes a ``SampleError``.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from wds_ocr.config import SourceConfig
from wds_ocr.data.paths import link_escape, read_at_most
from wds_ocr.data.orientation import inverse_orientation, orient_array
from wds_ocr.data.containers import (DEFAULT_MAX_JPEG_SCANS, ORIENTATION_TAG, REEXPORT, check_pixels,
                                     inspect_container, not_an_image_reason, orientation_from_exif, sniff_format)
from wds_ocr.errors import SampleError

# OpenCV >= 4.11 decodes straight to RGB (saves a full-image BGR->RGB pass); older ones give BGR.
_IMREAD_COLOR_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)
_SIXTEEN_BIT_GRAY_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_ALPHA_OR_PALETTE_MODES = frozenset({"LA", "La", "PA", "P", "RGBA", "RGBa"})
_CONVERTIBLE_COLOR_MODES = frozenset({"CMYK", "YCbCr", "LAB", "HSV"})
# Defaults of source.max_pixels / source.max_file_bytes (wds_ocr.config.SourceConfig), for callers
# without a config (predict).
DEFAULT_MAX_PIXELS = SourceConfig().max_pixels
DEFAULT_MAX_FILE_BYTES = SourceConfig().max_file_bytes
_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


@dataclass(frozen=True, eq=False)
class CanonicalImage:
    """A decoded image in the displayed (tag-applied) frame.

    ``eq=False``: equality of numpy arrays is element-wise, so identity is the only sound default.
    """

    pixels: np.ndarray  # (H, W, 3) uint8 RGB, C-contiguous, displayed frame
    orientation: int  # EXIF orientation found in the file, 1..8 (1 when absent or invalid)
    stored_size: tuple[int, int]  # (width, height) of the pixel array as stored in the file
    # 1, or 2, 4, 8 for a JPEG decoded at that fraction of its size (``pixels`` is then
    # ceil(width / reduction) x ceil(height / reduction); ``size`` stays the full image's)
    reduction: int = 1

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the image in the displayed frame (of ``pixels`` when not reduced)."""
        if self.reduction == 1:
            return int(self.pixels.shape[1]), int(self.pixels.shape[0])
        width, height = self.stored_size
        return (height, width) if self.orientation in _SWAPPING else (width, height)


def read_image_bytes(path: Path, name: str, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular image file of at most ``max_bytes``; SampleError(name, ...) otherwise.

    The file is opened without blocking (a FIFO with no writer does not hang the open) and checked
    with fstat on the opened descriptor (no race between the check and the read): symbolic links
    are followed only within their folder (``paths.link_escape``), and what they lead to must be a
    regular file.
    """
    path = Path(path)
    escape = link_escape(path)
    if escape is not None:
        raise SampleError(name, escape)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise SampleError(name, f"image file not found: {path}; check the dataset folder and the file name") from None
    except IsADirectoryError:
        raise SampleError(name, f"expected an image file but found a directory: {path}") from None
    except PermissionError:
        raise SampleError(name, f"cannot read image file {path}: permission denied; make the file readable") from None
    except (OSError, ValueError) as exc:
        raise SampleError(name, f"cannot read image file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise SampleError(name, f"expected an image file but found a directory: {path}")
        if not stat.S_ISREG(info.st_mode):
            kind = next((what for test, what in _FILE_KINDS if test(info.st_mode)), "not a regular file")
            raise SampleError(name, f"{path} is {kind}, not a regular file; only regular image files are read")
        if info.st_size > max_bytes:
            raise SampleError(name, f"image file is {info.st_size} bytes, over the {max_bytes}-byte limit "
                                    f"(source.max_file_bytes): {path}")
        data = _read_at_most(fd, max_bytes, name, path)
    except OSError as exc:
        raise SampleError(name, f"cannot read image file {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if not data:
        raise SampleError(name, f"image file is empty (0 bytes): {path}; re-export or re-copy the image")
    return data


def _read_at_most(fd: int, max_bytes: int, name: str, path: Path) -> bytes:
    """Everything up to EOF, refusing a file that grows past ``max_bytes`` while it is read."""
    data = read_at_most(fd, max_bytes)
    if data is None:
        raise SampleError(name, f"image file grew past the {max_bytes}-byte limit (source.max_file_bytes) "
                                f"while it was read: {path}")
    return data


def read_orientation(data: bytes) -> int:
    """EXIF Orientation (1..8) of JPEG/PNG/WebP/TIFF bytes without decoding pixels.

    1 when the format is unknown, the tag is absent, malformed or outside 1..8.
    """
    image_format = sniff_format(data)
    if image_format is None:
        return 1
    return orientation_from_exif(inspect_container(data, image_format).exif)


# EXIF orientations whose displayed frame swaps the stored width and height.
_SWAPPING = (5, 6, 7, 8)
# OpenCV flags that decode a JPEG at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling).
_REDUCED = {2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4, 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}


def jpeg_reduction(stored: tuple[int, int], needed: tuple[int, int]) -> int:
    """The largest of 8, 4, 2 (else 1) at which a ``stored`` (width, height) JPEG still decodes to at
    least ``needed`` (width, height), both in the stored frame."""
    for reduction in (8, 4, 2):
        if all(-(-side // reduction) >= want for side, want in zip(stored, needed)):
            return reduction
    return 1


def reducible_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """The stored (width, height) of a JPEG that ``decode_canonical`` can decode at a reduced scale,
    else None."""
    if sniff_format(data) != "JPEG":
        return None
    layout = inspect_container(data, "JPEG")
    return layout.size if layout.defect is None and layout.fast else None


def decode_canonical(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                     needed: Callable[[int, int], tuple[int, int]] | None = None,
                     max_scans: int = DEFAULT_MAX_JPEG_SCANS) -> CanonicalImage:
    """Decode image bytes into the canonical upright RGB uint8 image (see the module docstring).

    ``needed(width, height)``: the size (displayed frame) the caller needs of an image of that full
    size; a JPEG is then decoded at the smallest 1/2, 1/4 or 1/8 scale that still gives it
    (``CanonicalImage.reduction``), at a fraction of the cost. Raises SampleError(name, reason)
    for empty, truncated, corrupt, non-image or unsupported data, and for an image whose header
    declares more than ``max_pixels`` pixels (checked before decoding).
    """
    if not data:
        raise SampleError(name, f"no image data (0 bytes); {REEXPORT}")
    image_format = sniff_format(data)
    if image_format is None:
        raise SampleError(name, not_an_image_reason(data))
    layout = inspect_container(data, image_format, max_scans)
    if layout.defect is not None:
        raise SampleError(name, layout.defect)
    if layout.size is not None:
        check_pixels(layout.size, max_pixels, name, image_format)
    orientation = orientation_from_exif(layout.exif)
    reduction = 1
    if needed is not None and image_format == "JPEG" and layout.fast and layout.size is not None:
        width, height = layout.size
        swapped = orientation in _SWAPPING
        want = needed(*((height, width) if swapped else (width, height)))
        reduction = jpeg_reduction(layout.size, want[::-1] if swapped else want)
    if layout.fast:
        stored = _decode_with_opencv(data, name, image_format, reduction)
    else:
        stored = _decode_with_pillow(data, name, image_format, max_pixels)
    pixels = np.ascontiguousarray(orient_array(stored, orientation))
    if not pixels.flags.writeable:  # arrays over Pillow's buffers are read-only; OpenCV's are not
        pixels = pixels.copy()
    if reduction > 1:
        expected = tuple(-(-side // reduction) for side in layout.size)
        if (int(stored.shape[1]), int(stored.shape[0])) != expected:
            raise SampleError(name, f"corrupt JPEG: decoded at 1/{reduction} to {stored.shape[1]}x{stored.shape[0]}, "
                                    f"not the {expected[0]}x{expected[1]} its header implies; {REEXPORT}")
        return CanonicalImage(pixels=pixels, orientation=orientation, stored_size=layout.size, reduction=reduction)
    stored_size = (int(stored.shape[1]), int(stored.shape[0]))
    return CanonicalImage(pixels=pixels, orientation=orientation, stored_size=stored_size)


# ----------------------------------------------------------------------------- decoders


def _decode_with_opencv(data: bytes, name: str, image_format: str, reduction: int = 1) -> np.ndarray:
    # IGNORE_ORIENTATION: the tag is applied by orient_array, once, for pixels and points alike.
    color = cv2.IMREAD_COLOR if _IMREAD_COLOR_RGB is None else _IMREAD_COLOR_RGB
    if reduction > 1:  # the reduced-gray flag carries the scale; the colour flag makes it colour
        color |= _REDUCED[reduction]
    try:
        pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), color | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "decoder error"
        raise SampleError(name, f"corrupt {image_format}: the decoder failed ({reason}); {REEXPORT}") from None
    if pixels is None:
        raise SampleError(name, f"corrupt {image_format}: the decoder rejected the image data; {REEXPORT}")
    if _IMREAD_COLOR_RGB is None:
        return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
    return pixels


def _decode_with_pillow(data: bytes, name: str, image_format: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data), formats=[image_format]) as image:
            # Image.open parsed the header only: refuse a bomb before load() allocates its pixels.
            check_pixels(image.size, max_pixels, name, image_format)
            tag_before = getattr(image, "tag_v2", {}).get(ORIENTATION_TAG)
            image.load()
            pixels = _pillow_to_rgb(image, name, image_format)
            tag_after = getattr(image, "tag_v2", {}).get(ORIENTATION_TAG)
    except SampleError:
        raise
    except UnidentifiedImageError:
        raise SampleError(name, f"corrupt {image_format}: its header cannot be parsed; {REEXPORT}") from None
    except Image.DecompressionBombError as exc:
        raise SampleError(name, f"image too large to decode safely: {exc}") from None
    except MemoryError:
        raise SampleError(name, f"{image_format} image too large to decode in the memory available; "
                                "lower source.max_pixels or re-export the image smaller") from None
    except Exception as exc:  # Pillow plugins raise many types on bad data (OSError, SyntaxError, struct.error...)
        raise SampleError(name, f"corrupt {image_format}: {exc}; {REEXPORT}") from None
    # Pillow's TIFF reader applies the Orientation tag itself and then deletes it. Go back to the
    # stored frame, so that orient_array stays the one place where orientation is applied.
    if tag_before in (2, 3, 4, 5, 6, 7, 8) and tag_after is None:
        return orient_array(pixels, inverse_orientation(tag_before))
    return pixels


def _pillow_to_rgb(image: Image.Image, name: str, image_format: str) -> np.ndarray:
    mode = image.mode
    if mode in ("RGB", "L") and image.info.get("transparency") is not None:
        return _composite_over_white(np.asarray(image.convert("RGBA")))
    if mode == "RGB":
        return np.asarray(image)
    if mode == "L":
        return _gray_to_rgb(np.asarray(image))
    if mode == "1":
        return _gray_to_rgb(np.asarray(image.convert("L")))
    if mode in _SIXTEEN_BIT_GRAY_MODES:
        return _gray_to_rgb((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8))
    if mode in _ALPHA_OR_PALETTE_MODES:
        return _composite_over_white(np.asarray(image.convert("RGBA")))
    if mode in _CONVERTIBLE_COLOR_MODES:
        return np.asarray(image.convert("RGB"))
    raise SampleError(name, f"unsupported pixel mode {mode} in a {image_format} file; re-export the image as 8-bit RGB")


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, np.newaxis], 3, axis=2)


def _composite_over_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 -> (H, W, 3) uint8 over a white background, rounded to nearest."""
    alpha = rgba[:, :, 3:4].astype(np.uint16)
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[:, :, :3])
    color = rgba[:, :, :3].astype(np.uint16)
    # color * a + 255 * (255 - a) <= 255 * 255, so uint16 holds every intermediate.
    blended = (color * alpha + 255 * (255 - alpha) + 127) // 255
    return blended.astype(np.uint8)
