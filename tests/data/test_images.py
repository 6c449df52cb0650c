"""Tests for wds_ocr.data.images: bytes -> canonical upright RGB uint8 image."""

from __future__ import annotations

import io
import json
import math
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from wds_ocr.data.images import CanonicalImage, decode_canonical, read_image_bytes, read_orientation
from wds_ocr.data.orientation import ORIENTATIONS, displayed_size, inverse_orientation, orient_array, orient_points
from wds_ocr.errors import SampleError

REEXPORT = "re-export the image as JPEG or PNG"
COPY_AGAIN = "copy or download the file again (it is incomplete)"
MAGENTA = (255, 0, 255)


# ----------------------------------------------------------------------------- helpers


def _upright(height: int = 6, width: int = 9) -> np.ndarray:
    """Small RGB image in which every pixel is different, so every orientation is distinguishable."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([cols * 25, rows * 40, (cols * 7 + rows * 13) % 200], axis=2).astype(np.uint8)


def _smooth_upright(height: int = 48, width: int = 64) -> np.ndarray:
    """Smooth gradient with a dark block near the top-left, for lossy (JPEG) round trips."""
    rows, cols = np.mgrid[0:height, 0:width]
    image = np.stack([cols * 3 + 30, rows * 4 + 20, np.full_like(rows, 128)], axis=2).astype(np.uint8)
    image[4:12, 6:18] = (10, 10, 10)
    return image


def _encode(pixels: np.ndarray, image_format: str, orientation: int | None = None, **options) -> bytes:
    image = Image.fromarray(pixels)
    if orientation is not None:
        exif = image.getexif()
        exif[0x0112] = orientation
        options["exif"] = exif
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def _save_options(image_format: str) -> dict:
    return {"WEBP": {"lossless": True}, "JPEG": {"quality": 100, "subsampling": 0}}.get(image_format, {})


def _png(width: int, height: int, bit_depth: int, color_type: int, rows: list[bytes], extra: tuple = ()) -> bytes:
    """A PNG written by hand: (chunk type, payload, before-IDAT?) in ``extra``."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0))
    before = b"".join(chunk(kind, payload) for kind, payload, first in extra if first)
    after = b"".join(chunk(kind, payload) for kind, payload, first in extra if not first)
    data = chunk(b"IDAT", zlib.compress(b"".join(b"\x00" + row for row in rows)))
    return b"\x89PNG\r\n\x1a\n" + header + before + data + after + chunk(b"IEND", b"")


def _exif_block(orientation: int, byte_order: str = "<", field_type: int = 3) -> bytes:
    """A TIFF-structured EXIF block whose IFD0 holds only the Orientation tag."""
    head = (b"II*\x00" if byte_order == "<" else b"MM\x00*") + struct.pack(byte_order + "I", 8)
    if field_type == 3:
        value = struct.pack(byte_order + "H", orientation) + b"\x00\x00"
    else:
        value = struct.pack(byte_order + "I", orientation)
    entry = struct.pack(byte_order + "HHI", 0x0112, field_type, 1) + value
    return head + struct.pack(byte_order + "H", 1) + entry + struct.pack(byte_order + "I", 0)


def _with_app1(jpeg: bytes, payload: bytes) -> bytes:
    """Insert an APP1 segment right after SOI."""
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def _pixel_centres_inside(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    contour = polygon.astype(np.float32).reshape(-1, 1, 2)
    mask = np.zeros((height, width), dtype=bool)
    for row in range(height):
        for col in range(width):
            mask[row, col] = cv2.pointPolygonTest(contour, (col + 0.5, row + 0.5), False) > 0
    return mask


def _raises(data: bytes, name: str = "sample.jpg") -> str:
    with pytest.raises(SampleError) as caught:
        decode_canonical(data, name)
    assert caught.value.name == name
    return str(caught.value)


# ----------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("image_format", ["PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_lossless_round_trip_restores_upright_pixels_exactly(image_format: str, orientation: int) -> None:
    upright = _upright()
    stored = orient_array(upright, inverse_orientation(orientation))
    data = _encode(stored, image_format, orientation, **_save_options(image_format))

    canonical = decode_canonical(data, "synthetic")

    assert read_orientation(data) == orientation
    assert canonical.orientation == orientation
    assert canonical.stored_size == (stored.shape[1], stored.shape[0])
    assert canonical.size == (9, 6) == displayed_size(stored.shape[1], stored.shape[0], orientation)
    assert canonical.pixels.dtype == np.uint8 and canonical.pixels.flags.c_contiguous
    np.testing.assert_array_equal(canonical.pixels, upright)
    # Pillow's own reading of the tag is an independent reference for what "upright" means.
    reference = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    np.testing.assert_array_equal(canonical.pixels, reference)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_jpeg_round_trip_restores_upright_pixels_within_compression_error(orientation: int) -> None:
    upright = _smooth_upright()
    stored = orient_array(upright, inverse_orientation(orientation))
    data = _encode(stored, "JPEG", orientation, quality=100, subsampling=0)

    canonical = decode_canonical(data, "synthetic.jpg")

    assert canonical.orientation == orientation
    assert canonical.size == (64, 48)
    error = np.abs(canonical.pixels.astype(int) - upright.astype(int))
    assert error.max() <= 8 and error.mean() < 1.0
    # The tolerance still tells orientations apart: the 180-degree turn is far off.
    turned = orient_array(upright, 3).astype(int)
    assert np.abs(canonical.pixels.astype(int) - turned).mean() > 20


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_polygon_drawn_on_stored_pixels_maps_onto_the_same_canonical_pixels(orientation: int) -> None:
    stored = orient_array(_upright(7, 10), inverse_orientation(orientation)).copy()
    stored_height, stored_width = stored.shape[:2]
    # Irregular quadrilateral with no pixel centre on its boundary.
    polygon = np.array([[1.2, 0.7], [5.6, 1.3], [4.9, 3.8], [0.6, 2.9]])
    stored_mask = _pixel_centres_inside(polygon, stored_height, stored_width)
    stored[stored_mask] = MAGENTA
    data = _encode(stored, "PNG", orientation)

    canonical = decode_canonical(data, "synthetic.png")

    mapped = orient_points(polygon, orientation, stored_width, stored_height)
    width, height = canonical.size
    expected_mask = _pixel_centres_inside(mapped, height, width)
    painted = np.all(canonical.pixels == MAGENTA, axis=2)
    assert stored_mask.sum() == 11
    np.testing.assert_array_equal(painted, expected_mask)


# ----------------------------------------------------------------------------- read_orientation


@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "WEBP", "TIFF", "BMP"])
def test_read_orientation_is_one_without_a_tag(image_format: str) -> None:
    assert read_orientation(_encode(_upright(), image_format, **_save_options(image_format))) == 1


@pytest.mark.parametrize("value", [0, 9, 65535])
def test_out_of_range_orientation_reads_as_one_and_leaves_pixels_as_stored(value: int) -> None:
    data = _encode(_upright(), "PNG", value)
    canonical = decode_canonical(data, "odd.png")
    assert read_orientation(data) == 1
    assert canonical.orientation == 1
    np.testing.assert_array_equal(canonical.pixels, _upright())


@pytest.mark.parametrize(("byte_order", "field_type"), [("<", 3), (">", 3), ("<", 4), (">", 4)])
def test_read_orientation_handles_both_byte_orders_and_long_values(byte_order: str, field_type: int) -> None:
    jpeg = _with_app1(_encode(_smooth_upright(), "JPEG"), b"Exif\x00\x00" + _exif_block(6, byte_order, field_type))
    assert read_orientation(jpeg) == 6
    assert decode_canonical(jpeg, "hand.jpg").size == (48, 64)


def test_read_orientation_skips_an_xmp_segment_before_the_exif_segment() -> None:
    jpeg = _encode(_smooth_upright(), "JPEG", 8)
    with_xmp = _with_app1(jpeg, b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta/>")
    assert with_xmp.index(b"http://ns.adobe.com") < with_xmp.index(b"Exif\x00\x00")
    assert read_orientation(with_xmp) == 8


def test_read_orientation_reads_only_the_header() -> None:
    data = _encode(_smooth_upright(), "JPEG", 7)
    header_only = data[: data.index(b"\xff\xda") + 2]
    assert read_orientation(header_only) == 7


@pytest.mark.parametrize("before_image_data", [True, False])
@pytest.mark.parametrize("prefix", [b"", b"Exif\x00\x00"])
def test_read_orientation_finds_png_exif_before_or_after_image_data(before_image_data: bool, prefix: bytes) -> None:
    rows = [bytes([10, 20, 30, 40, 50, 60])]
    data = _png(2, 1, 8, 2, rows, extra=((b"eXIf", prefix + _exif_block(2, ">"), before_image_data),))
    assert read_orientation(data) == 2
    np.testing.assert_array_equal(decode_canonical(data, "hand.png").pixels, [[[40, 50, 60], [10, 20, 30]]])


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"plain text",
        b"\xff\xd8\xff\xe1\x00\x10Exif\x00\x00II*\x00\xff\xff\xff\x7f",  # IFD0 offset past the end
        _with_app1(_encode(_smooth_upright(), "JPEG"), b"Exif\x00\x00XY*\x00garbage!"),  # no byte order mark
        _with_app1(_encode(_smooth_upright(), "JPEG"), b"Exif\x00\x00" + _exif_block(3)[:-10]),  # entry cut short
    ],
)
def test_read_orientation_is_one_for_unreadable_data(data: bytes) -> None:
    assert read_orientation(data) == 1


# ----------------------------------------------------------------------------- pixel modes


def test_rgb_png_is_exact() -> None:
    rgb = np.random.default_rng(3).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_canonical(_encode(rgb, "PNG"), "rgb.png").pixels, rgb)


def test_image_written_by_opencv_from_bgr_decodes_to_rgb() -> None:
    rgb = np.random.default_rng(4).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    assert ok
    np.testing.assert_array_equal(decode_canonical(encoded.tobytes(), "bgr.png").pixels, rgb)


@pytest.mark.parametrize("channels", [3, 1])
def test_jpeg_decodes_identically_to_pillow(channels: int) -> None:
    pixels = np.random.default_rng(5).integers(0, 256, (20, 28, 3), dtype=np.uint8)
    data = _encode(pixels if channels == 3 else pixels[:, :, 0], "JPEG", quality=90)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(decode_canonical(data, "photo.jpg").pixels, reference)


def test_grayscale_png_is_replicated_into_three_channels() -> None:
    gray = np.array([[0, 17, 128], [200, 254, 255]], dtype=np.uint8)
    pixels = decode_canonical(_encode(gray, "PNG"), "gray.png").pixels
    assert pixels.shape == (2, 3, 3)
    np.testing.assert_array_equal(pixels, np.repeat(gray[:, :, None], 3, axis=2))


def test_grayscale_alpha_is_composited_over_white() -> None:
    la = np.array([[[100, 128], [50, 0], [50, 255], [0, 1]]], dtype=np.uint8)
    pixels = decode_canonical(_encode(la, "PNG"), "la.png").pixels
    np.testing.assert_array_equal(pixels[0, :, 0], [177, 255, 50, 254])
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])


@pytest.mark.parametrize("image_format", ["PNG", "WEBP", "TIFF"])
def test_rgba_is_composited_over_white(image_format: str) -> None:
    rgba = np.array(
        [[[100, 50, 200, 128], [10, 20, 30, 0], [10, 20, 30, 255], [255, 255, 255, 64]]], dtype=np.uint8
    )
    pixels = decode_canonical(_encode(rgba, image_format, **_save_options(image_format)), "rgba").pixels
    np.testing.assert_array_equal(pixels, [[[177, 152, 227], [255, 255, 255], [10, 20, 30], [255, 255, 255]]])


def _palette_png(transparent_index: int | None) -> bytes:
    image = Image.new("P", (3, 2))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    image.putdata([0, 1, 2, 2, 1, 0])
    buffer = io.BytesIO()
    options = {} if transparent_index is None else {"transparency": transparent_index}
    image.save(buffer, "PNG", **options)
    return buffer.getvalue()


def test_palette_image_uses_its_palette() -> None:
    pixels = decode_canonical(_palette_png(None), "palette.png").pixels
    red, green, blue = [255, 0, 0], [0, 255, 0], [0, 0, 255]
    np.testing.assert_array_equal(pixels, [[red, green, blue], [blue, green, red]])


def test_palette_transparency_becomes_white() -> None:
    pixels = decode_canonical(_palette_png(1), "palette.png").pixels
    red, white, blue = [255, 0, 0], [255, 255, 255], [0, 0, 255]
    np.testing.assert_array_equal(pixels, [[red, white, blue], [blue, white, red]])


def test_transparent_colour_key_in_gray_and_rgb_png_becomes_white() -> None:
    gray = np.array([[7, 8]], dtype=np.uint8)
    np.testing.assert_array_equal(
        decode_canonical(_encode(gray, "PNG", transparency=7), "key.png").pixels, [[[255] * 3, [8] * 3]]
    )
    rgb = np.array([[[1, 2, 3], [4, 5, 6]]], dtype=np.uint8)
    np.testing.assert_array_equal(
        decode_canonical(_encode(rgb, "PNG", transparency=(1, 2, 3)), "key.png").pixels, [[[255] * 3, [4, 5, 6]]]
    )


def test_sixteen_bit_gray_png_keeps_the_high_byte() -> None:
    values = np.array([[0x0000, 0x00FF, 0x0100, 0x1234, 0x8000, 0xFFFF]], dtype=np.uint16)
    data = _encode(values, "PNG")
    assert data[24] == 16  # IHDR bit depth
    pixels = decode_canonical(data, "deep.png").pixels
    # Clipping to 255 would give [0, 255, 255, 255, 255, 255].
    np.testing.assert_array_equal(pixels[0, :, 0], [0, 0, 1, 0x12, 0x80, 0xFF])
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 1])


def test_sixteen_bit_rgb_png_keeps_the_high_byte() -> None:
    row = np.array([[0x1234, 0xABCD, 0x00FF], [0xFFFF, 0x0100, 0x8001]], dtype=">u2").tobytes()
    pixels = decode_canonical(_png(2, 1, 16, 2, [row]), "deep.png").pixels
    np.testing.assert_array_equal(pixels, [[[0x12, 0xAB, 0x00], [0xFF, 0x01, 0x80]]])


def test_sixteen_bit_rgba_and_gray_alpha_png_keep_the_high_byte_then_composite() -> None:
    rgba = np.array([[0x1234, 0xABCD, 0x00FF, 0xFFFF], [0x1234, 0xABCD, 0x00FF, 0x00FF]], dtype=">u2").tobytes()
    pixels = decode_canonical(_png(2, 1, 16, 6, [rgba]), "deep.png").pixels
    np.testing.assert_array_equal(pixels, [[[0x12, 0xAB, 0x00], [255, 255, 255]]])
    gray_alpha = np.array([[0x1234, 0xFFFF], [0xABCD, 0x8000]], dtype=">u2").tobytes()
    pixels = decode_canonical(_png(2, 1, 16, 4, [gray_alpha]), "deep.png").pixels
    np.testing.assert_array_equal(pixels[0, :, 0], [0x12, 213])  # (171 * 128 + 255 * 127 + 127) // 255


def test_adobe_cmyk_jpeg_decodes_to_rgb() -> None:
    blocks = [(0, 0, 0, 0), (255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255)]
    cmyk = np.zeros((8, 8 * len(blocks), 4), dtype=np.uint8)
    for index, value in enumerate(blocks):
        cmyk[:, 8 * index : 8 * index + 8] = value
    buffer = io.BytesIO()
    Image.fromarray(cmyk, "CMYK").save(buffer, "JPEG", quality=100)
    data = buffer.getvalue()
    assert b"Adobe" in data  # Pillow writes CMYK JPEG the Adobe way: inverted, with an APP14 marker

    pixels = decode_canonical(data, "cmyk.jpg").pixels.astype(int)

    expected = [(255, 255, 255), (0, 255, 255), (255, 0, 255), (255, 255, 0), (0, 0, 0)]
    for index, colour in enumerate(expected):
        block = pixels[:, 8 * index : 8 * index + 8]
        assert np.abs(block - np.array(colour)).max() <= 2, (index, block[0, 0])


@pytest.mark.parametrize("image_format", ["PNG", "BMP", "TIFF"])
def test_one_bit_image_becomes_black_and_white(image_format: str) -> None:
    bits = np.array([[0, 255, 0], [255, 0, 255]], dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(bits).convert("1").save(buffer, image_format)
    pixels = decode_canonical(buffer.getvalue(), "bits").pixels
    np.testing.assert_array_equal(pixels, np.repeat(bits[:, :, None], 3, axis=2))


@pytest.mark.parametrize("image_format", ["BMP", "TIFF", "WEBP"])
def test_other_containers_hold_exact_rgb(image_format: str) -> None:
    rgb = _upright()
    data = _encode(rgb, image_format, **_save_options(image_format))
    np.testing.assert_array_equal(decode_canonical(data, "other").pixels, rgb)


@pytest.mark.parametrize("image_format", ["PNG", "BMP"])
def test_pixels_are_writable_contiguous_uint8_on_both_decoder_paths(image_format: str) -> None:
    pixels = decode_canonical(_encode(_upright(), image_format), "any").pixels
    assert (pixels.dtype, pixels.shape) == (np.uint8, (6, 9, 3))
    assert pixels.flags.c_contiguous and pixels.flags.writeable


def test_canonical_image_size_is_width_then_height() -> None:
    image = CanonicalImage(pixels=np.zeros((2, 5, 3), dtype=np.uint8), orientation=1, stored_size=(5, 2))
    assert image.size == (5, 2)


# ----------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "gone.jpg"
    with pytest.raises(SampleError) as caught:
        read_image_bytes(path, "gone.jpg")
    assert str(caught.value) == f"gone.jpg: image file not found: {path}; check the dataset folder and the file name"
    assert caught.value.name == "gone.jpg"


def test_directory_instead_of_a_file(tmp_path: Path) -> None:
    with pytest.raises(SampleError) as caught:
        read_image_bytes(tmp_path, "folder.jpg")
    assert str(caught.value) == f"folder.jpg: expected an image file but found a directory: {tmp_path}"


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(SampleError) as caught:
        read_image_bytes(path, "empty.jpg")
    assert str(caught.value) == f"empty.jpg: image file is empty (0 bytes): {path}; re-export or re-copy the image"
    assert _raises(b"", "empty.jpg") == f"empty.jpg: no image data (0 bytes); {REEXPORT}"


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated: root (as in CI containers) can read a file whatever its permission bits.
    path = tmp_path / "locked.jpg"
    path.write_bytes(b"\xff\xd8")

    def deny(name, *args, **kwargs) -> int:
        raise PermissionError(13, "Permission denied", str(name))

    monkeypatch.setattr("wds_ocr.data.images.os.open", deny)
    with pytest.raises(SampleError) as caught:
        read_image_bytes(path, "locked.jpg")
    assert str(caught.value) == f"locked.jpg: cannot read image file {path}: permission denied; make the file readable"


def test_input_output_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "disk.jpg").write_bytes(b"\xff\xd8\xff")

    def fail(fd: int, count: int) -> bytes:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("wds_ocr.data.images.os.read", fail)
    with pytest.raises(SampleError) as caught:
        read_image_bytes(tmp_path / "disk.jpg", "disk.jpg")
    assert str(caught.value) == f"disk.jpg: cannot read image file {tmp_path / 'disk.jpg'}: Input/output error"


def test_read_image_bytes_returns_the_file_content(tmp_path: Path) -> None:
    path = tmp_path / "ok.png"
    data = _encode(_upright(), "PNG")
    path.write_bytes(data)
    assert read_image_bytes(path, "ok.png") == data


def test_jpeg_cut_in_half_is_rejected() -> None:
    data = _encode(np.random.default_rng(6).integers(0, 256, (64, 64, 3), dtype=np.uint8), "JPEG")
    message = _raises(data[: len(data) // 2], "half.jpg")
    assert message == f"half.jpg: truncated JPEG: the file ends before its end-of-image marker; {COPY_AGAIN}"


def test_jpeg_missing_only_its_end_marker_is_rejected() -> None:
    data = _encode(_smooth_upright(), "JPEG")
    assert data.endswith(b"\xff\xd9")
    message = _raises(data[:-2], "cut.jpg")
    assert message == f"cut.jpg: truncated JPEG: the file ends before its end-of-image marker; {COPY_AGAIN}"


def test_jpeg_cut_inside_its_header_is_rejected() -> None:
    data = _encode(_smooth_upright(), "JPEG", 6)
    message = _raises(data[:40], "head.jpg")
    assert message == f"head.jpg: truncated JPEG: the file ends inside its header; {COPY_AGAIN}"


def test_progressive_jpeg_with_several_scans_is_complete() -> None:
    data = _encode(_smooth_upright(), "JPEG", 6, progressive=True)
    assert data.count(b"\xff\xda") > 1
    assert decode_canonical(data, "progressive.jpg").size == (48, 64)
    message = _raises(data[: len(data) * 3 // 4], "progressive.jpg")
    assert message == f"progressive.jpg: truncated JPEG: the file ends before its end-of-image marker; {COPY_AGAIN}"


def test_jpeg_the_decoder_rejects() -> None:
    data = bytearray(_encode(_smooth_upright(), "JPEG"))
    frame = data.index(b"\xff\xc0")
    data[frame + 5 : frame + 7] = b"\x00\x00"  # zero image height: refused from the header, before decoding
    message = _raises(bytes(data), "flat.jpg")
    assert message == (f"flat.jpg: unsupported JPEG: its frame header declares 64x0 pixels (a zero height is "
                       f"defined later by a DNL marker); {REEXPORT}")


def test_png_cut_in_half_is_rejected() -> None:
    data = _encode(np.random.default_rng(7).integers(0, 256, (32, 32, 3), dtype=np.uint8), "PNG")
    message = _raises(data[: len(data) // 2], "half.png")
    assert message == f"half.png: truncated PNG: the file ends before its IEND chunk; {COPY_AGAIN}"


def test_png_with_damaged_image_data_is_rejected() -> None:
    data = bytearray(_encode(np.random.default_rng(8).integers(0, 256, (16, 16, 3), dtype=np.uint8), "PNG"))
    start = data.index(b"IDAT") + 10
    data[start : start + 20] = bytes(20)
    message = _raises(bytes(data), "damaged.png")
    assert message == f"damaged.png: corrupt PNG: the decoder rejected the image data; {REEXPORT}"


def test_webp_cut_short_is_rejected() -> None:
    data = _encode(_upright(), "WEBP", lossless=True)
    cut = data[: len(data) - 10]
    message = _raises(cut, "short.webp")
    declared = len(data)
    assert message == (
        f"short.webp: truncated WebP: {len(cut)} of the {declared} bytes its header declares; {COPY_AGAIN}"
    )


def test_random_bytes_are_not_an_image() -> None:
    data = np.random.default_rng(9).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert data[:8] == b"!\x87\xeak\xde\xa6\xc8\xde"
    message = _raises(data, "noise.jpg")
    assert message == (
        "noise.jpg: not an image: the data starts with b'!\\x87\\xeak\\xde\\xa6\\xc8\\xde', "
        "not a JPEG, PNG, WebP, TIFF or BMP signature; check that the file is really an image"
    )


def test_text_file_renamed_to_jpg_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("hello world, these are notes\n")
    message = _raises(read_image_bytes(path, "notes.jpg"), "notes.jpg")
    assert message == (
        "notes.jpg: not an image: the data starts with b'hello wo', "
        "not a JPEG, PNG, WebP, TIFF or BMP signature; check that the file is really an image"
    )


def test_gif_is_an_unsupported_format() -> None:
    message = _raises(_encode(_upright(), "GIF"), "anim.gif")
    assert message == (
        "anim.gif: unsupported image format GIF (supported: JPEG, PNG, WEBP, TIFF, BMP); "
        "re-export the image as JPEG or PNG"
    )


def test_floating_point_tiff_is_an_unsupported_mode() -> None:
    data = _encode(np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4), "TIFF")
    message = _raises(data, "float.tif")
    assert message == "float.tif: unsupported pixel mode F in a TIFF file; re-export the image as 8-bit RGB"


def test_jpeg_with_two_colour_components_has_an_unparsable_header() -> None:
    data = bytearray(_encode(_smooth_upright(), "JPEG"))
    frame = data.index(b"\xff\xc0")
    data[frame + 9] = 2
    message = _raises(bytes(data), "odd.jpg")
    assert message == f"odd.jpg: corrupt JPEG: its header cannot be parsed; {REEXPORT}"


# ----------------------------------------------------------------------------- real receipts


def _receipts(root: Path) -> list[tuple[Path, dict]]:
    found = []
    for split in ("train", "val"):
        words = json.loads((root / "jsons" / f"{split}.json").read_text())["images"]
        found.extend((root / "images" / split / name, entry) for name, entry in sorted(words.items()))
    return found


def _tag_by_pillow(path: Path) -> int | None:
    with Image.open(path) as image:
        return image.getexif().get(0x0112)


def _small_gray(path: Path, scale: float) -> np.ndarray:
    """Stored (not rotated) pixels as gray, downscaled by ``scale``; Pillow never applies the tag."""
    with Image.open(path) as image:
        width, height = image.size
        image.draft("L", (math.ceil(width * scale), math.ceil(height * scale)))
        gray = np.asarray(image.convert("L"))
    return cv2.resize(gray, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)


def _box_ink(gray: np.ndarray, polygons: list[np.ndarray]) -> float:
    """Mean gray level inside the boxes; boxes that fall outside the image count as blank paper (255)."""
    side = max(gray.shape[0], gray.shape[1], max(int(np.ceil(p.max())) + 1 for p in polygons))
    canvas = np.full((side, side), 255, dtype=np.uint8)
    canvas[: gray.shape[0], : gray.shape[1]] = gray
    mask = np.zeros((side, side), dtype=np.uint8)
    cv2.fillPoly(mask, [np.round(p).astype(np.int32) for p in polygons], 1)
    return float(canvas[mask.astype(bool)].mean())


def test_real_tagged_receipts_come_out_upright(sroie_root: Path) -> None:
    tagged = [(path, entry, tag) for path, entry in _receipts(sroie_root) if (tag := _tag_by_pillow(path))]
    assert len(tagged) == 30

    for path, entry, tag in tagged:
        data = read_image_bytes(path, path.name)
        assert read_orientation(data) == tag and 2 <= tag <= 8, path.name
        canonical = decode_canonical(data, path.name)
        assert canonical.orientation == tag
        width, height = canonical.size
        assert (width, height) == displayed_size(*canonical.stored_size, tag)

        scale = min(1.0, 1000 / max(width, height))
        polygons = [np.asarray(word["points"], dtype=np.float64) * scale for word in entry["words"].values()]
        stored_small = _small_gray(path, scale)
        scores = {o: _box_ink(orient_array(stored_small, o), polygons) for o in ORIENTATIONS}
        assert min(scores, key=scores.get) == tag, (path.name, scores)

        canonical_small = cv2.resize(
            cv2.cvtColor(canonical.pixels, cv2.COLOR_RGB2GRAY),
            (round(width * scale), round(height * scale)),
            interpolation=cv2.INTER_AREA,
        )
        assert _box_ink(canonical_small, polygons) < canonical_small.mean() - 5, path.name
        # The decoded image is the best-scoring candidate, not just one of the same size.
        differences = {
            o: float(np.abs(canonical_small.astype(int) - candidate.astype(int)).mean())
            for o in ORIENTATIONS
            if (candidate := orient_array(stored_small, o)).shape == canonical_small.shape
        }
        assert min(differences, key=differences.get) == tag, (path.name, differences)
        assert differences[tag] < 8, (path.name, differences)


def test_real_untagged_receipts_keep_their_stored_size(sroie_root: Path) -> None:
    untagged = [path for path, _ in _receipts(sroie_root) if not _tag_by_pillow(path)]
    assert len(untagged) == 120
    for path in untagged:
        data = read_image_bytes(path, path.name)
        canonical = decode_canonical(data, path.name)
        with Image.open(path) as image:
            stored = image.size
        assert read_orientation(data) == 1
        assert (canonical.orientation, canonical.stored_size, canonical.size) == (1, stored, stored), path.name
        assert canonical.pixels.shape == (stored[1], stored[0], 3)


@pytest.mark.parametrize("orientation", [1, 6])
def test_a_jpeg_decodes_at_the_smallest_scale_that_still_gives_the_size_asked_for(orientation: int) -> None:
    """``needed`` picks 1/2, 1/4 or 1/8 (libjpeg's DCT scaling); size stays the full image's."""
    rng = np.random.default_rng(0)
    stored = cv2.resize(rng.integers(0, 255, (75, 50, 3), dtype=np.uint8), (1003, 1501))  # W 1003, H 1501
    ok, encoded = cv2.imencode(".jpg", stored, [cv2.IMWRITE_JPEG_QUALITY, 95])
    data = _with_app1(encoded.tobytes(), b"Exif\x00\x00" + _exif_block(orientation))
    full = decode_canonical(data, "big.jpg")
    displayed = (1501, 1003) if orientation == 6 else (1003, 1501)
    assert full.size == displayed and full.reduction == 1
    asked = []

    def needed(width: int, height: int) -> tuple[int, int]:
        asked.append((width, height))
        return width // 3, height // 3  # 1/2 still gives it, 1/4 does not

    half = decode_canonical(data, "big.jpg", needed=needed)
    assert asked == [displayed]
    assert half.reduction == 2 and half.size == displayed and half.stored_size == (1003, 1501)
    assert (half.pixels.shape[1], half.pixels.shape[0]) == ((751, 502) if orientation == 6 else (502, 751))
    small = cv2.resize(full.pixels, (half.pixels.shape[1], half.pixels.shape[0]), interpolation=cv2.INTER_AREA)
    assert np.abs(small.astype(int) - half.pixels.astype(int)).mean() < 4  # the same picture, smaller
    eighth = decode_canonical(data, "big.jpg", needed=lambda w, h: (100, 100))
    assert eighth.reduction == 8 and eighth.pixels.shape[:2] == ((126, 188) if orientation == 6 else (188, 126))
    whole = decode_canonical(data, "big.jpg", needed=lambda w, h: (w, h))
    assert whole.reduction == 1 and np.array_equal(whole.pixels, full.pixels)
    png = decode_canonical(cv2.imencode(".png", stored)[1].tobytes(), "big.png", needed=lambda w, h: (10, 10))
    assert png.reduction == 1  # only JPEG decoders scale while decoding
