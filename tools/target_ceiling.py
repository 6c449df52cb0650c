"""What H-mean would a perfect model reach under given target and post-processing settings?

Feeds each sample's own gt map (the training target, as a 0/1 probability map) into DB
post-processing and the ICDAR 2015 metric, in original image coordinates, exactly as
``wds-ocr evaluate`` scores a model. Words the targets leave out (too small, shrink vanished) are
not in the gt map, so they count as misses, and a shrink that unclip cannot undo shows up as boxes
that miss IoU 0.5. A model's blurrier maps can land a little above or below this figure; it says
what the settings themselves allow.

    .venv/bin/python tools/target_ceiling.py ../shared/data/sroie-dev --split val \\
        --set targets.shrink_ratio=0.4 --set targets.min_text_size=8 --unclip 1.5,2.0 --min-size 2,3
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import numpy as np

from wds_ocr.config import load_config
from wds_ocr.data.coverage import Coverage
from wds_ocr.data.pipeline import process_sample
from wds_ocr.data.sources import list_source
from wds_ocr.eval.metric import DetectionMetric
from wds_ocr.infer.evaluate import detect


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source")
    parser.add_argument("--split", default="val")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.field=value")
    parser.add_argument("--unclip", type=_floats, default=None, help="unclip ratios to try [the config's]")
    parser.add_argument("--min-size", type=_floats, default=None, help="post-processing min sizes [the config's]")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    config = load_config(None, args.overrides)
    processed = [process_sample(s, config) for s in list_source(args.source, args.split, config.source).samples]
    coverage = sum((Coverage.from_codes(p.meta.left_out) for p in processed), Coverage())
    rows = []
    for unclip, min_size in itertools.product(args.unclip or [config.postprocess.unclip_ratio],
                                              args.min_size or [config.postprocess.min_size]):
        post = config.postprocess.model_copy(update={"unclip_ratio": unclip, "min_size": min_size})
        metric = DetectionMetric()
        for sample in processed:
            found = detect(sample.targets.gt.astype(np.float32), sample.meta.inverse_matrix,
                           sample.meta.original_size, post)
            metric.update(list(sample.meta.polygons_original), sample.meta.dont_care, [d.polygon for d in found])
        score = metric.score()
        rows.append({"unclip_ratio": unclip, "min_size": min_size, "precision": score.precision,
                     "recall": score.recall, "hmean": score.hmean})
    result = {"source": args.source, "split": args.split, "samples": len(processed),
              "record_settings": config.record_settings(), "coverage": coverage.as_dict(), "ceiling": rows}
    if args.json:
        print(json.dumps(result, indent=1, sort_keys=True))
        return 0
    targets = config.targets
    print(f"{args.split}: {len(processed)} samples at {config.transform.size} px, shrink_ratio "
          f"{targets.shrink_ratio:g}, min_text_size {targets.min_text_size:g}")
    print(coverage.summary())
    for row in rows:
        print(f"  unclip {row['unclip_ratio']:g}  min_size {row['min_size']:g}:  P {row['precision']:.3f}  "
              f"R {row['recall']:.3f}  H-mean {row['hmean']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
