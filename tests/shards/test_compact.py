"""The compact record layout (record version 3): exact stored bytes for a hand-made record, exact
round trips, and refusal of anything that could not be restored bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from wds_ocr.shards import compact

FILL = compact.fill_value(0.3)


def hand_made() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A 16x16 record: a 6x16 image at the left, text-like marks partly over the padding."""
    rng = np.random.default_rng(3)
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    image[:, :6] = rng.integers(1, 256, size=(16, 6, 3), dtype=np.uint8)
    gt = np.zeros((16, 16), dtype=np.uint8)
    gt[3:5, 2:10] = 1
    mask = np.ones((16, 16), dtype=np.uint8)
    mask[10, 1] = 0
    thresh_mask = np.zeros((16, 16), dtype=np.uint8)
    thresh_mask[2:6, 1:11] = 1
    thresh = np.full((16, 16), FILL[0], dtype=np.float16)
    thresh[3, 2] = 0.5
    thresh[4, 9] = 0.625
    return image, {"gt": gt, "mask": mask, "thresh_map": thresh, "thresh_mask": thresh_mask}


def test_a_hand_made_record_packs_to_exactly_these_arrays():
    image, maps = hand_made()
    stored = compact.pack(image, maps, (0, 0), (6, 16), FILL)
    assert stored["image"].tobytes() == image[:, :6].tobytes() and stored["image"].shape == (16, 6, 3)
    # every non-default pixel lies in rows 2..10 and columns 1..10
    assert stored["map_window"].tolist() == [1, 2, 10, 9] and stored["map_window"].dtype == np.dtype("<i4")
    bits = stored["map_bits"]
    assert bits.shape == (4, 9, 2) and bits.dtype == np.uint8
    gt, mask, thresh_mask, band = bits
    # window row 1 (record row 3): gt over record columns 2..9 = window bits 1..8, little-endian
    assert gt.tolist() == [[0, 0], [0xFE, 0x01], [0xFE, 0x01]] + [[0, 0]] * 6
    # mask: 1 everywhere in the window (10 bits: 0xFF, 0x03) but record (10, 1) = window (8, 0)
    assert mask.tolist() == [[0xFF, 0x03]] * 8 + [[0xFE, 0x03]]
    assert thresh_mask.tolist() == [[0xFF, 0x03]] * 4 + [[0, 0]] * 5
    # the two band pixels: record (3, 2) = window (1, 1) and record (4, 9) = window (2, 8)
    assert band.tolist() == [[0, 0], [0x02, 0], [0, 0x01]] + [[0, 0]] * 6
    assert stored["thresh_fill"].view("<u2").tolist() == [0x34CD]  # float16(0.3)
    assert stored["thresh_values"].tolist() == [0.5, 0.625] and stored["thresh_values"].dtype == np.dtype("<f2")


def test_expand_gives_back_every_array_bit_for_bit():
    image, maps = hand_made()
    full = compact.expand(compact.pack(image, maps, (0, 0), (6, 16), FILL), 16, (0, 0))
    assert list(full) == list(compact.FULL_NAMES)
    assert full["image"].tobytes() == image.tobytes()
    for name, array in maps.items():
        assert full[name].dtype == array.dtype and full[name].tobytes() == array.tobytes(), name


def test_an_offset_image_and_a_window_wider_than_a_byte_round_trip():
    rng = np.random.default_rng(0)
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[5:25, 7:30] = rng.integers(0, 256, size=(20, 23, 3), dtype=np.uint8)
    maps = {"gt": (rng.random((32, 32)) < 0.3).astype(np.uint8), "mask": (rng.random((32, 32)) < 0.9).astype(np.uint8),
            "thresh_mask": (rng.random((32, 32)) < 0.5).astype(np.uint8),
            "thresh_map": np.where(rng.random((32, 32)) < 0.4, rng.uniform(0.3, 0.7, (32, 32)), 0.3).astype(np.float16)}
    stored = compact.pack(image, maps, (7, 5), (23, 20), FILL)
    assert stored["image"].shape == (20, 23, 3)
    full = compact.expand(stored, 32, (7, 5))
    assert full["image"].tobytes() == image.tobytes()
    for name, array in maps.items():
        assert full[name].tobytes() == array.tobytes(), name
    band = maps["thresh_map"].view("<u2") != FILL.view("<u2")[0]
    assert stored["thresh_values"].shape == (int(band.sum()),)


def test_a_record_with_nothing_on_its_maps_stores_an_empty_window():
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    image[:, :5] = 9
    maps = {"gt": np.zeros((8, 8), np.uint8), "mask": np.ones((8, 8), np.uint8),
            "thresh_mask": np.zeros((8, 8), np.uint8), "thresh_map": np.full((8, 8), FILL[0], np.float16)}
    stored = compact.pack(image, maps, (0, 0), (5, 8), FILL)
    assert stored["map_window"].tolist() == [0, 0, 0, 0]
    assert stored["map_bits"].shape == (4, 0, 0) and stored["thresh_values"].shape == (0,)
    full = compact.expand(stored, 8, (0, 0))
    assert full["mask"].min() == 1 and full["gt"].max() == 0 and (full["thresh_map"] == FILL[0]).all()


def test_pack_refuses_what_it_could_not_restore():
    image, maps = hand_made()
    padded = image.copy()
    padded[0, 10] = 1
    with pytest.raises(ValueError, match="the image padding is not zero"):
        compact.pack(padded, maps, (0, 0), (6, 16), FILL)
    for name in compact.BINARY_MAPS:
        bad = dict(maps)
        bad[name] = maps[name].copy()
        bad[name][0, 0] = 2
        with pytest.raises(ValueError, match=f"{name} must be \\(16, 16\\) uint8 holding only 0 and 1"):
            compact.pack(image, bad, (0, 0), (6, 16), FILL)
    with pytest.raises(ValueError, match="thresh_map must be"):
        compact.pack(image, dict(maps, thresh_map=maps["thresh_map"].astype(np.float32)), (0, 0), (6, 16), FILL)
    with pytest.raises(ValueError, match="does not fit"):
        compact.pack(image, maps, (12, 0), (6, 16), FILL)


def test_full_bytes_is_what_the_full_arrays_took():
    assert compact.full_bytes(640) == 3_276_800  # 1.23 MB image + 3 x 0.41 MB maps + 0.82 MB float16
