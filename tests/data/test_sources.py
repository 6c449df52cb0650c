"""Reading both dataset layouts: samples, don't-care flags, per-word skips, rejects, hard errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from wds_ocr.config import SourceConfig
from wds_ocr.data.source_formats import parse_icdar_line
from wds_ocr.data.sources import Skip, SourceListing, list_source, parse_points
from wds_ocr.errors import SourceError, UsageError

JSON = SourceConfig(format="json")
ICDAR = SourceConfig(format="icdar")
POLYGON = SourceConfig(format="icdar", icdar_coords="polygon")
QUAD = [[1.0, 2.0], [11.0, 2.0], [11.0, 7.5], [1.0, 7.5]]


def _images(root: Path, split: str, names: list[str]) -> Path:
    folder = root / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"listing never decodes images")
    return folder


def _json_layout(root: Path, doc: object | None = None, images: list[str] = (), split: str = "train",
                 raw: bytes | None = None) -> Path:
    _images(root, split, list(images))
    ann = root / "jsons" / f"{split}.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_bytes(raw if raw is not None else json.dumps(doc).encode("utf-8"))
    return ann


def _icdar_layout(root: Path, gts: dict[str, bytes], images: list[str], split: str = "train") -> Path:
    _images(root, split, images)
    gt_dir = root / "gts" / split
    gt_dir.mkdir(parents=True, exist_ok=True)
    for name, content in gts.items():
        (gt_dir / name).write_bytes(content)
    return gt_dir


def _words(listing: SourceListing, name: str) -> list[tuple[str, list, str | None, bool]]:
    sample = next(s for s in listing.samples if s.name == name)
    return [(w.word_id, w.points.tolist(), w.text, w.dont_care) for w in sample.words]


# ----------------------------------------------------------------------------- JSON layout


def test_json_layout_lists_samples_sorted_with_their_words(tmp_path: Path) -> None:
    doc = {"images": {
        "b.jpg": {"words": {
            "0002": {"points": QUAD, "transcription": "TOTAL"},
            "0001": {"points": [[0, 0], [4, 0], [4, 3], [0, 3]], "transcription": "###"},
            "0003": {"points": [[5, 5], [9, 5], [7, 9]]},  # no transcription: text None, not don't-care
        }},
        "a.jpg": {"words": {"0001": {"points": QUAD, "transcription": "  ###  "}}},
    }}
    ann = _json_layout(tmp_path, doc, ["a.jpg", "b.jpg"])
    listing = list_source(tmp_path, "train", JSON)
    assert (listing.root, listing.split, listing.format) == (tmp_path, "train", "json")
    assert listing.annotation_sha256 == hashlib.sha256(ann.read_bytes()).hexdigest()
    assert [(s.index, s.name, s.image_path) for s in listing.samples] == [
        (0, "a.jpg", tmp_path / "images" / "train" / "a.jpg"),
        (1, "b.jpg", tmp_path / "images" / "train" / "b.jpg"),
    ]
    assert listing.rejects == [] and listing.total == 2
    assert _words(listing, "a.jpg") == [("0001", QUAD, "  ###  ", True)]
    assert _words(listing, "b.jpg") == [
        ("0001", [[0.0, 0.0], [4.0, 0.0], [4.0, 3.0], [0.0, 3.0]], "###", True),
        ("0002", QUAD, "TOTAL", False),
        ("0003", [[5.0, 5.0], [9.0, 5.0], [7.0, 9.0]], None, False),
    ]
    points = listing.samples[0].words[0].points
    assert points.dtype == np.float64 and points.shape == (4, 2)
    assert all(s.skips == () for s in listing.samples)


def test_dont_care_markers_come_from_the_config(tmp_path: Path) -> None:
    doc = {"images": {"a.jpg": {"words": {
        "1": {"points": QUAD, "transcription": "###"},
        "2": {"points": QUAD, "transcription": "IGNORE"},
        "3": {"points": QUAD, "transcription": "ok"},
    }}}}
    _json_layout(tmp_path, doc, ["a.jpg"])
    listing = list_source(tmp_path, "train", SourceConfig(dont_care=("IGNORE",)))
    assert [w.dont_care for w in listing.samples[0].words] == [False, True, False]


@pytest.mark.parametrize("entry", [{"words": {}}, {}, {"words": None}])
def test_image_without_words_is_a_sample_with_no_words(tmp_path: Path, entry: dict) -> None:
    _json_layout(tmp_path, {"images": {"empty.jpg": entry}}, ["empty.jpg"])
    listing = list_source(tmp_path, "train", JSON)
    assert [(s.name, s.words, s.skips) for s in listing.samples] == [("empty.jpg", (), ())]
    assert listing.rejects == []


def test_names_with_several_dots(tmp_path: Path) -> None:
    name = "drp.en_ko.in_house.selectstar_000058.jpg"
    _json_layout(tmp_path, {"images": {name: {"words": {"0001": {"points": QUAD, "transcription": "a.b"}}}}}, [name])
    listing = list_source(tmp_path, "train", JSON)
    assert [(s.name, s.image_path.name) for s in listing.samples] == [(name, name)]
    assert _words(listing, name) == [("0001", QUAD, "a.b", False)]


def test_image_on_disk_without_an_entry_is_a_reject(tmp_path: Path) -> None:
    ann = _json_layout(tmp_path, {"images": {"b.jpg": {"words": {}}}}, ["a.jpg", "b.jpg", "c.PNG", "notes.txt"])
    listing = list_source(tmp_path, "train", JSON)
    assert [(s.index, s.name) for s in listing.samples] == [(1, "b.jpg")]
    assert listing.rejects == [
        Skip("a.jpg", f"image has no entry in {ann}"),
        Skip("c.PNG", f"image has no entry in {ann}"),
    ]
    assert listing.rejects[0].as_dict() == {"name": "a.jpg", "word_id": None, "reason": f"image has no entry in {ann}"}
    assert listing.total == 3  # notes.txt is not an image


def test_entry_without_an_image_file_is_listed_for_the_pipeline_to_reject(tmp_path: Path) -> None:
    _json_layout(tmp_path, {"images": {"gone.jpg": {"words": {}}}}, [])
    listing = list_source(tmp_path, "train", JSON)
    assert [s.name for s in listing.samples] == ["gone.jpg"]
    assert not listing.samples[0].image_path.exists()


@pytest.mark.parametrize(
    "entry, reason",
    [
        ([1, 2], "entry for a.jpg must be an object with a 'words' object"),
        ({"words": [QUAD]}, "'words' of a.jpg must be an object keyed by word id"),
    ],
)
def test_malformed_entry_rejects_the_sample(tmp_path: Path, entry: object, reason: str) -> None:
    _json_layout(tmp_path, {"images": {"a.jpg": entry, "b.jpg": {"words": {}}}}, ["a.jpg", "b.jpg"])
    listing = list_source(tmp_path, "train", JSON)
    assert listing.rejects == [Skip("a.jpg", reason)]
    assert [s.name for s in listing.samples] == ["b.jpg"]


def test_entry_name_that_is_not_a_plain_file_name_is_rejected(tmp_path: Path) -> None:
    ann = _json_layout(tmp_path, {"images": {"../x.jpg": {"words": {}}}}, [])
    listing = list_source(tmp_path, "train", JSON)
    assert listing.rejects == [Skip("../x.jpg", f"image name '../x.jpg' in {ann} is not a plain file name")]


def test_bad_words_are_skipped_with_name_word_id_and_reason(tmp_path: Path) -> None:
    raw = (
        '{"images": {"a.jpg": {"words": {'
        '"01": {"points": [[1, 2], [3, 4]], "transcription": "two"},'
        '"02": {"points": [[1, 2], [NaN, 4], [5, 6]]},'
        '"03": {"points": [[1, 2], [3, Infinity], [5, 6]]},'
        '"04": {"points": [[1, 2], ["x", 4], [5, 6]]},'
        '"05": {"points": [[1, 2], ["3", 4], [5, 6]]},'
        '"06": {"points": [[1, 2], [true, 4], [5, 6]]},'
        '"07": {"points": [[1, 2], [3, 4, 0], [5, 6]]},'
        '"08": {"points": [1, 2, 3, 4, 5, 6]},'
        '"09": {"points": null},'
        '"10": {"transcription": "no points"},'
        '"11": "just text",'
        '"12": {"points": [[1, 2], [3, 1e400], [5, 6]]},'
        '"13": {"points": [[0, 0], [8, 0], [8, 3]], "transcription": "kept"}'
        '}}}}'
    ).encode()
    _json_layout(tmp_path, raw=raw, images=["a.jpg"])
    listing = list_source(tmp_path, "train", JSON)
    sample = listing.samples[0]
    assert [(w.word_id, w.text) for w in sample.words] == [("13", "kept")]
    assert [(s.name, s.word_id, s.reason) for s in sample.skips] == [
        ("a.jpg", "01", "polygon has 2 points, need at least 3"),
        ("a.jpg", "02", "points contain NaN or infinity"),
        ("a.jpg", "03", "points contain NaN or infinity"),
        ("a.jpg", "04", "points are not numbers: 'x' in ['x', 4]"),
        ("a.jpg", "05", "points are not numbers: '3' in ['3', 4]"),
        ("a.jpg", "06", "points are not numbers: True in [True, 4]"),
        ("a.jpg", "07", "points must be [x, y] pairs, got a point with 3 values: [3, 4, 0]"),
        ("a.jpg", "08", "points must be a list of [x, y] pairs, got [1, 2, 3, 4, 5, 6]"),
        ("a.jpg", "09", "points must be a list of [x, y] pairs, got None"),
        ("a.jpg", "10", "word has no 'points'"),
        ("a.jpg", "11", "word must be an object with 'points', got 'just text'"),
        ("a.jpg", "12", "points contain NaN or infinity"),
    ]
    assert listing.rejects == []


def test_duplicate_image_names_are_an_error(tmp_path: Path) -> None:
    raw = b'{"images": {"a.jpg": {"words": {}}, "b.jpg": {}, "a.jpg": {"words": {}}}}'
    ann = _json_layout(tmp_path, raw=raw, images=["a.jpg", "b.jpg"])
    with pytest.raises(SourceError) as info:
        list_source(tmp_path, "train", JSON)
    assert str(info.value) == f"{ann}: key 'a.jpg' appears twice; remove or rename one of them"


def test_duplicate_word_ids_are_an_error(tmp_path: Path) -> None:
    raw = b'{"images": {"a.jpg": {"words": {"7": {"points": []}, "7": {"points": []}}}}}'
    ann = _json_layout(tmp_path, raw=raw, images=["a.jpg"])
    with pytest.raises(SourceError, match="appears twice") as info:
        list_source(tmp_path, "train", JSON)
    assert str(info.value) == f"{ann}: key '7' appears twice; remove or rename one of them"


@pytest.mark.parametrize(
    "raw, problem",
    [
        (b'{"images": {\n  "a.jpg": {"words": {}}\n  "b.jpg": {}\n}}', "is not valid JSON: Expecting ',' delimiter "
                                                                        "at line 3 column 3"),
        (b'{"images": {}}\n{', "is not valid JSON: Extra data at line 2 column 1"),
        (b"", "is not valid JSON: Expecting value at line 1 column 1"),
        (b'{"images": {\n "caf\xe9.jpg": {}}}', "is not UTF-8 text: byte 0xe9 at line 2 column 6 (invalid "
                                                "continuation byte); save the file as UTF-8"),
        (b'\xef\xbb\xbf{"images": \xff}', "is not UTF-8 text: byte 0xff at line 1 column 15 (invalid start byte); "
                                          "save the file as UTF-8"),
    ],
)
def test_unreadable_json_is_an_error_with_line_and_column(tmp_path: Path, raw: bytes, problem: str) -> None:
    ann = _json_layout(tmp_path, raw=raw, images=[])
    with pytest.raises(SourceError) as info:
        list_source(tmp_path, "train", JSON)
    assert str(info.value) == f"{ann} {problem}"


def test_json_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    body = json.dumps({"images": {"a.jpg": {"words": {"1": {"points": QUAD, "transcription": "é"}}}}})
    _json_layout(tmp_path, raw=b"\xef\xbb\xbf" + body.encode("utf-8"), images=["a.jpg"])
    assert _words(list_source(tmp_path, "train", JSON), "a.jpg") == [("1", QUAD, "é", False)]


@pytest.mark.parametrize("doc", [[], {"image": {}}, {"images": []}])
def test_json_of_the_wrong_shape_is_an_error(tmp_path: Path, doc: object) -> None:
    ann = _json_layout(tmp_path, doc, [])
    with pytest.raises(SourceError) as info:
        list_source(tmp_path, "train", JSON)
    assert str(info.value) == f'{ann} must hold {{"images": {{name: {{"words": ...}}}}}}'


def test_missing_folders_and_files_are_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as info:
        list_source(tmp_path / "nope", "train", JSON)
    assert str(info.value) == f"source folder {tmp_path / 'nope'} does not exist"
    with pytest.raises(UsageError) as info:  # no split at all: bad usage (exit 2), naming the layout
        list_source(tmp_path, "train", JSON)
    assert str(info.value) == (f"{tmp_path} has no split 'train' (source.format json); it has none "
                               "(ROOT/jsons/<split>.json and ROOT/images/<split>/ expected)")
    (tmp_path / "images" / "train").mkdir(parents=True)  # the images there: the annotations are named
    with pytest.raises(SourceError) as info:
        list_source(tmp_path, "train", JSON)
    ann = tmp_path / "jsons" / "train.json"
    assert str(info.value) == f"{ann} does not exist: expected annotations in ROOT/jsons/train.json"
    (tmp_path / "images" / "train").rmdir()
    ann.parent.mkdir()
    ann.write_text('{"images": {}}')
    with pytest.raises(SourceError) as info:
        list_source(tmp_path, "train", JSON)
    assert str(info.value) == f"{tmp_path / 'images' / 'train'} does not exist: expected images in ROOT/images/train/"


@pytest.mark.parametrize("split", ["", "..", ".", "a/b", "a\\b"])
def test_split_must_be_a_plain_folder_name(tmp_path: Path, split: str) -> None:
    with pytest.raises(UsageError) as info:
        list_source(tmp_path, split, JSON)
    assert str(info.value) == f"split {split!r} must be a plain folder name such as train or val"


# ----------------------------------------------------------------------------- ICDAR layout


def test_icdar_layout_with_commas_bom_crlf_and_blank_lines(tmp_path: Path) -> None:
    gt = (
        "\ufeff1,2,11,2,11,7.5,1,7.5,TOTAL: 1,234.00\r\n"
        "\r\n"
        "0,0,4,0,4,3,0,3,###\r\n"
        " 5 , 5 ,9,5,9,9,5,9,a,b,,c\r\n"
        "5,5,9,5,9,9,5,9,\r\n"
        "\n"
    ).encode("utf-8")
    gt_dir = _icdar_layout(tmp_path, {"gt_a.txt": gt}, ["a.jpg"])
    listing = list_source(tmp_path, "train", ICDAR)
    assert listing.format == "icdar"
    assert _words(listing, "a.jpg") == [
        ("0001", QUAD, "TOTAL: 1,234.00", False),
        ("0003", [[0.0, 0.0], [4.0, 0.0], [4.0, 3.0], [0.0, 3.0]], "###", True),
        ("0004", [[5.0, 5.0], [9.0, 5.0], [9.0, 9.0], [5.0, 9.0]], "a,b,,c", False),
        ("0005", [[5.0, 5.0], [9.0, 5.0], [9.0, 9.0], [5.0, 9.0]], "", False),
    ]
    expected = hashlib.sha256(b"gt_a.txt\x00" + hashlib.sha256((gt_dir / "gt_a.txt").read_bytes()).digest())
    assert listing.annotation_sha256 == expected.hexdigest()


def test_icdar_line_separators_inside_a_transcription_do_not_split_the_line(tmp_path: Path) -> None:
    gt = "1,2,11,2,11,7.5,1,7.5,A\u2028B\x0cC\u0085D\n0,0,4,0,4,3,0,3,next\n".encode("utf-8")
    _icdar_layout(tmp_path, {"gt_a.txt": gt}, ["a.jpg"])
    words = _words(list_source(tmp_path, "train", ICDAR), "a.jpg")
    assert [(word_id, text) for word_id, _, text, _ in words] == [("0001", "A\u2028B\x0cC\u0085D"), ("0002", "next")]


def test_icdar_bad_lines_are_skipped_with_file_and_line_number(tmp_path: Path) -> None:
    gt = (
        "1,2,11,2,11,7.5,1,7.5,ok\n"
        "1,2,x,2,11,7.5,1,7.5,bad number\n"
        "1,2,3,4,short\n"
        "1,2,11,2,nan,7.5,1,7.5,nan\n"
        "1,1,2,2,3,3,1,1,zero area is the pipeline's business\n"
    ).encode()
    _icdar_layout(tmp_path, {"gt_a.b.txt": gt}, ["a.b.jpg"])
    sample = list_source(tmp_path, "train", ICDAR).samples[0]
    assert [w.word_id for w in sample.words] == ["0001", "0005"]
    assert [(s.name, s.word_id, s.reason) for s in sample.skips] == [
        ("a.b.jpg", "0002", "gt_a.b.txt line 2: coordinates are not numbers: '1,2,x,2,11,7.5,1,7.5'"),
        ("a.b.jpg", "0003", "gt_a.b.txt line 3: expected 8 coordinates then a transcription, got '1,2,3,4,short'"),
        ("a.b.jpg", "0004", "gt_a.b.txt line 4: points contain NaN or infinity"),
    ]


def test_icdar_missing_and_orphan_ground_truth_are_rejects(tmp_path: Path) -> None:
    gt_dir = _icdar_layout(
        tmp_path,
        {"gt_a.txt": b"1,2,11,2,11,7.5,1,7.5,x\n", "gt_orphan.txt": b"", "gt_a.txt.bak": b"", "readme.txt": b""},
        ["a.jpg", "b.png"],
    )
    listing = list_source(tmp_path, "train", ICDAR)
    folder = tmp_path / "images" / "train"
    assert [(s.index, s.name) for s in listing.samples] == [(0, "a.jpg")]
    assert listing.rejects == [
        Skip("b.png", f"no ground truth file {gt_dir / 'gt_b.txt'}"),
        Skip("gt_orphan.txt", f"ground truth {gt_dir / 'gt_orphan.txt'} has no image in {folder}"),
    ]
    assert listing.total == 3


def test_icdar_ground_truth_that_is_not_utf8_is_a_reject(tmp_path: Path) -> None:
    gt_dir = _icdar_layout(tmp_path, {"gt_a.txt": b"1,2,11,2,11,7.5,1,7.5,ok\n1,2,11,2,11,7.5,1,7.5,caf\xe9\n"},
                           ["a.jpg"])
    listing = list_source(tmp_path, "train", ICDAR)
    assert listing.samples == []
    assert listing.rejects == [Skip("a.jpg", f"ground truth {gt_dir / 'gt_a.txt'} is not UTF-8 text: byte 0xe9 at "
                                             "line 2 column 26 (invalid continuation byte); save the file as UTF-8")]


def test_icdar_images_sharing_a_stem_are_an_error(tmp_path: Path) -> None:
    gt_dir = _icdar_layout(tmp_path, {}, ["a.jpg", "a.png"])
    with pytest.raises(SourceError) as info:
        list_source(tmp_path, "train", ICDAR)
    assert str(info.value) == (
        f"{tmp_path / 'images' / 'train'}: a.jpg and a.png share the stem 'a', so both would use "
        f"{gt_dir / 'gt_a.txt'}; rename one of them"
    )


def test_icdar_names_with_several_dots(tmp_path: Path) -> None:
    name = "drp.en_ko.in_house.selectstar_000058.jpg"
    _icdar_layout(tmp_path, {"gt_drp.en_ko.in_house.selectstar_000058.txt": b"1,2,11,2,11,7.5,1,7.5,x\n"}, [name])
    listing = list_source(tmp_path, "train", ICDAR)
    assert listing.rejects == []
    assert _words(listing, name) == [("0001", QUAD, "x", False)]


def test_icdar_without_a_gt_folder_is_an_error(tmp_path: Path) -> None:
    _images(tmp_path, "val", [])
    with pytest.raises(SourceError) as info:
        list_source(tmp_path, "val", ICDAR)
    assert str(info.value) == (
        f"{tmp_path / 'gts' / 'val'} does not exist: expected ground truth in ROOT/gts/val/gt_<stem>.txt"
    )


def test_icdar_polygon_mode_reads_any_even_number_of_coordinates(tmp_path: Path) -> None:
    gt = (
        "0,0,10,0,20,5,10,10,0,10,-2,5,six points, and a comma\n"
        "0,0,10,0,10,10,0,10,12.50\n"
        "0,0,10,0,10,10,0,10,7,odd count\n"
        "0,0,10,0,text\n"
        "just text\n"
    ).encode()
    _icdar_layout(tmp_path, {"gt_a.txt": gt}, ["a.jpg"])
    sample = list_source(tmp_path, "train", POLYGON).samples[0]
    assert [(w.word_id, w.points.tolist(), w.text) for w in sample.words] == [
        ("0001", [[0, 0], [10, 0], [20, 5], [10, 10], [0, 10], [-2, 5]], "six points, and a comma"),
        ("0002", [[0, 0], [10, 0], [10, 10], [0, 10]], "12.50"),
        ("0003", [[0, 0], [10, 0], [10, 10], [0, 10]], "7,odd count"),
    ]
    assert [(s.word_id, s.reason) for s in sample.skips] == [
        ("0004", "gt_a.txt line 4: polygon has 2 points, need at least 3"),
        ("0005", "gt_a.txt line 5: expected at least 6 coordinates then a transcription, got 'just text'"),
    ]


# ----------------------------------------------------------------------------- parsers


def test_parse_points_accepts_numbers_and_numeric_arrays() -> None:
    points, problem = parse_points([[1, 2], [3.5, 4], [5, -6]], 1024)
    assert problem is None and points.dtype == np.float64
    assert points.tolist() == [[1.0, 2.0], [3.5, 4.0], [5.0, -6.0]]
    points, problem = parse_points(np.array([[1, 2], [3, 4], [5, 6]], dtype=np.int32), 1024)
    assert problem is None and points.dtype == np.float64
    assert parse_points(np.array([["a", "b"]] * 3), 1024) == (None, "points are not numbers (array of <U1)")
    assert parse_points(np.zeros((3, 3)), 1024) == (None, "points must be a list of [x, y] pairs, got shape [3, 3]")


def test_parse_icdar_line_quad_keeps_commas_in_the_text() -> None:
    points, text, problem = parse_icdar_line("1,2,11,2,11,7.5,1,7.5,RM 1,000.00", ICDAR)
    assert (points.tolist(), text, problem) == (QUAD, "RM 1,000.00", None)
    points, text, problem = parse_icdar_line("1,2,11,2,11,7.5,1,7.5", ICDAR)
    assert (points.tolist(), text, problem) == (QUAD, None, None)


# ----------------------------------------------------------------------------- real receipts


@pytest.mark.parametrize("split, count", [("train", 110), ("val", 40)])
def test_real_receipts_read_the_same_in_both_layouts(sroie_root: Path, split: str, count: int) -> None:
    from_json = list_source(sroie_root, split, JSON)
    from_icdar = list_source(sroie_root, split, ICDAR)
    for listing in (from_json, from_icdar):
        assert len(listing.samples) == count
        assert listing.rejects == []
        assert all(s.skips == () for s in listing.samples)
        assert all(s.name.startswith("sroie_") and s.image_path.is_file() for s in listing.samples)
    assert [s.name for s in from_json.samples] == [s.name for s in from_icdar.samples]
    words = 0
    for a, b in zip(from_json.samples, from_icdar.samples):
        assert 18 <= len(a.words) <= 153, a.name
        assert [w.word_id for w in a.words] == [w.word_id for w in b.words], a.name
        assert [w.text for w in a.words] == [w.text for w in b.words], a.name
        assert [w.dont_care for w in a.words] == [w.dont_care for w in b.words], a.name
        for wa, wb in zip(a.words, b.words):
            assert wa.points.shape == (4, 2)
            np.testing.assert_array_equal(wa.points, wb.points, err_msg=f"{a.name} {wa.word_id}")
        words += len(a.words)
    assert words > 18 * count
