#!/usr/bin/env bash
# Fine-tune the PP-OCRv4 mobile detector on real receipts and score it beside the off-the-shelf one.
#
#   tools/recipes/sroie-ppocr.sh [cpu|gpu] [SOURCE] [OUT]
#
# cpu (default): tools/recipes/sroie-ppocr.toml on a 2-core CPU (see docs/BENCHMARKS.md, "Detectors").
# gpu:           tools/recipes/sroie-ppocr-gpu.toml: the same records, longer, on whole records.
# SOURCE: a dataset in the receipt layout with train and val splits [../shared/data/sroie-dev].
# OUT:    the run folder [runs/sroie-ppocr-<recipe>]; shards go to shards/sroie-<size>/{train,val}.
#
# Stages: import the detector from the rapidocr-onnxruntime wheel (tools/_env.sh installs it),
# build the shards at the recipe's transform.size, fine-tune with train --init, choose the
# post-processing thresholds of the imported and of the fine-tuned detector on the TRAIN split
# (evaluate --sweep --save-best: pretrained-thresholds.pt, tuned.pt; for the imported one, then
# the growth of lone glyphs' boxes at its thresholds: pretrained-tuned.pt), evaluate tuned.pt on
# val from the shards and through the live path (they must agree), then tools/bench_detectors.py:
# PP-OCRv4 as shipped, the imported detector, and the fine-tuned one, side by side on val. Last,
# final.pt: the better on val of pretrained-tuned.pt and tuned.pt (the detector to deploy).
set -euo pipefail
recipe="${1:-cpu}"
case "$recipe" in
  cpu) config="tools/recipes/sroie-ppocr.toml" ;;
  gpu) config="tools/recipes/sroie-ppocr-gpu.toml" ;;
  *) echo "error: no recipe $recipe (use cpu or gpu)" >&2; exit 2 ;;
esac
source "$(dirname "${BASH_SOURCE[0]}")/../_env.sh"   # .venv with wds-ocr; the working folder is the repo
source_dir="${2:-../shared/data/sroie-dev}"
out="${3:-runs/sroie-ppocr-$recipe}"
wds=.venv/bin/wds-ocr
size=$(.venv/bin/python -c "import sys; from wds_ocr.config import load_config; print(load_config(sys.argv[1]).transform.size)" "$config")
shards="shards/sroie-$size"
pretrained=pretrained/ppocrv4_det.pt
started=$SECONDS
stage() { echo "== $1 (at $((SECONDS - started)) s)"; }

stage "import-ppocr"
"$wds" import-ppocr --out "$pretrained" --set "transform.size=$size" --set evaluation.crop_to_content=true
stage "build-shards ($size px)"
for split in train val; do
  "$wds" build-shards "$source_dir" --split "$split" --out "$shards/$split" --quiet --config "$config"
done
stage "train"
"$wds" train --init "$pretrained" --shards "$shards/train" --val-shards "$shards/val" --out "$out" --config "$config"
stage "post-processing chosen on the train split"
# 126 settings scored on the same maps; a fine-tuned model's kernels are fuller than PP-OCR's, so
# DB's thresh 0.3 / unclip 1.5 merge neighbouring lines (docs/BENCHMARKS.md, "Detectors").
sweep=(--sweep thresh=0.2,0.3,0.4,0.5,0.6,0.7,0.8 --sweep box_thresh=0.5,0.6,0.7
       --sweep unclip_ratio=1.1,1.2,1.3,1.4,1.5,1.6)
"$wds" evaluate --checkpoint "$pretrained" --shards "$shards/train" --quiet "${sweep[@]}" \
  --save-best "$out/pretrained-thresholds.pt" | tail -4
# Then, at those thresholds, how far lone glyphs' boxes grow (postprocess.glyph_height; 0 keeps
# DB's boxes): PP-OCR's box of a narrow "1" is too short for its word.
"$wds" evaluate --checkpoint "$out/pretrained-thresholds.pt" --shards "$shards/train" --quiet \
  --sweep glyph_height=0,0.7,0.8,0.9,1.0 --sweep glyph_size=0.8,1.0,1.3 \
  --save-best "$out/pretrained-tuned.pt" | tail -4
"$wds" evaluate --checkpoint "$out/last.pt" --shards "$shards/train" --quiet "${sweep[@]}" \
  --save-best "$out/tuned.pt" | tail -4
stage "evaluate"
"$wds" evaluate --checkpoint "$out/tuned.pt" --shards "$shards/val" --json --quiet > "$out/eval-shards.json"
"$wds" evaluate --checkpoint "$out/tuned.pt" --source "$source_dir" --split val --json --quiet > "$out/eval-source.json"
stage "side by side with PP-OCRv4"
.venv/bin/python tools/bench_detectors.py "$source_dir" --split val --checkpoint "$pretrained" \
  --checkpoint "$out/pretrained-tuned.pt" --checkpoint "$out/last.pt" --checkpoint "$out/tuned.pt" \
  --json "$out/detectors.json" | tee "$out/detectors.txt"
stage "done"
.venv/bin/python - "$out" "$((SECONDS - started))" <<'PY'
import json, shutil, sys
from pathlib import Path
out, seconds = Path(sys.argv[1]), int(sys.argv[2])
a, b = (json.loads((out / f"eval-{kind}.json").read_text()) for kind in ("shards", "source"))
fields = ("precision", "recall", "hmean", "matched", "gt_care", "det_care")
same = all(a[f] == b[f] for f in fields)
rows = json.loads((out / "detectors.json").read_text())
peer, imported, imported_tuned, fine_tuned, tuned = rows
print(f"tuned.pt, val from shards:    P {a['precision']:.4f}  R {a['recall']:.4f}  H-mean {a['hmean']:.4f}")
print(f"tuned.pt, val from live path: P {b['precision']:.4f}  R {b['recall']:.4f}  H-mean {b['hmean']:.4f}")
print(f"shards and live path agree: {'yes' if same else 'NO'}")
for label, row in (("imported", imported), ("imported, post-processing from train", imported_tuned),
                   ("fine-tuned", fine_tuned), ("fine-tuned, thresholds from train", tuned)):
    print(f"{label:37s} {row['hmean']:.4f} vs PP-OCRv4 {peer['hmean']:.4f}: {row['hmean'] - peer['hmean']:+.4f} H-mean")
# The detector this recipe hands over: of the two whose post-processing was chosen on train, the one
# that scores higher on val (the held-out split; score final.pt on receipts neither split holds).
candidates = {"pretrained-tuned.pt": imported_tuned, "tuned.pt": tuned}
chosen = max(candidates, key=lambda name: candidates[name]["hmean"])
shutil.copyfile(out / chosen, out / "final.pt")
print(f"final.pt: a copy of {chosen} (val H-mean {candidates[chosen]['hmean']:.4f}, "
      f"{candidates[chosen]['hmean'] - peer['hmean']:+.4f} against PP-OCRv4)")
print(f"wall time {seconds} s ({seconds / 60:.1f} min)")
(out / "recipe.json").write_text(json.dumps({"shards": a, "source": b, "agree": same, "detectors": rows,
                                             "final": chosen, "wall_seconds": seconds},
                                            indent=1, sort_keys=True) + "\n")
sys.exit(0 if same else 1)
PY
