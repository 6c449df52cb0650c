"""A real 2-process gloo DDP run (torchrun-style environment) of training and evaluation on the CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from wds_ocr.config import load_config
from wds_ocr.data.synth import synthesize
from wds_ocr.infer.evaluate import evaluate_shards
from wds_ocr.shards.build import build_shards
from wds_ocr.run.checkpoint import load_checkpoint
from wds_ocr.train.log import read_metrics

OVERRIDES = ["transform.size=128", "model.neck_channels=32", "loader.workers=0", "loader.batch_size=1",
             "train.precision=32", "train.epochs=2", "train.log_every=1", "train.eval_every=1",
             "train.accumulate=2", "postprocess.box_thresh=0.3"]

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from wds_ocr.config import load_config
    from wds_ocr.infer.evaluate import evaluate_shards
    from wds_ocr.train.loop import train

    torch.set_num_threads(1)
    shards, out, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    config = load_config(None, overrides)
    result = train(config, shards, val_shards=shards, out_dir=out, device="cpu")
    # A second process group for evaluation, on its own port: the first one's store may still be closing.
    os.environ["MASTER_PORT"] = sys.argv[4]
    score = evaluate_shards(result.last_checkpoint, shards, config, precision="32", batch_size=1, workers=0,
                            device="cpu")
    rank = int(os.environ["RANK"])
    print(json.dumps({"rank": rank, "steps": result.steps, "epochs": result.epochs, "world": result.world_size,
                      "best": result.best_hmean, "eval_world": score.world_size, "images": score.images,
                      "counts": [score.score.matched, score.score.gt_care, score.score.det_care],
                      "own_images": len(score.per_image)}))
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """5 synthetic receipts in train: padded to 6 for 2 ranks, 3 batches of 1 each."""
    root = tmp_path_factory.mktemp("receipts")
    synthesize(root, 6, seed=1, val_fraction=0.0, min_side=160, max_side=200)
    build_shards(root, "train", root / "shards", load_config(None, OVERRIDES))
    return root / "shards"


def test_two_process_gloo_training_writes_one_checkpoint_and_reduces_eval_counts(shards, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "run"
    train_port = free_port()
    eval_port = next(port for port in iter(free_port, None) if port != train_port)
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(train_port), RANK=str(rank),
                   WORLD_SIZE="2", LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
        # Output to files, not pipes: a rank blocked on a full pipe would stall the other in a collective.
        with open(tmp_path / f"rank{rank}.out", "w") as stdout, open(tmp_path / f"rank{rank}.err", "w") as stderr:
            procs.append(subprocess.Popen(
                [sys.executable, str(script), str(shards), str(out), json.dumps(OVERRIDES), str(eval_port)],
                env=env, stdout=stdout, stderr=stderr))
    outputs = []
    try:
        for rank, proc in enumerate(procs):
            proc.wait(timeout=240)
            stderr = (tmp_path / f"rank{rank}.err").read_text()
            assert proc.returncode == 0, stderr[-3000:]
            outputs.append(json.loads((tmp_path / f"rank{rank}.out").read_text().strip().splitlines()[-1]))
    finally:
        for proc in procs:
            proc.kill()

    # 5 samples padded to 6 -> 3 per rank -> 3 micro-batches -> 1 step of 2 per epoch (the third
    # micro-batch is left over), on both ranks: nobody waits on a rank that ran out.
    assert [o["steps"] for o in outputs] == [2, 2] and [o["epochs"] for o in outputs] == [2, 2]
    assert [o["world"] for o in outputs] == [2, 2] == [o["eval_world"] for o in outputs]
    # Only rank 0 writes: one last.pt and one best.pt (validation ran), one metrics file, one picture.
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["best.pt", "curves.png", "last.pt", "metrics.jsonl"]
    body = load_checkpoint(out / "last.pt")
    assert body["world_size"] == 2 and body["position"] == {"epoch": 2, "batch": 0, "step": 2}
    records = read_metrics(out)
    assert [r["event"] for r in records] == ["train", "eval", "train", "eval"]
    assert all(r["images"] == 5 for r in records if r["event"] == "eval")

    # Evaluation: every rank reports the all-reduced counts of all 5 images, each rank ran its share.
    assert outputs[0]["counts"] == outputs[1]["counts"] and [o["images"] for o in outputs] == [5, 5]
    assert sorted(o["own_images"] for o in outputs) == [2, 3]
    torch.set_num_threads(2)
    single = evaluate_shards(out / "last.pt", shards, load_config(None, OVERRIDES), precision="32", batch_size=1,
                             workers=0, device="cpu")
    assert [single.score.matched, single.score.gt_care, single.score.det_care] == outputs[0]["counts"]
    assert single.images == 5 and single.world_size == 1
