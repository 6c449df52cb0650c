"""Checkpoints (wds_ocr.run.checkpoint, wds_ocr.run.fields): files that are not checkpoints, hostile
fields, leftover temporaries, and one checkpoint opened once by evaluate and predict."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from wds_ocr.cli import cli
from wds_ocr.config import load_config
from wds_ocr.errors import CheckpointError
from wds_ocr.model.dbnet import DBNet
from wds_ocr.run.checkpoint import (BEST_NAME, LAST_NAME, Checkpoint, load_checkpoint, open_checkpoint,
                                    remove_leftovers, rng_state, save_checkpoint)
from wds_ocr.train.loop import train
from wds_ocr.train.setup import make_optimizer
from wds_ocr.train.schedule import LrSchedule

from conftest import build_small_shards

torch.set_num_threads(2)

CONFIG = load_config(None, ["transform.size=64", "model.neck_channels=16", "loader.workers=0", "loader.batch_size=2",
                            "train.precision=32", "train.epochs=1", "train.eval_every=0"])


def training_body() -> dict:
    """What the trainer saves after one step: every field a resume reads."""
    torch.manual_seed(0)
    model = DBNet(CONFIG.model)
    optimizer = make_optimizer(model, CONFIG.train, torch.device("cpu"))
    model(torch.zeros(1, 3, 64, 64))["prob_logits"].mean().backward()
    optimizer.step()
    return {"config": CONFIG.model_dump(mode="json"), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scaler": {},
            "scheduler": LrSchedule(1e-3, 0, 4, "cosine").state(1), "position": {"epoch": 0, "batch": 1, "step": 1},
            "rng": rng_state(), "best_hmean": None, "world_size": 1}


@pytest.fixture(scope="module")
def body() -> dict:
    return training_body()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "notes.pt"
    path.write_text("epoch 3, loss 0.41\n")
    return path


def _refused(tmp_path: Path, body: dict) -> str:
    save_checkpoint(tmp_path / "hostile.pt", body)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(tmp_path / "hostile.pt")
    return str(caught.value)


def test_a_training_checkpoint_round_trips_with_every_field_checked(body, tmp_path):
    save_checkpoint(tmp_path / LAST_NAME, body)
    opened = open_checkpoint(tmp_path / LAST_NAME)
    assert isinstance(opened, Checkpoint) and opened.path == tmp_path / LAST_NAME
    assert opened.config == CONFIG and opened.body["position"] == {"epoch": 0, "batch": 1, "step": 1}
    assert open_checkpoint(opened) is opened
    assert opened.configured(["postprocess.box_thresh=0.4"]).postprocess.box_thresh == 0.4
    assert not opened.model(torch.device("cpu")).training


def test_a_text_file_is_not_a_checkpoint(text_file):
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(text_file)
    assert str(caught.value) == (f"checkpoint {text_file} is not a torch checkpoint: the file starts with b'epoc', "
                                 "while torch.save writes a zip archive (starting with b'PK\\x03\\x04'); pass the "
                                 "last.pt or best.pt that wds-ocr train wrote")


def test_empty_damaged_and_missing_files_are_named(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"the file is empty, while torch.save writes a zip archive"):
        load_checkpoint(empty)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"PK\x03\x04" + b"\x00" * 60)
    with pytest.raises(CheckpointError, match=r"damaged\.pt cannot be read \(truncated or damaged torch file\): "):
        load_checkpoint(damaged)
    truncated = tmp_path / "truncated.pt"
    save_checkpoint(tmp_path / "whole.pt", {"config": {}, "model": {"w": torch.zeros(1000)}})
    truncated.write_bytes((tmp_path / "whole.pt").read_bytes()[:3000])
    with pytest.raises(CheckpointError, match=r"truncated\.pt cannot be read \(truncated or damaged torch file\)"):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match=r"missing\.pt does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"is not a regular file"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(("change", "message"), [
    (lambda b: b["position"].update(step="7"), "field 'position.step' must be a whole number, got str '7'"),
    (lambda b: b["position"].update(epoch=-1), "field 'position.epoch' must lie in [0, 4611686018427387904], got -1"),
    (lambda b: b["position"].update(batch=True), "field 'position.batch' must be a whole number, got bool True"),
    (lambda b: b["position"].pop("batch"), "field 'position' lacks batch (expected exactly epoch, batch, step)"),
    (lambda b: b["position"].update(extra=1),
     "field 'position' has unknown extra (expected exactly epoch, batch, step)"),
    (lambda b: b.update(position=[0, 1, 1]), "field 'position' must be a dict, got list"),
    (lambda b: b["rng"].update(torch=torch.zeros(10, dtype=torch.uint8)),
     "field 'rng.torch' must have shape [5056], got [10]"),
    (lambda b: b["rng"].update(torch=b["rng"]["torch"].float()),
     "field 'rng.torch' must be a torch.uint8 tensor, got torch.float32"),
    (lambda b: b["rng"].update(cuda=torch.zeros(3, dtype=torch.uint8)),
     "field 'rng.cuda' must have shape [16], got [3]"),
    (lambda b: b["rng"]["numpy"].update(keys=b["rng"]["numpy"]["keys"] - (1 << 33)),
     "field 'rng.numpy.keys' must hold 32-bit unsigned words"),
    (lambda b: b["rng"]["numpy"].update(position=700), "field 'rng.numpy.position' must lie in [0, 624], got 700"),
    (lambda b: b["rng"]["numpy"].update(kind="PCG64"), "field 'rng.numpy.kind' must be 'MT19937', got 'PCG64'"),
    (lambda b: b["rng"]["python"].update(internal=[1, 2, 3]),
     "field 'rng.python.internal' must be a list of 625 whole numbers"),
    (lambda b: b["rng"]["python"]["internal"].__setitem__(624, 9999),
     "field 'rng.python.internal.624' must lie in [0, 624], got 9999"),
    (lambda b: b["rng"]["python"].update(gauss="x"), "field 'rng.python.gauss' must be a number, got str 'x'"),
    (lambda b: b["rng"].pop("numpy"), "field 'rng' lacks numpy (expected exactly torch, cuda, numpy, python)"),
    (lambda b: b.update(world_size=0), "field 'world_size' must lie in [1, 65536], got 0"),
    (lambda b: b.update(best_hmean=1.5), "field 'best_hmean' must be a finite number in [0.0, 1.0], got 1.5"),
    (lambda b: b.update(best_hmean=float("nan")), "field 'best_hmean' must be a finite number in [0.0, 1.0], got nan"),
    (lambda b: b.pop("optimizer"), "field 'optimizer' is missing: a training checkpoint (one with world_size) holds "
                                   "all of world_size, optimizer, scaler, scheduler, position, rng, best_hmean"),
    (lambda b: b["optimizer"]["param_groups"][0].update(params=[0, 0]),
     "field 'optimizer.param_groups' must list the ids 0..85 of the model's 86 parameters once each, got 54 ids"),
    (lambda b: b["optimizer"]["param_groups"][1].update(lr="fast"),
     "field 'optimizer.param_groups.1.lr' must be a number, got str 'fast'"),
    (lambda b: b["optimizer"]["state"][3].update(exp_avg=torch.zeros(7, 7, 7)),
     "field 'optimizer.state.3.exp_avg_sq' must have shape [7, 7, 7], got"),
    (lambda b: b["optimizer"]["state"][3].update(exp_avg=torch.zeros(7, 7, 7), exp_avg_sq=torch.zeros(7, 7, 7)),
     "field 'optimizer.state' holds moments of shape [7, 7, 7], which no parameter of the model has"),
    (lambda b: b["optimizer"]["state"].update({999: b["optimizer"]["state"][0]}),
     "field 'optimizer.state' has key 999, not a parameter id in 0..85"),
    (lambda b: b.update(scaler={"scale": 1.0}), "field 'scaler' lacks growth_factor, backoff_factor, growth_interval, "
                                                "_growth_tracker (expected exactly scale, growth_factor"),
    (lambda b: b["scheduler"].update(schedule="step"),
     "field 'scheduler.schedule' must be 'cosine' or 'poly', got 'step'"),
    (lambda b: b["model"].update({"head.bias": torch.tensor([float("inf")])}),
     "field 'model.head.bias' holds NaN or infinite values"),
])
def test_hostile_fields_are_refused_naming_file_and_field(body, tmp_path, change, message):
    hostile = copy.deepcopy(body)
    change(hostile)
    text = _refused(tmp_path, hostile)
    assert text.startswith(f"checkpoint {tmp_path / 'hostile.pt'}: {message}"), text


def test_resume_from_a_hostile_checkpoint_is_a_checkpoint_error_not_a_traceback(body, synth_root, tmp_path):
    shards = build_small_shards(synth_root, tmp_path / "shards")
    hostile = copy.deepcopy(body)
    hostile["position"]["step"] = {"$gt": 1}
    save_checkpoint(tmp_path / "run" / LAST_NAME, hostile)
    with pytest.raises(CheckpointError, match=r"field 'position.step' must be a whole number, got dict"):
        train(CONFIG, shards, out_dir=tmp_path / "run", device="cpu", resume=tmp_path / "run" / LAST_NAME)


def test_a_model_checkpoint_needs_no_training_fields(tmp_path):
    save_checkpoint(tmp_path / "model.pt", {"config": CONFIG.model_dump(mode="json"),
                                            "model": DBNet(CONFIG.model).state_dict()})
    assert "world_size" not in load_checkpoint(tmp_path / "model.pt")


def test_leftover_temporaries_are_removed_by_the_next_save(tmp_path):
    for name in (LAST_NAME, BEST_NAME):
        (tmp_path / f".{name}.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / ".notes.txt.tmp").write_text("not ours")
    save_checkpoint(tmp_path / LAST_NAME, {"config": {}, "model": {}})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.txt.tmp", LAST_NAME]
    (tmp_path / f".{BEST_NAME}.tmp").write_bytes(b"again")
    assert remove_leftovers(tmp_path) == [tmp_path / f".{BEST_NAME}.tmp"]


def test_a_failed_save_leaves_no_temporary_and_no_checkpoint(tmp_path):
    with pytest.raises(Exception):
        save_checkpoint(tmp_path / LAST_NAME, {"config": {}, "model": {}, "bad": lambda: None})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["evaluate", "predict", "train"])
def test_cli_names_a_text_file_given_as_a_checkpoint_and_exits_1(text_file, tmp_path, command):
    arguments = {"evaluate": ["evaluate", "--checkpoint", str(text_file), "--shards", str(tmp_path)],
                 "predict": ["predict", "--checkpoint", str(text_file), str(text_file), "--out", str(tmp_path / "p")],
                 "train": ["train", "--shards", str(tmp_path), "--resume", str(text_file)]}[command]
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 1, result.output
    assert result.output == (f"error: checkpoint {text_file} is not a torch checkpoint: the file starts with "
                             "b'epoc', while torch.save writes a zip archive (starting with b'PK\\x03\\x04'); pass "
                             "the last.pt or best.pt that wds-ocr train wrote\n")
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "p").exists()


def _weight_name(body: dict) -> str:
    return next(name for name, value in body["model"].items() if value.dim() == 4)


@pytest.mark.parametrize(("change", "message"), [
    (lambda b, w: b["model"].update({w: b["model"][w].flatten()[:1].expand(b["model"][w].shape)}),
     "must be laid out contiguously, got shape [{shape}] with strides [0, 0, 0, 0] (a view that repeats or skips"),
    (lambda b, w: b["model"].update({w: b["model"][w].to_sparse()}), "must be a dense tensor, got layout torch.sparse_coo"),
    (lambda b, w: b["model"].update({w: torch.empty(b["model"][w].shape, device="meta")}),
     "must be a tensor with data (on the CPU), got one on device 'meta'"),
    (lambda b, w: b["model"].update({w: b["model"][w].double()}),
     "must be a torch.float32 or torch.float16 or torch.bfloat16 tensor, got torch.float64"),
    (lambda b, w: b["model"].update({w: b["model"][w] > 0}), "got torch.bool"),
    (lambda b, w: b["model"].update({w: b["model"][w].to(torch.int8)}), "got torch.int8"),
    (lambda b, w: b["model"].update({w: b["model"][w].to(torch.complex64)}), "got torch.complex64"),
    (lambda b, w: b["optimizer"]["state"][0].update(exp_avg=b["optimizer"]["state"][0]["exp_avg"].to_sparse()),
     "field 'optimizer.state.0.exp_avg' must be a dense tensor"),
    (lambda b, w: b["rng"].update(torch=torch.empty(b["rng"]["torch"].shape, dtype=torch.uint8, device="meta")),
     "field 'rng.torch' must be a tensor with data (on the CPU), got one on device 'meta'"),
])
def test_tensors_that_are_not_plain_dense_cpu_arrays_are_refused(body, tmp_path, change, message):
    """Stride-0 views, sparse and meta tensors and foreign dtypes are refused when the file is
    opened, naming the field, instead of a RuntimeError (or a silent cast) when they are used."""
    hostile = copy.deepcopy(body)
    name = _weight_name(hostile)
    change(hostile, name)
    text = _refused(tmp_path, hostile)
    assert message.format(shape=", ".join(map(str, body["model"][name].shape))) in text, text
    assert text.startswith(f"checkpoint {tmp_path / 'hostile.pt'}: field "), text


def test_channels_last_weights_are_a_plain_layout(body, tmp_path):
    model = DBNet(CONFIG.model).to(memory_format=torch.channels_last)
    name = _weight_name({"model": model.state_dict()})
    assert not model.state_dict()[name].is_contiguous()
    save_checkpoint(tmp_path / "cl.pt", {"config": CONFIG.model_dump(mode="json"), "model": model.state_dict()})
    assert load_checkpoint(tmp_path / "cl.pt")["model"][name].is_contiguous(memory_format=torch.channels_last)


def test_a_compressed_archive_is_refused_before_it_is_unpacked(tmp_path):
    """A small file whose records would inflate to hundreds of megabytes is refused from the zip directory,
    and opening it allocates next to nothing."""
    import tracemalloc
    import zipfile

    save_checkpoint(tmp_path / "model.pt", {"config": CONFIG.model_dump(mode="json"),
                                            "model": DBNet(CONFIG.model).state_dict()})
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
        out.writestr("model/data.pkl", b"")
        out.writestr("model/data/0", bytes(256 << 20))  # 256 MiB of zeros in a few hundred KB
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    with pytest.raises(CheckpointError, match=r"record '.*' is compressed \(zip method 8\); torch.save stores records "
                                              r"uncompressed"):
        open_checkpoint(bomb)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20, peak
    stored = tmp_path / "stored.pt"
    with zipfile.ZipFile(tmp_path / "model.pt") as source, zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as out:
        for member in source.infolist():
            out.writestr(member, source.read(member.filename))
    assert "model" in open_checkpoint(stored).body  # re-stored without compression: still a checkpoint


def test_a_storage_declared_larger_than_its_record_is_refused_before_allocating(tmp_path):
    """A 4-element tensor whose pickle declares 2e9 elements (8 GB): refused from the record's size,
    at once, with a message naming the file."""
    import re
    import struct
    import time
    import zipfile

    small = tmp_path / "small.pt"
    torch.save({"config": {}, "model": {"w": torch.zeros(4)}}, small)
    crafted = tmp_path / "declared.pt"
    with zipfile.ZipFile(small) as source, zipfile.ZipFile(crafted, "w", compression=zipfile.ZIP_STORED) as out:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("data.pkl"):  # the storage's element count and the tensor's size
                huge = struct.pack("<i", 2_000_000_000)
                data, found = re.subn(rb"cpuq(.)K\x04tq(.)QK\x00K\x04\x85q",
                                      lambda m: b"cpuq" + m.group(1) + b"J" + huge + b"tq" + m.group(2) + b"QK\x00J"
                                      + huge + b"\x85q", data, flags=re.S)
                assert found == 1
            out.writestr(info, data)
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"declared\.pt cannot be read .*record size \(16 bytes\) does not match "
                                              r"expected size \(8000000000 bytes"):
        load_checkpoint(crafted)
    assert time.perf_counter() - started < 5  # nothing of 8 GB was allocated or read
