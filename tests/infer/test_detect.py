"""Pipelined evaluation (wds_ocr.infer.detect, wds_ocr.infer.postpool): exactly the serial result for
any number of post-processing workers and any batch size, a time breakdown, and failures that
surface as errors instead of hangs."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from wds_ocr.cli import cli
from wds_ocr.config import Config, PostprocessConfig, load_config
from wds_ocr.data.synth import synthesize
from wds_ocr.infer import detect as detect_module
from wds_ocr.infer.detect import EvalTimes, resolve_post_workers, run_detection, truth_from_info
from wds_ocr.infer.evaluate import evaluate_shards, evaluate_source
from wds_ocr.infer.postpool import PostPool, PostprocessWorkerError
from wds_ocr.infer.scoring import ImageTruth, MapForm, ScoringSettings, score_image
from wds_ocr.loader.loaders import make_loader
from wds_ocr.loader.stream import ShardStream
from wds_ocr.shards.build import build_shards
from wds_ocr.train.log import read_metrics
from wds_ocr.train.loop import train

from conftest import random_checkpoint

torch.set_num_threads(2)

# A randomly initialised tiny DBNet with thresh 0.5 finds ~1200 boxes on the 9 receipts, 2 of them
# right: detections, matches and misses for the comparison to mean something.
SETTINGS = ["transform.size=128", "transform.jpeg_reduction=off", "model.neck_channels=32", "postprocess.thresh=0.5", "postprocess.box_thresh=0.4",
            "loader.workers=0"]
CONFIG = load_config(None, SETTINGS)
TIME_KEYS = ["data_wait_s", "device_s", "device_wait_s", "postprocess_s", "matching_s", "result_wait_s",
             "worker_start_s", "inline_images", "total_s", "images", "images_per_s", "device_busy", "post_workers", "device_timing"]


def with_settings(*overrides: str) -> Config:
    return load_config(None, [*SETTINGS, *overrides])


@pytest.fixture(scope="module")
def receipts(tmp_path_factory) -> Path:
    """9 synthetic receipts in train (about 60 care words, see ``care_words``), 1 in val."""
    root = tmp_path_factory.mktemp("receipts")
    synthesize(root, 10, seed=7, val_fraction=0.0, min_side=200, max_side=320)
    return root


@pytest.fixture(scope="module")
def shards(receipts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    build_shards(receipts, "train", out, CONFIG)
    return out


@pytest.fixture(scope="module")
def care_words(shards) -> int:
    """The care words of the 9 train receipts, counted from the shards themselves: which words the
    synthesizer smudges into don't-care depends on an OpenCV float blur whose last bits differ
    between CPUs (61 words on one machine, 60 on another), so no test pins the number."""
    count = sum(int((~info.dont_care).sum()) for batch in make_loader(ShardStream(shards, batch_size=9), 0, mode="threads")
                for info in batch.info)
    assert 50 <= count <= 70
    return count


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("model"), CONFIG)


_SERIAL: dict[tuple, object] = {}


def run(checkpoint: Path, shards: Path, post_workers: int, batch_size: int, *overrides: str,
        precision: str = "32", metric: str = "iou", inline_start: bool = True):
    """evaluate_shards on the CPU; serial runs (post_workers=0) are computed once per module.
    ``inline_start=False``: every image goes through the workers (none is scored in the main
    process while they start)."""
    key = (checkpoint, shards, batch_size, overrides, precision, metric)
    if post_workers == 0 and key in _SERIAL:
        return _SERIAL[key]
    config = with_settings(f"evaluation.post_workers={post_workers}", *overrides)
    result = evaluate_shards(checkpoint, shards, config, precision, batch_size, 0, "cpu", metric=metric,
                             pool_options={"inline_start": inline_start})
    if post_workers == 0:
        _SERIAL[key] = result
    return result


@pytest.mark.parametrize(("batch_size", "workers"), [(1, (2,)), (4, (1, 3)), (8, (2,))])
def test_pipelined_counts_equal_serial_for_any_worker_count(checkpoint, shards, care_words, batch_size, workers):
    serial = run(checkpoint, shards, 0, batch_size)
    assert (serial.images, serial.score.matched, serial.score.gt_care) == (9, 2, care_words)
    assert serial.score.det_care > 1000
    assert serial.times.post_workers == 0 and serial.times.result_wait_s == serial.times.worker_start_s == 0.0
    for count in workers:
        # every image through the workers; and as users run it (the main process scores until one is up)
        for inline_start in ((False, True) if count == workers[0] else (False,)):
            pipelined = run(checkpoint, shards, count, batch_size, inline_start=inline_start)
            assert pipelined.score == serial.score
            assert pipelined.per_image == serial.per_image
            assert pipelined.coverage == serial.coverage
            if not inline_start:
                assert pipelined.times.inline_images == 0  # all 9 went through the workers
        assert pipelined.times.post_workers == count and pipelined.times.images == 9


@pytest.mark.parametrize(("overrides", "precision", "metric"), [
    ((), "bf16-mixed", "iou"),  # maps travel as 16-bit logits through the sigmoid table
    (("postprocess.mode=db",), "32", "iou"),
    ((), "32", "cleval"),
])
def test_pipelined_equals_serial_in_every_map_form_mode_and_metric(checkpoint, shards, receipts, overrides, precision,
                                                                   metric):
    if metric == "cleval":
        pytest.importorskip("cleval", reason="the optional cleval package is not installed")
    serial = run(checkpoint, shards, 0, 4, *overrides, precision=precision, metric=metric)
    pipelined = run(checkpoint, shards, 2, 4, *overrides, precision=precision, metric=metric)
    assert pipelined.score == serial.score and pipelined.per_image == serial.per_image
    assert pipelined.cleval == serial.cleval
    assert (serial.cleval is not None) == (metric == "cleval")
    if metric == "cleval":
        assert serial.cleval.counts.char_gt > 100 and all(i.cleval is not None for i in serial.per_image)
        live = evaluate_source(checkpoint, receipts, "train", with_settings("evaluation.post_workers=0"), "32", 4, 0,
                               "cpu", metric="cleval")  # transcriptions from the live path, not the records
        assert live.cleval == serial.cleval
    assert serial.postprocess_mode == ("db" if overrides else "wds")


def test_live_path_pipelined_equals_shards_serial(checkpoint, shards, receipts):
    serial = run(checkpoint, shards, 0, 4)
    live = evaluate_source(checkpoint, receipts, "train", with_settings("evaluation.post_workers=2"), "32", 4, 0, "cpu")
    assert live.score == serial.score and live.per_image == serial.per_image


class PixelModel(torch.nn.Module):
    """Logits from each pixel alone (dark ink -> text): exactly the same maps for any batch size."""

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"prob_logits": -3.0 * pixels[:, :1] - 1.0}


def _batches(shards: Path, batch_size: int):
    stream = ShardStream(shards, batch_size=batch_size)
    for batch in make_loader(stream, 0, mode="threads"):
        yield batch.images, [truth_from_info(info) for info in batch.info]


def test_results_do_not_depend_on_the_batch_size_when_the_maps_do_not(shards, care_words):
    config = PostprocessConfig(box_thresh=0.3)
    runs = {(size, workers): run_detection(PixelModel(), _batches(shards, size), config, "32", torch.device("cpu"),
                                           post_workers=workers, capacity=size)
            for size, workers in [(1, 0), (4, 0), (10, 0), (1, 2), (4, 3), (10, 1)]}
    reference = runs[(1, 0)]
    assert (reference.metric.images, reference.metric.matched, reference.metric.gt_care) == (9, 9, care_words)
    for outcome in runs.values():
        assert outcome.metric == reference.metric and outcome.per_image == reference.per_image


def test_time_breakdown_adds_up(checkpoint, shards):
    result = run(checkpoint, shards, 2, 4)
    times = result.times.as_dict()
    assert list(times) == TIME_KEYS
    assert times["images"] == 9 and times["post_workers"] == 2 and times["device_timing"] == "wall"
    assert all(times[k] >= 0 for k in TIME_KEYS if k != "device_timing")
    assert times["postprocess_s"] > 0 and times["matching_s"] > 0 and times["device_s"] > 0
    assert times["images_per_s"] == pytest.approx(9 / times["total_s"])
    assert times["device_busy"] == pytest.approx(times["device_s"] / times["total_s"])
    # the main process's own waits and device time fit in the wall time
    assert times["data_wait_s"] + times["device_s"] + times["device_wait_s"] + times["result_wait_s"] \
        <= times["total_s"] + 1e-6
    assert 0 < times["worker_start_s"] <= times["total_s"]
    assert 0 <= times["inline_images"] <= 9
    assert result.seconds == times["total_s"]
    assert EvalTimes().as_dict()["images_per_s"] == 0.0


def test_auto_post_workers_leave_the_loader_its_cores(monkeypatch):
    monkeypatch.setattr(detect_module, "usable_cores", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_post_workers(None, 2) == 14 and resolve_post_workers(3, 2) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resolve_post_workers(None, 2) == 2 and resolve_post_workers(None, 8) == 0
    monkeypatch.setattr(detect_module, "usable_cores", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert resolve_post_workers(None, 2) == 0  # this CI box: everything in the main process


# ---------------------------------------------------------------- the pool on its own

S = 64


def _truth(index: int, texts: tuple[str, ...] | None = None) -> ImageTruth:
    return ImageTruth(f"image{index}", (128, 128), np.diag([2.0, 2.0, 1.0]),
                      (np.array([[20.0, 20.0], [80.0, 20.0], [80.0, 40.0], [20.0, 40.0]]),), np.array([False]),
                      np.array([0], dtype=np.uint8), texts)


def _maps(count: int) -> np.ndarray:
    maps = np.zeros((count, S, S), dtype=np.float32)
    for index in range(count):
        maps[index, 10:20, 10 : 16 + 3 * index] = 0.9
    return maps


def test_pool_outcomes_equal_inline_scoring_and_maps_never_go_through_a_pipe():
    settings = ScoringSettings(PostprocessConfig())
    maps = _maps(10)
    expected = [score_image(maps[i], MapForm(), _truth(i), settings) for i in range(10)]
    with PostPool(2, settings) as pool:
        pool.open_ring(MapForm(), S, 4)
        pool.wait_until_up()
        assert pool.ring.layout.nbytes == 3 * 4 * S * S * 4  # bounded: 3 batches of 4 maps in flight at most
        for start in range(0, 10, 4):
            group, buffer = pool.acquire(min(4, 10 - start))
            buffer[:] = maps[start : start + len(buffer)]
            pool.submit(group, [_truth(i) for i in range(start, start + len(buffer))])
        pool.finish()
        outcomes = [pool.outcomes[i] for i in range(10)]
        assert pool.task_bytes < maps[0].nbytes  # ten images' tasks weigh less than one map
    strip = lambda o: (o.detections, o.matched, o.gt_care, o.det_care)  # noqa: E731 (times differ)
    assert [strip(o) for o in outcomes] == [strip(o) for o in expected]
    assert [o.detections for o in outcomes] == [1] * 10


def test_a_killed_worker_is_an_error_naming_it_not_a_hang():
    with PostPool(2, ScoringSettings(PostprocessConfig()), result_timeout=30) as pool:
        pool.open_ring(MapForm(), S, 4)
        victim = pool.workers[0].process
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        group, buffer = pool.acquire(2)
        buffer[:] = _maps(2)
        started = time.monotonic()
        with pytest.raises(PostprocessWorkerError, match=rf"post-processing worker 0 \(pid {victim.pid}\) was killed "
                                                         r"by signal SIGKILL"):
            pool.submit(group, [_truth(0), _truth(1)])
            pool.finish()
        assert time.monotonic() - started < 10


def test_a_worker_that_raises_names_the_image():
    settings = ScoringSettings(PostprocessConfig(), metric="cleval")
    with pytest.raises(PostprocessWorkerError, match=r"post-processing worker 0 failed on image0: ValueError: image0: "
                                                     r"CLEval needs the ground truth's transcriptions"):
        with PostPool(1, settings) as pool:
            pool.open_ring(MapForm(), S, 2)
            pool.wait_until_up()
            group, buffer = pool.acquire(1)
            buffer[:] = _maps(1)
            pool.submit(group, [_truth(0)])  # no texts
            pool.finish()


def test_a_stopped_worker_hits_the_deadline_and_the_ring_stays_bounded():
    with PostPool(1, ScoringSettings(PostprocessConfig()), result_timeout=1.0) as pool:
        pool.open_ring(MapForm(), S, 1)
        pool.wait_until_up()
        os.kill(pool.workers[0].process.pid, signal.SIGSTOP)
        for index in range(3):  # three groups: all filled, none comes back
            group, buffer = pool.acquire(1)
            buffer[:] = _maps(1)
            pool.submit(group, [_truth(index)])
        started = time.monotonic()
        with pytest.raises(PostprocessWorkerError, match=r"waited 1 s for a free map buffer without any answer from "
                                                         r"the post-processing workers \(worker 0 on image0\); they "
                                                         r"were stopped"):
            pool.acquire(1)  # a fourth batch does not get memory of its own
        assert time.monotonic() - started < 5


@pytest.mark.parametrize(("inline_start", "who"), [(True, "worker 0"), (False, "the post-processing workers")])
def test_workers_that_cannot_start_in_time_are_an_error(inline_start, who):
    with pytest.raises(PostprocessWorkerError, match=rf"waited 0 s for the post-processing workers to start without "
                                                     rf"any answer from {who}; they were stopped"):
        with PostPool(1, ScoringSettings(PostprocessConfig()), start_timeout=0.0, inline_start=inline_start) as pool:
            pool.open_ring(MapForm(), S, 1)
            group, buffer = pool.acquire(1)
            buffer[:] = _maps(1)
            pool.submit(group, [_truth(0)])


def test_until_a_worker_is_up_the_pool_scores_in_this_process_with_the_same_result():
    settings = ScoringSettings(PostprocessConfig())
    maps = _maps(2)
    expected = [score_image(maps[i], MapForm(), _truth(i), settings) for i in range(2)]
    strip = lambda o: (o.detections, o.matched, o.gt_care, o.det_care)  # noqa: E731 (times differ)
    with PostPool(1, settings) as pool:
        pool.open_ring(MapForm(), S, 1)
        group, buffer = pool.acquire(1)
        buffer[:] = maps[:1]
        pool.submit(group, [_truth(0)])  # a Python process with numpy and OpenCV is not up this fast
        assert pool.inline_images == 1 and pool.workers[0].tasks == deque()
        assert strip(pool.outcomes[0]) == strip(expected[0])
        pool.wait_until_up()
        assert pool.up_s > 0
        group, buffer = pool.acquire(1)
        buffer[:] = maps[1:]
        pool.submit(group, [_truth(1)])
        assert [task for task, _ in pool.workers[0].tasks] == [1]  # this one went to the worker
        pool.finish()
        assert pool.inline_images == 1 and strip(pool.outcomes[1]) == strip(expected[1])


def test_pool_arguments_are_checked():
    with pytest.raises(ValueError, match="at least 1 worker, got 0"):
        PostPool(0, ScoringSettings(PostprocessConfig()))
    with pytest.raises(ValueError, match="at least 2 groups"):
        PostPool(1, ScoringSettings(PostprocessConfig()), groups=1)
    with pytest.raises(ValueError, match="metric must be one of iou, cleval, got 'map'"):
        ScoringSettings(PostprocessConfig(), metric="map")


# ---------------------------------------------------------------- training's validation and the CLI


def test_training_validation_logs_the_time_breakdown(shards, tmp_path):
    config = with_settings("loader.batch_size=4", "train.precision=32", "train.epochs=1", "train.eval_every=1",
                           "augment.affine=false", "evaluation.post_workers=1")
    train(config, shards, val_shards=shards, out_dir=tmp_path, device="cpu")
    (record,) = [r for r in read_metrics(tmp_path) if r["event"] == "eval"]
    assert record["images"] == 9 and record["post_workers"] == 1 and record["device_timing"] == "wall"
    assert set(TIME_KEYS) - {"images"} <= set(record)
    assert record["postprocess_s"] > 0 and record["total_s"] <= record["seconds"]


def test_cli_evaluate_json_has_the_breakdown_and_equal_counts_for_any_post_workers(checkpoint, shards):
    runner = CliRunner()
    common = ["evaluate", "--checkpoint", str(checkpoint), "--shards", str(shards), "--json", "--workers", "0",
              "--batch-size", "4", "--precision", "32", "--device", "cpu"]
    bodies = []
    for workers in ("0", "2"):
        result = runner.invoke(cli, [*common, "--post-workers", workers])
        assert result.exit_code == 0, result.output
        bodies.append(json.loads(result.output))
    counts = [{k: b[k] for k in ("precision", "recall", "hmean", "matched", "gt_care", "det_care")} for b in bodies]
    assert counts[0] == counts[1] and bodies[0]["images"] == 9
    assert sorted(bodies[1]["times"]) == sorted(TIME_KEYS) and bodies[1]["times"]["post_workers"] == 2
    assert bodies[0]["metric"] == "iou" and bodies[0]["postprocess_mode"] == "wds" and "cleval" not in bodies[0]


def test_cli_evaluate_prints_the_breakdown_and_checks_post_workers(checkpoint, shards):
    runner = CliRunner()
    common = ["evaluate", "--checkpoint", str(checkpoint), "--shards", str(shards), "--workers", "0", "--quiet",
              "--device", "cpu", "--precision", "32"]
    result = runner.invoke(cli, [*common, "--post-workers", "1", "--set", "postprocess.mode=db"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("precision ") and lines[0].endswith(" detections, 9 images)")
    assert lines[1].startswith("9 images in ") and lines[1].endswith("32, post-processing mode db)")
    assert lines[2].startswith("time: data wait ")
    assert re.search(r"; 1 post-processing worker \(up after \d+\.\d\d s; \d+ images? scored in the main process "
                     r"meanwhile\)$", lines[2]), lines[2]
    bad = runner.invoke(cli, [*common, "--post-workers", "many"])
    assert bad.exit_code == 2 and "Invalid value for '--post-workers': 'many' is neither 'auto' nor a whole number" \
        in bad.output
    auto = runner.invoke(cli, [*common, "--post-workers", "auto", "--json"])
    assert auto.exit_code == 0 and json.loads(auto.output)["times"]["post_workers"] == \
        resolve_post_workers(None, 0)


def test_cli_evaluate_with_cleval_prints_both_metrics(checkpoint, shards):
    pytest.importorskip("cleval", reason="the optional cleval package is not installed")
    result = CliRunner().invoke(cli, ["evaluate", "--checkpoint", str(checkpoint), "--shards", str(shards),
                                      "--workers", "0", "--quiet", "--device", "cpu", "--precision", "32",
                                      "--metric", "cleval", "--post-workers", "0"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("precision ") and lines[1].startswith("CLEval: precision ")
    assert "ground-truth / " in lines[1] and " detected characters, " in lines[1]


# ---------------------------------------------------------------- a real 2-process gloo run

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from wds_ocr.config import load_config
    from wds_ocr.infer.evaluate import evaluate_shards

    torch.set_num_threads(1)
    checkpoint, shards, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    result = evaluate_shards(checkpoint, shards, load_config(None, overrides), "32", 1, 0, "cpu")
    print(json.dumps({"rank": int(os.environ["RANK"]), "world": result.world_size, "images": result.images,
                      "counts": [result.score.matched, result.score.gt_care, result.score.det_care],
                      "own": [i.name for i in result.per_image], "post_workers": result.times.post_workers}))
    """
)


def test_two_process_gloo_evaluation_with_workers_equals_one_serial_process(checkpoint, shards, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    overrides = [*SETTINGS, "evaluation.post_workers=2"]
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
        with open(tmp_path / f"rank{rank}.out", "w") as out, open(tmp_path / f"rank{rank}.err", "w") as err:
            procs.append(subprocess.Popen([sys.executable, str(script), str(checkpoint), str(shards),
                                           json.dumps(overrides)], env=env, stdout=out, stderr=err))
    outputs = []
    try:
        for rank, proc in enumerate(procs):
            proc.wait(timeout=240)
            assert proc.returncode == 0, (tmp_path / f"rank{rank}.err").read_text()[-3000:]
            outputs.append(json.loads((tmp_path / f"rank{rank}.out").read_text().strip().splitlines()[-1]))
    finally:
        for proc in procs:
            proc.kill()
    serial = run(checkpoint, shards, 0, 1)
    expected = [serial.score.matched, serial.score.gt_care, serial.score.det_care]
    assert [o["counts"] for o in outputs] == [expected, expected]
    assert [o["images"] for o in outputs] == [9, 9] and [o["world"] for o in outputs] == [2, 2]
    assert [o["post_workers"] for o in outputs] == [2, 2]
    assert sorted(outputs[0]["own"] + outputs[1]["own"]) == sorted(i.name for i in serial.per_image)
