#!/usr/bin/env bash
# Train DBNet from scratch on real receipts and evaluate it two ways (shards and the live path).
#
#   tools/recipes/sroie.sh [cpu|gpu] [SOURCE] [OUT]
#
# cpu (default): tools/recipes/sroie-cpu.toml, 2000 steps, about 45 minutes on 2 idle Intel Xeon cores
#                (1.24 s a step; 2.0 s on a 2-vCPU AMD EPYC box: 68 minutes there).
# gpu:           tools/recipes/sroie-gpu.toml, DB's 1200-epoch poly schedule on one GPU.
# SOURCE: a dataset in the receipt layout with train and val splits [../shared/data/sroie-dev].
# OUT:    the run folder [runs/sroie-<recipe>]; shards go to shards/sroie/{train,val}.
#
# Prints each stage's time and ends with the val H-mean of the final checkpoint (last.pt) from the
# shards and from the live path, which must agree; both results are kept in OUT as JSON.
set -euo pipefail
recipe="${1:-cpu}"
config="tools/recipes/sroie-$recipe.toml"
if [ ! -f "$(dirname "${BASH_SOURCE[0]}")/sroie-$recipe.toml" ]; then
  echo "error: no recipe $config (use cpu or gpu)" >&2
  exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/../_env.sh"   # .venv with wds-ocr; the working folder is the repo
source_dir="${2:-../shared/data/sroie-dev}"
out="${3:-runs/sroie-$recipe}"
wds=.venv/bin/wds-ocr
shards=shards/sroie
started=$SECONDS
stage() { echo "== $1 (at $((SECONDS - started)) s)"; }

stage "build-shards"
for split in train val; do
  "$wds" build-shards "$source_dir" --split "$split" --out "$shards/$split" --workers 2 --quiet --config "$config"
done
stage "train"
"$wds" train --shards "$shards/train" --val-shards "$shards/val" --out "$out" --config "$config"
stage "evaluate"
"$wds" evaluate --checkpoint "$out/last.pt" --shards "$shards/val" --json --quiet > "$out/eval-shards.json"
"$wds" evaluate --checkpoint "$out/last.pt" --source "$source_dir" --split val --json --quiet > "$out/eval-source.json"
stage "done"
.venv/bin/python - "$out" "$((SECONDS - started))" <<'PY'
import json, sys
from pathlib import Path
out, seconds = Path(sys.argv[1]), int(sys.argv[2])
a, b = (json.loads((out / f"eval-{kind}.json").read_text()) for kind in ("shards", "source"))
fields = ("precision", "recall", "hmean", "matched", "gt_care", "det_care")
same = all(a[f] == b[f] for f in fields)
print(f"val from shards:    P {a['precision']:.4f}  R {a['recall']:.4f}  H-mean {a['hmean']:.4f}  "
      f"({a['matched']} matched / {a['gt_care']} ground truth / {a['det_care']} detections)")
print(f"val from live path: P {b['precision']:.4f}  R {b['recall']:.4f}  H-mean {b['hmean']:.4f}")
print(f"shards and live path agree: {'yes' if same else 'NO'}; wall time {seconds} s ({seconds / 60:.1f} min)")
(out / "recipe.json").write_text(json.dumps({"shards": a, "source": b, "agree": same, "wall_seconds": seconds},
                                            indent=1, sort_keys=True) + "\n")
sys.exit(0 if same else 1)
PY
