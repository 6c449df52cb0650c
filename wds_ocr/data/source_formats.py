"""The two annotation layouts a source can have: ``json`` (jsons/<split>.json, one entry per image)
and ``icdar`` (gts/<split>/gt_<stem>.txt, one text line per word). ``sources.list_source`` picks one
by ``source.format``; both record every problem as a reject or a skipped word."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from wds_ocr import jsonio
from wds_ocr.config import SourceConfig
from wds_ocr.errors import SourceError

from wds_ocr.data.sources import (MAX_ANNOTATION_BYTES, MAX_GROUND_TRUTH_BYTES, Skip, SourceListing, SourceSample, Word,
                                  check_name, decode_utf8, images_dir, is_dont_care, listed_images, parse_points,
                                  printable, read_regular_file, reject_duplicates, shown, text_problem, undecodable_at)


def _words_from_json(name: str, entry: Any, config: SourceConfig) -> tuple[list[Word], list[Skip], str | None]:
    if not isinstance(entry, dict):
        return [], [], f"entry for {name} must be an object with a 'words' object"
    raw_words = entry.get("words", {})
    if raw_words is None:
        raw_words = {}
    if not isinstance(raw_words, dict):
        return [], [], f"'words' of {name} must be an object keyed by word id"
    if len(raw_words) > config.max_words_per_image:
        return [], [], (f"{len(raw_words):,} words, over the limit of {config.max_words_per_image:,} per image "
                        "(source.max_words_per_image)")
    words: list[Word] = []
    skips: list[Skip] = []
    for word_id in sorted(raw_words):
        raw = raw_words[word_id]
        problem = text_problem(word_id, "word id", config.max_word_id_chars, "source.max_word_id_chars")
        if problem is not None:
            skips.append(Skip(name, problem, printable(word_id)))
            continue
        if not isinstance(raw, dict):
            skips.append(Skip(name, f"word must be an object with 'points', got {shown(raw)}", word_id))
            continue
        if "points" not in raw:
            skips.append(Skip(name, "word has no 'points'", word_id))
            continue
        points, problem = parse_points(raw["points"], config.max_polygon_points)
        if problem is not None:
            skips.append(Skip(name, problem, word_id))
            continue
        text = raw.get("transcription")
        if text is not None and not isinstance(text, str):
            text = str(text)
        problem = None if text is None else text_problem(text, "transcription", config.max_transcription_chars,
                                                          "source.max_transcription_chars")
        if problem is not None:
            skips.append(Skip(name, problem, word_id))
            continue
        words.append(Word(word_id, points, text, is_dont_care(text, config)))
    return words, skips, None


def list_json(root: Path, split: str, config: SourceConfig) -> SourceListing:
    ann = root / "jsons" / f"{split}.json"
    try:
        raw_bytes = read_regular_file(ann, MAX_ANNOTATION_BYTES)
    except FileNotFoundError:
        raise SourceError(f"{ann} does not exist: expected annotations in ROOT/jsons/{split}.json") from None
    except OSError as exc:
        raise SourceError(f"{ann} cannot be read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise SourceError(f"{ann} {exc}; annotations must be a regular JSON file") from None
    try:
        doc = jsonio.loads(decode_utf8(raw_bytes), object_pairs_hook=lambda p: reject_duplicates(p, str(ann)))
    except UnicodeDecodeError as exc:
        raise SourceError(f"{ann} is not UTF-8 text: {undecodable_at(raw_bytes, exc)}") from None
    except json.JSONDecodeError as exc:
        raise SourceError(f"{ann} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise SourceError(f"{ann} is nested too deeply to be an annotation file") from None
    except jsonio.JsonNumberError as exc:
        raise SourceError(f"{ann} {exc}; no annotation needs such a number") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), dict):
        raise SourceError(f'{ann} must hold {{"images": {{name: {{"words": ...}}}}}}')
    folder = images_dir(root, split)
    listing = SourceListing(root, split, "json", hashlib.sha256(raw_bytes).hexdigest())
    entries = doc["images"]
    on_disk = set(listed_images(folder))
    names = sorted(set(entries) | on_disk)
    for index, name in enumerate(names):
        if name not in entries:
            listing.rejects.append(Skip(printable(name), f"image has no entry in {ann}"))
            continue
        problem = check_name(name, str(ann), config.max_name_chars)
        if problem is not None:
            listing.rejects.append(Skip(printable(name), problem))
            continue
        words, skips, problem = _words_from_json(name, entries[name], config)
        if problem is not None:
            listing.rejects.append(Skip(name, problem))
            continue
        listing.samples.append(SourceSample(index, name, folder / name, tuple(words), tuple(skips)))
    return listing


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_icdar_line(line: str, config: SourceConfig) -> tuple[np.ndarray | None, str | None, str | None]:
    """(points, transcription, problem) for one ICDAR text line.

    The transcription is everything after the coordinates and may itself hold commas. With
    ``icdar_coords="quad"`` the first 8 fields are the coordinates (ICDAR 2015); with "polygon"
    the leading numeric fields are, taken as whole pairs, always leaving the last field as text.
    """
    fields = line.split(",")
    if config.icdar_coords == "quad":
        count = 8
    else:
        numeric = 0
        while numeric < len(fields) - 1 and _is_number(fields[numeric].strip()):
            numeric += 1
        count = numeric - numeric % 2
    if len(fields) < count or count == 0:
        return None, None, f"expected {count or 'at least 6'} coordinates then a transcription, got {shown(line, 200)}"
    coords = fields[:count]
    text = ",".join(fields[count:]) if len(fields) > count else None
    try:
        values = [float(c) for c in coords]
    except ValueError:
        return None, text, f"coordinates are not numbers: {shown(','.join(coords), 200)}"
    points, problem = parse_points(np.asarray(values, dtype=np.float64).reshape(-1, 2), config.max_polygon_points)
    return points, text, problem


def list_icdar(root: Path, split: str, config: SourceConfig) -> SourceListing:
    folder = images_dir(root, split)
    gt_dir = root / "gts" / split
    if not gt_dir.is_dir():
        raise SourceError(f"{gt_dir} does not exist: expected ground truth in ROOT/gts/{split}/gt_<stem>.txt")
    images = listed_images(folder)
    by_stem: dict[str, str] = {}
    for name in images:
        stem = Path(name).stem
        if stem in by_stem:
            raise SourceError(
                f"{folder}: {by_stem[stem]} and {name} share the stem {stem!r}, so both would use "
                f"{gt_dir / f'gt_{stem}.txt'}; rename one of them"
            )
        by_stem[stem] = name
    gt_files = {p.name for p in gt_dir.iterdir() if not p.is_dir() and p.name.startswith("gt_") and p.suffix == ".txt"}
    digest = hashlib.sha256()
    listing = SourceListing(root, split, "icdar", "")
    orphans = sorted(gt_files - {f"gt_{Path(n).stem}.txt" for n in images})
    names = sorted(images + orphans)
    for index, name in enumerate(names):
        if name in gt_files:
            listing.rejects.append(Skip(printable(name), f"ground truth {printable(str(gt_dir / name))} has no image in "
                                                         f"{folder}"))
            continue
        problem = check_name(name, str(folder), config.max_name_chars)
        if problem is not None:
            listing.rejects.append(Skip(printable(name), problem))
            continue
        gt_path = gt_dir / f"gt_{Path(name).stem}.txt"
        try:
            raw_bytes = read_regular_file(gt_path, MAX_GROUND_TRUTH_BYTES)
        except FileNotFoundError:
            listing.rejects.append(Skip(name, f"no ground truth file {gt_path}"))
            continue
        except OSError as exc:
            listing.rejects.append(Skip(name, f"ground truth {gt_path} cannot be read: {exc.strerror or exc}"))
            continue
        except ValueError as exc:
            listing.rejects.append(Skip(name, f"ground truth {gt_path} {exc}"))
            continue
        digest.update(gt_path.name.encode() + b"\x00" + hashlib.sha256(raw_bytes).digest())
        try:
            text = decode_utf8(raw_bytes)
        except UnicodeDecodeError as exc:
            reason = f"ground truth {gt_path} is not UTF-8 text: {undecodable_at(raw_bytes, exc)}"
            listing.rejects.append(Skip(name, reason))
            continue
        words: list[Word] = []
        skips: list[Skip] = []
        lines = sum(1 for line in text.split("\n") if line.strip())
        if lines > config.max_words_per_image:
            listing.rejects.append(Skip(name, f"{gt_path.name} holds {lines:,} words, over the limit of "
                                              f"{config.max_words_per_image:,} per image (source.max_words_per_image)"))
            continue
        # Split on "\n" only: str.splitlines() also splits on characters a transcription may hold
        # (U+0085, U+2028, form feed, ...), which would cut a line in two and shift line numbers.
        for number, line in enumerate(text.split("\n"), start=1):
            line = line.removesuffix("\r")
            if not line.strip():
                continue
            word_id = f"{number:04d}"
            points, transcription, problem = parse_icdar_line(line, config)
            if problem is None and transcription is not None:
                problem = text_problem(transcription, "transcription", config.max_transcription_chars,
                                             "source.max_transcription_chars")
            if problem is not None:
                skips.append(Skip(name, f"{gt_path.name} line {number}: {problem}", word_id))
                continue
            words.append(Word(word_id, points, transcription, is_dont_care(transcription, config)))
        listing.samples.append(SourceSample(index, name, folder / name, tuple(words), tuple(skips)))
    listing.annotation_sha256 = digest.hexdigest()
    return listing


__all__ = ["list_icdar", "list_json", "parse_icdar_line"]
