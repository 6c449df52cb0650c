"""Where a detector's misses come from: `wds-ocr predict` output against a source split.

    wds-ocr predict --checkpoint C --out PRED --no-overlay SOURCE/images/val/*
    .venv/bin/python tools/miss_analysis.py PRED SOURCE --split val

Matches detections to ground truth one to one at IoU > 0.5 (greedy, highest IoU first, as the
ICDAR 2015 protocol does; don't-care words are left out) and sorts each unmatched word by what the
detector did there:
- none: no detection covers 10% of itself with the word;
- merged: one detection covers it and 30% of another word;
- split: two or more detections cover it;
- low IoU: one detection of about the right place and the wrong size.
Each class is also counted for words of at most 2 characters (single digits, "SR", "*"), and
unmatched detections are counted as touching a word or not. The most often missed transcriptions
follow, with the images that hold them (a convention one vendor's receipts share shows up there).
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np
from shapely.geometry import Polygon

from wds_ocr.config import load_config
from wds_ocr.data.images import read_image_bytes
from wds_ocr.data.pipeline import process_sample
from wds_ocr.data.sources import list_source


def _shape(points) -> Polygon:
    return Polygon(np.asarray(points, dtype=np.float64)).buffer(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("predictions", type=Path)
    parser.add_argument("source", type=Path)
    parser.add_argument("--split", default="val")
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--texts", type=int, default=10, help="list the N most often missed transcriptions")
    args = parser.parse_args()
    config = load_config(None, ["transform.size=320"])  # ground truth in original coordinates only
    counts: collections.Counter = collections.Counter()
    short: collections.Counter = collections.Counter()
    examples: dict[str, list[str]] = collections.defaultdict(list)
    missed_in: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for sample in list_source(args.source, args.split, config.source).samples:
        found = args.predictions / f"{Path(sample.name).stem}.json"
        if not found.is_file():
            raise SystemExit(f"{found}: no prediction for {sample.name}; run wds-ocr predict on the split first")
        meta = process_sample(sample, config, read_image_bytes(sample.image_path, sample.name)).meta
        texts = [w.text or "" for w in sample.words]
        truths = [(_shape(p), texts[i] if i < len(texts) else "") for i, (p, ignored) in
                  enumerate(zip(meta.polygons_original, meta.dont_care)) if not ignored]
        detections = [_shape(d["points"]) for d in json.loads(found.read_text())["polygons"]]
        iou = np.zeros((len(truths), len(detections)))
        for i, (truth, _) in enumerate(truths):
            for j, detection in enumerate(detections):
                if truth.intersects(detection):
                    inter = truth.intersection(detection).area
                    iou[i, j] = inter / (truth.area + detection.area - inter)
        matched_truths, matched_detections = set(), set()
        for i, j in sorted(np.argwhere(iou > 0.5).tolist(), key=lambda ij: -iou[ij[0], ij[1]]):
            if i not in matched_truths and j not in matched_detections:
                matched_truths.add(i)
                matched_detections.add(j)
        counts["words"] += len(truths)
        counts["matched"] += len(matched_truths)
        for i, (truth, text) in enumerate(truths):
            if i in matched_truths:
                continue
            covering = [j for j, d in enumerate(detections)
                        if d.intersects(truth) and d.intersection(truth).area > 0.1 * d.area]
            if not covering:
                kind = "none"
            elif len(covering) > 1:
                kind = "split"
            else:
                d = detections[covering[0]]
                others = any(k != i and d.intersects(t) and d.intersection(t).area > 0.3 * t.area
                             for k, (t, _) in enumerate(truths))
                kind = "merged" if others else "low IoU"
            counts[kind] += 1
            missed_in[text.strip()][sample.name] += 1
            if len(text.strip()) <= 2:
                short[kind] += 1
            if len(examples[kind]) < args.examples:
                examples[kind].append(f"{sample.name}: {text!r} (best IoU {iou[i].max() if detections else 0:.2f})")
        for j, d in enumerate(detections):
            if j not in matched_detections:
                counts["false, touching a word" if any(d.intersects(t) for t, _ in truths) else "false, on nothing"] += 1
        counts["detections"] += len(detections)
    missed = counts["words"] - counts["matched"]
    print(f"{counts['words']} words, {counts['matched']} matched, {missed} missed; {counts['detections']} detections")
    for kind in ("none", "merged", "split", "low IoU"):
        print(f"  missed, {kind:8s} {counts[kind]:5d}  (of them at most 2 characters: {short[kind]})")
        for line in examples[kind]:
            print(f"      {line}")
    for kind in ("false, touching a word", "false, on nothing"):
        print(f"  {kind}: {counts[kind]}")
    if args.texts:
        print(f"most often missed transcriptions (the {args.texts} most frequent; images holding them):")
        totals = collections.Counter({text: sum(images.values()) for text, images in missed_in.items()})
        for text, count in totals.most_common(args.texts):
            images = ", ".join(f"{name} x{n}" for name, n in missed_in[text].most_common(4))
            more = len(missed_in[text]) - 4
            print(f"  {text!r:14s} {count:4d}  in {images}{f' and {more} more' if more > 0 else ''}")


if __name__ == "__main__":
    main()
