"""build-shards: reproducible bytes, crash safety and resume, rollover, rejects."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from wds_ocr.cli import cli
from wds_ocr.config import load_config
from wds_ocr.errors import BuildError, UsageError
from wds_ocr.shards import build as build_module
from wds_ocr.shards import workers as workers_module
from wds_ocr.shards.build import Partition, build_shards, record_key
from wds_ocr.shards.inspect import read_record
from wds_ocr.shards.journal import Journal
from wds_ocr.shards.manifest import load_manifest
from wds_ocr.shards.tario import BLOCK, iter_members, member_span

REPO_ROOT = Path(__file__).resolve().parents[2]
DOTTED = "drp.en_ko.in_house.selectstar_000058.jpg"


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def settings(size: int = 128, max_samples: int = 3, *extra: str) -> list[str]:
    return [f"transform.size={size}", f"shards.max_samples={max_samples}", *extra]


def build(source: Path, out: Path, overrides: list[str], **kwargs):
    return build_shards(source, "train", out, load_config(None, overrides), **kwargs)


def cli_build(source: Path, out: Path, overrides: list[str], *extra: str):
    args = ["build-shards", str(source), "--split", "train", "--out", str(out), "--quiet", *extra]
    for override in overrides:
        args += ["--set", override]
    return CliRunner().invoke(cli, args)


def interrupt_after(count: int):
    """A progress callback that stops the build like Ctrl-C after ``count`` samples."""

    def progress(p) -> None:
        if p.done >= count:
            raise KeyboardInterrupt

    return progress


# --- reproducibility ---------------------------------------------------------------------------


def test_two_builds_are_byte_identical_and_leave_only_their_outputs(synth_root, tmp_path):
    first = build(synth_root, tmp_path / "a", settings())
    build(synth_root, tmp_path / "b", settings())
    files = snapshot(tmp_path / "a")
    assert files == snapshot(tmp_path / "b")
    assert sorted(files) == ["manifest.json", "rejects.jsonl", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert first.reused_shards == 0 and not first.up_to_date
    manifest = first.manifest
    assert [e.samples for e in manifest.shards] == [3, 3, 3]
    words = manifest.counts.words.as_dict()
    assert {k: v for k, v in manifest.counts.as_dict().items() if k != "words"} == {
        "samples_in": 9, "written": 9, "rejected": 0, "words_skipped": 0}
    assert words["words"] == words["in_targets"] + words["dont_care"] + words["too_small"] + words["shrink_vanished"]
    assert words["in_targets"] > 0 and words["dont_care"] > 0
    assert manifest.fingerprint == load_config(None, settings()).fingerprint()
    assert load_manifest(tmp_path / "a") == manifest


def test_one_and_two_workers_give_identical_bytes(faulty_root, tmp_path):
    build(faulty_root, tmp_path / "one", settings(), workers=1)
    build(faulty_root, tmp_path / "two", settings(), workers=2)
    assert snapshot(tmp_path / "one") == snapshot(tmp_path / "two")


def test_the_pool_gives_the_outcomes_made_in_process(faulty_root):
    """The pool is waited for, so every position goes through a worker (a small build usually
    ends inline before the pool is up): records, their member bytes and hashes, rejects, skips."""
    from wds_ocr.data.sources import list_source

    config = load_config(None, settings())
    samples = list_source(faulty_root, "train", config.source).samples
    positions = range(len(samples))
    starting = workers_module.Workers(2, config)
    try:
        deadline = time.monotonic() + 120
        while not starting.ready():
            assert time.monotonic() < deadline, "the build's worker pool did not come up within 120 s"
            time.sleep(0.02)
        pooled = list(workers_module.outcomes(samples, config, positions, starting))
    finally:
        starting.close()
    inline = list(workers_module.outcomes(samples, config, positions, None))
    assert [o.position for o in pooled] == list(positions)
    assert pooled == inline
    written = [o for o in pooled if o.record is not None]
    assert written and any(o.reject is not None for o in pooled)
    for outcome in written:
        span = outcome.record.span
        member, = iter_members(io.BytesIO(span), "member", stop=len(span))
        assert member.key == outcome.key and len(span) == member_span(len(member.data))
        assert outcome.record.digest == member.span_bytes_digest()
        assert outcome.record.checksum == member.span_checksum()



def test_background_flushes_leave_the_bytes_alone(faulty_root, tmp_path, monkeypatch):
    from wds_ocr.shards import writer as writer_module

    build(faulty_root, tmp_path / "plain", settings())
    flushed: list[int] = []
    real = writer_module._datasync
    monkeypatch.setattr(writer_module, "FLUSH_EVERY", 1)  # a flush after every record
    monkeypatch.setattr(writer_module, "_datasync", lambda fd: (flushed.append(fd), real(fd)))
    build(faulty_root, tmp_path / "flushed", settings())
    assert len(flushed) >= 3  # at least one per shard (a flush still running is not started again)
    assert snapshot(tmp_path / "plain") == snapshot(tmp_path / "flushed")

def _workers_up(config, **kwargs):
    workers = workers_module.Workers(2, config, **kwargs)
    deadline = time.monotonic() + 120
    while not workers.ready() or not all(w.up or w.results.poll() for w in workers.workers):
        assert time.monotonic() < deadline, "the build's workers did not come up within 120 s"
        time.sleep(0.02)
    workers.ready()  # takes the last "ready" answers
    return workers


def test_tasks_and_results_larger_than_a_pipe_do_not_deadlock(faulty_root):
    """Every task here (a sample carrying 3000 word skips) is several times a pipe's 64 KiB, and
    so is every outcome: the parent must read results while tasks are still being sent."""
    import dataclasses
    import threading

    from wds_ocr.data.sources import Skip, list_source

    config = load_config(None, settings())
    listed = [s for s in list_source(faulty_root, "train", config.source).samples if s.words][:2]
    skips = tuple(Skip(listed[0].name, f"a long reason for leaving out word {i} " + "x" * 80, f"w{i}")
                  for i in range(3000))
    samples = [dataclasses.replace(listed[i % 2], skips=skips) for i in range(16)]
    workers = _workers_up(config)
    got: list = []
    runner = threading.Thread(target=lambda: got.extend(workers_module.outcomes(samples, config, range(16), workers)),
                              daemon=True)
    try:
        runner.start()
        runner.join(120)
        assert not runner.is_alive(), "the build's parent and workers deadlocked on full pipes"
    finally:
        for worker in workers.workers:
            worker.process.kill()
        workers.close()
    assert [o.position for o in got] == list(range(16))
    assert all(len(o.skips) >= 3000 for o in got)

def test_closing_with_records_unread_kills_the_workers_instead_of_waiting(faulty_root, monkeypatch):
    """A failed or interrupted build closes its workers while they may be blocked handing back
    records: they are killed, not given EXIT_TIMEOUT to exit on their own."""
    from wds_ocr.data.sources import list_source

    monkeypatch.setattr(workers_module, "EXIT_TIMEOUT", 60.0)
    config = load_config(None, settings(640))
    samples = [s for s in list_source(faulty_root, "train", config.source).samples if s.words]
    workers = _workers_up(config)
    for position in range(8):
        workers.submit(position, samples[position % len(samples)])
    deadline = time.monotonic() + 60
    while not all(w.results.poll() for w in workers.workers):  # records are waiting, unread
        assert time.monotonic() < deadline
        time.sleep(0.02)
    started = time.monotonic()
    workers.close()
    assert time.monotonic() - started < 30  # far below the 60 s a graceful exit would be given
    assert [w.process.exitcode for w in workers.workers] == [-signal.SIGKILL] * 2
    assert not any(w.feeder.is_alive() for w in workers.workers)

@pytest.mark.parametrize("fate", ["killed", "silent"])
def test_a_worker_that_dies_or_hangs_stops_the_build_naming_the_sample(faulty_root, fate):
    from wds_ocr.data.sources import list_source

    config = load_config(None, settings())
    samples = list_source(faulty_root, "train", config.source).samples
    workers = _workers_up(config, sample_timeout=1.0)
    try:
        for worker in workers.workers:
            os.kill(worker.process.pid, signal.SIGSTOP)  # it cannot answer before its fate
        workers.submit(0, samples[0])
        if fate == "killed":
            os.kill(workers.workers[0].process.pid, signal.SIGKILL)
        with pytest.raises(BuildError) as caught:
            workers.next_outcome()
        where = f"sample {samples[0].name!r} (listing position 0)"
        who = f"build worker 0 (pid {workers.workers[0].process.pid})"
        if fate == "killed":
            assert str(caught.value).startswith(f"{who} exited (code -9) while working on {where}; the build stops "
                                                "here and a rerun resumes after the last finished shard")
        else:
            assert str(caught.value).startswith(f"{who} gave no answer for 1 s on {where}; the build stops here")
    finally:
        for worker in workers.workers:
            if worker.process.is_alive():
                os.kill(worker.process.pid, signal.SIGCONT)
        workers.close()
    assert not any(worker.process.is_alive() for worker in workers.workers)

# --- crash safety ------------------------------------------------------------------------------

KILL_SETTINGS = settings(640, 2)


@pytest.fixture(scope="module")
def kill_reference(synth_root, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("kill_reference") / "shards"
    build(synth_root, out, KILL_SETTINGS)
    return snapshot(out)


@pytest.mark.parametrize(
    "kill_when",
    [
        "shard-000000.tar",  # right after the first rename (its journal entry may or may not exist)
        ".journal.shard/shard-000001.tar.json",  # two shards journaled
        ".shard-000003.tar.tmp",  # in the middle of writing a shard
    ],
)
def test_sigkilled_build_resumes_to_identical_bytes(synth_root, tmp_path, kill_reference, kill_when):
    out = tmp_path / "shards"
    command = [sys.executable, "-m", "wds_ocr", "build-shards", str(synth_root), "--split", "train",
               "--out", str(out), "--quiet"]
    for override in KILL_SETTINGS:
        command += ["--set", override]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    try:
        while not (out / kill_when).exists():
            assert process.poll() is None, f"build ended before {kill_when} appeared: {process.stderr.read()!r}"
            assert time.monotonic() < deadline, f"{kill_when} never appeared"
            time.sleep(0.001)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists(), "the build finished before it was killed"
    journaled = len(list((out / ".journal.shard").glob("*.tar.json")))
    if kill_when.startswith(".journal"):
        assert journaled >= 2

    result = cli_build(synth_root, out, KILL_SETTINGS)
    assert result.exit_code == 0, result.output
    assert "samples in 9: written 9, rejected 0; words skipped 0" in result.output
    megabytes = sum(len(data) for name, data in kill_reference.items() if name.endswith(".tar")) / 1e6
    if journaled:
        assert (f"5 shards (at most 2 samples or 1.1 GB each: shards.max_samples, shards.max_bytes), "
                f"{megabytes:.1f} MB, {journaled} reused from an earlier run;") in result.output
    else:
        assert "reused" not in result.output
    assert snapshot(out) == kill_reference


@pytest.fixture(scope="module")
def small_reference(synth_root, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("small_reference") / "shards"
    build(synth_root, out, settings(128, 2))
    return snapshot(out)


def test_killed_after_the_manifest_temporary_resumes_identically(synth_root, tmp_path, small_reference, monkeypatch):
    out = tmp_path / "shards"

    def die_while_writing(path: Path, manifest) -> None:
        path.with_name(f".{path.name}.tmp").write_bytes(manifest.to_json().encode()[:100])
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(build_module, "write_manifest", die_while_writing)
        with pytest.raises(KeyboardInterrupt):
            build(synth_root, out, settings(128, 2))
    (out / ".lock.shard").touch()  # a killed process leaves its (unlocked) lock file behind
    assert (out / ".manifest.json.tmp").exists() and not (out / "manifest.json").exists()
    result = build(synth_root, out, settings(128, 2))
    assert result.reused_shards == 5 and not result.up_to_date
    assert snapshot(out) == small_reference


def test_killed_before_the_journal_was_removed_is_up_to_date(synth_root, tmp_path, small_reference, monkeypatch):
    out = tmp_path / "shards"
    with monkeypatch.context() as patch:
        patch.setattr(Journal, "remove", lambda self: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            build(synth_root, out, settings(128, 2))
    assert (out / ".journal.shard").is_dir() and (out / "manifest.json").is_file()
    result = build(synth_root, out, settings(128, 2))
    assert result.up_to_date
    assert snapshot(out) == small_reference


def test_shard_renamed_without_its_journal_entry_is_rebuilt(synth_root, tmp_path, small_reference, monkeypatch):
    out = tmp_path / "shards"
    original_add = Journal.add
    calls = []

    def add_then_die(self, entry) -> None:
        calls.append(entry.shard.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        original_add(self, entry)

    with monkeypatch.context() as patch:
        patch.setattr(Journal, "add", add_then_die)
        with pytest.raises(KeyboardInterrupt):
            build(synth_root, out, settings(128, 2))
    assert (out / "shard-000001.tar").is_file()
    assert not (out / ".journal.shard" / "shard-000001.tar.json").exists()
    result = build(synth_root, out, settings(128, 2))
    assert result.reused_shards == 1
    assert snapshot(out) == small_reference


def test_interrupted_build_resumes_after_its_journaled_shards(synth_root, tmp_path, small_reference):
    out = tmp_path / "shards"
    with pytest.raises(KeyboardInterrupt):
        build(synth_root, out, settings(128, 2), progress=interrupt_after(5))
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert not list(out.glob(".*.tmp"))  # the open shard was dropped
    seen = []
    result = build(synth_root, out, settings(128, 2), progress=lambda p: seen.append((p.done, p.reused)))
    assert result.reused_shards == 2
    assert seen[0] == (5, 4) and seen[-1] == (9, 4)  # continued at sample 4 of 9 (0-based), 4 reused
    assert snapshot(out) == small_reference


def test_stale_journal_from_another_config_is_discarded(synth_root, tmp_path):
    out = tmp_path / "shards"
    with pytest.raises(KeyboardInterrupt):
        build(synth_root, out, settings(128, 2), progress=interrupt_after(5))
    settings_file = out / ".journal.shard" / "settings.json"
    assert json.loads(settings_file.read_text())["fingerprint"] == load_config(None, settings(128, 2)).fingerprint()
    with pytest.raises(BuildError) as refused:  # the interrupted build's shards are not this build's to replace
        build(synth_root, out, settings(96, 2))
    assert str(refused.value) == (
        f"{out} holds shards built with other settings (an interrupted build under other settings left "
        ".journal.shard); pass --overwrite (overwrite=True) to replace them (a run reading them will stop with "
        "an error), or build into another --out")
    result = build(synth_root, out, settings(96, 2), overwrite=True)
    assert result.reused_shards == 0
    build(synth_root, tmp_path / "clean", settings(96, 2))
    assert snapshot(out) == snapshot(tmp_path / "clean")


def test_journaled_shards_of_a_changed_image_are_rebuilt(synth_root, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(synth_root, source)
    out = tmp_path / "shards"
    with pytest.raises(KeyboardInterrupt):
        build(source, out, settings(128, 2), progress=interrupt_after(7))
    names = sorted(p.name for p in (source / "images" / "train").iterdir())
    assert len(list((out / ".journal.shard").glob("*.tar.json"))) == 3
    # Position 3 (in shard 1) now holds other pixels; annotations unchanged.
    shutil.copyfile(source / "images" / "train" / names[4], source / "images" / "train" / names[3])
    result = build(source, out, settings(128, 2))
    assert result.reused_shards == 1
    build(source, tmp_path / "clean", settings(128, 2))
    assert snapshot(out) == snapshot(tmp_path / "clean")


# --- rollover ---------------------------------------------------------------------------------


def test_rollover_by_sample_count(uneven_shards):
    manifest = load_manifest(uneven_shards)
    assert [e.samples for e in manifest.shards] == [4, 4, 1]
    keys = [k for e in manifest.shards for k in e.keys]
    assert keys == sorted(keys) and len(set(keys)) == 9
    assert [int(k.split("_")[0]) for k in keys] == [0, 1, 2, 3, 4, 5, 6, 7, 8]


def _projected(members_end: int, size: int) -> int:
    end = members_end + member_span(size) + 2 * BLOCK
    return math.ceil(end / (20 * BLOCK)) * 20 * BLOCK


def test_rollover_by_bytes_fills_shards_up_to_max_bytes(synth_root, tmp_path):
    max_bytes = 1 << 20
    result = build(synth_root, tmp_path / "s", ["transform.size=320", "shards.max_samples=1000",
                                                f"shards.max_bytes={max_bytes}"])
    shards = result.manifest.shards
    sizes = []
    for entry in shards:
        with open(tmp_path / "s" / entry.name, "rb") as handle:
            sizes.append([len(m.data) for m in iter_members(handle, entry.name)])
    assert all(200_000 < size < 320_000 for sample in sizes for size in sample)  # 0.2-0.3 MB compact records
    # greedily: a record opens a new shard when the open one could not take it within max_bytes
    expected, end = [0], 0
    for size in (size for sample in sizes for size in sample):
        if expected[-1] and _projected(end, size) > max_bytes:
            expected.append(0)
            end = 0
        expected[-1] += 1
        end += member_span(size)
    assert [e.samples for e in shards] == expected and len(expected) >= 3
    for index, entry in enumerate(shards):
        assert entry.bytes <= max_bytes
        if index + 1 < len(shards):  # full: the next shard's first record did not fit
            assert _projected(entry.members_end, sizes[index + 1][0]) > max_bytes


def test_a_record_larger_than_max_bytes_gets_a_shard_of_its_own(synth_root, tmp_path):
    result = build(synth_root, tmp_path / "s", ["transform.size=832", "shards.max_bytes=1048576"])  # 1.3-2.1 MB
    shards = result.manifest.shards
    assert [e.samples for e in shards] == [1] * 9
    assert all(e.bytes > 1 << 20 for e in shards)


# --- rejects ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faulty_root(synth_root, tmp_path_factory) -> Path:
    """The synthetic train split plus one of every kind of bad sample and bad word."""
    root = tmp_path_factory.mktemp("faulty") / "data"
    shutil.copytree(synth_root, root)
    images = root / "images" / "train"
    annotation = root / "jsons" / "train.json"
    doc = json.loads(annotation.read_text())
    entries = doc["images"]
    first = sorted(entries)[0]
    good = images / first
    words = entries[first]["words"]
    shutil.copyfile(good, images / DOTTED)
    entries[DOTTED] = {"words": words}
    entries["missing.jpg"] = {"words": words}
    (images / "empty.jpg").write_bytes(b"")
    entries["empty.jpg"] = {"words": words}
    (images / "truncated.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    entries["truncated.jpg"] = {"words": words}
    (images / "notes.jpg").write_text("shopping list: milk, eggs\n")
    entries["notes.jpg"] = {"words": words}
    shutil.copyfile(good, images / "orphan.jpg")  # no JSON entry
    bad_words = {
        "w_two": [[1, 1], [5, 5]],
        "w_nan": [[float("nan"), 1], [5, 1], [5, 5]],
        "w_flat": [[10, 10], [20, 10], [30, 10], [40, 10]],
        "w_far": [[5000, 5000], [5100, 5000], [5100, 5100], [5000, 5100]],
    }
    second = [name for name in sorted(entries) if name.startswith("synth_")][-1]
    for word_id, points in bad_words.items():
        entries[second]["words"][word_id] = {"points": points, "transcription": "X"}
    annotation.write_text(json.dumps(doc))  # NaN is written as the NaN literal, which json reads back
    return root


def test_rejects_are_counted_listed_and_explained(faulty_root, tmp_path):
    out = tmp_path / "s"
    result = cli_build(faulty_root, out, settings(128, 4))
    assert result.exit_code == 0, result.output
    manifest = load_manifest(out)
    counts = manifest.counts
    assert {k: v for k, v in counts.as_dict().items() if k != "words"} == {
        "samples_in": 15, "written": 10, "rejected": 5, "words_skipped": 4}
    assert counts.samples_in == counts.written + counts.rejected
    assert manifest.coverage.summary() in result.output.splitlines()
    assert "samples in 15: written 10, rejected 5; words skipped 4" in result.output
    assert f"details: {out / 'rejects.jsonl'}" in result.output

    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    images = faulty_root / "images" / "train"
    annotation = faulty_root / "jsons" / "train.json"
    names = sorted(p.name for p in images.iterdir()) + ["missing.jpg"]
    index = {name: i for i, name in enumerate(sorted(names))}
    second = sorted(n for n in names if n.startswith("synth_"))[-1]
    by_name = {(r["name"], r["word_id"]): r for r in rejects}
    assert len(rejects) == 9
    assert by_name[("orphan.jpg", None)] == {
        "index": None, "kind": "sample", "name": "orphan.jpg", "word_id": None,
        "reason": f"image has no entry in {annotation}",
    }
    assert by_name[("missing.jpg", None)]["reason"] == (
        f"image file not found: {images / 'missing.jpg'}; check the dataset folder and the file name")
    assert by_name[("empty.jpg", None)]["reason"] == (
        f"image file is empty (0 bytes): {images / 'empty.jpg'}; re-export or re-copy the image")
    assert by_name[("truncated.jpg", None)]["reason"] == (
        "truncated JPEG: the file ends before its end-of-image marker; copy or download the file again (it is incomplete)")
    assert by_name[("notes.jpg", None)]["reason"] == (
        "not an image: the data starts with b'shopping', not a JPEG, PNG, WebP, TIFF or BMP signature; "
        "check that the file is really an image")
    for name in ("missing.jpg", "empty.jpg", "truncated.jpg", "notes.jpg"):
        assert by_name[(name, None)]["index"] == index[name] and by_name[(name, None)]["kind"] == "sample"
    word_reasons = {r["word_id"]: r["reason"] for r in rejects if r["kind"] == "word"}
    assert {r["name"] for r in rejects if r["kind"] == "word"} == {second}
    assert word_reasons["w_two"] == "polygon has 2 points, need at least 3"
    assert word_reasons["w_nan"] == "points contain NaN or infinity"
    assert word_reasons["w_flat"] == "polygon has zero area"
    assert word_reasons["w_far"].startswith("points outside the ")
    assert "x in [5000, 5100], y in [5000, 5100]" in word_reasons["w_far"]
    # Listing order: rejects found while listing first, then by index, a sample's words by id.
    assert [(r["name"], r["word_id"]) for r in rejects] == [
        ("orphan.jpg", None), ("empty.jpg", None), ("missing.jpg", None), ("notes.jpg", None),
        (second, "w_far"), (second, "w_flat"), (second, "w_nan"), (second, "w_two"), ("truncated.jpg", None),
    ]

    dotted_key = record_key(index[DOTTED], DOTTED)
    assert dotted_key == "0000000_drp_en_ko_in_house_selectstar_000058"
    record, shard = read_record(out, manifest, dotted_key)
    assert record.meta.name == DOTTED and record.key == dotted_key and shard == "shard-000000.tar"
    written_names = {read_record(out, manifest, k)[0].meta.name for e in manifest.shards for k in e.keys}
    assert written_names == {DOTTED} | {n for n in names if n.startswith("synth_")}


def test_partition_argument_is_validated():
    assert Partition.parse(" 1 / 4 ") == Partition(1, 4)
    assert Partition.parse("0/1").bounds(9) == (0, 9)
    assert [Partition(i, 3).bounds(10) for i in range(3)] == [(0, 3), (3, 6), (6, 10)]
    for text, message in [
        ("1-4", "--partition '1-4' must look like i/n, e.g. 0/4 (i counts from 0)"),
        ("4/4", "--partition '4/4': part i of n counts from 0, so it needs 0 <= i < n (here 0/4 .. 3/4)"),
        ("0/0", "--partition '0/0': n is the number of parts, at least 1"),
    ]:
        with pytest.raises(UsageError) as caught:
            Partition.parse(text)
        assert str(caught.value) == message


def test_a_second_build_into_the_same_folder_is_refused_while_one_runs(synth_root, tmp_path):
    out = tmp_path / "s"
    holder = {}

    def progress(p) -> None:
        if p.done == 1:
            with pytest.raises(Exception) as caught:
                build(synth_root, out, settings())
            holder["message"] = str(caught.value)

    build(synth_root, out, settings(), progress=progress)
    assert holder["message"] == (f"{out} is being written by another build (whole, partitioned or a merge) (lock "
                                 ".lock); wait for it or use another --out: a whole build and a partitioned build "
                                 "never share a folder")
    assert not (out / ".lock.shard").exists() and not (out / ".lock").exists()
    assert os.listdir(out) and not list(out.glob(".journal*"))


def test_whole_and_partitioned_builds_never_share_a_folder_at_once(synth_root, tmp_path):
    """The parts of one array job build side by side; a whole build or a merge into their folder
    is refused while any part runs, and a part is refused while a whole build runs."""
    from wds_ocr.shards.merge import merge_parts

    out = tmp_path / "s"
    seen = {}

    def during_part_0(p) -> None:
        if p.done == 1 and "part 1" not in seen:
            # another process, as an array job's other task would be (in-process builds share state)
            part = subprocess.run([sys.executable, "-m", "wds_ocr", "build-shards", str(synth_root), "--split", "train",
                                   "--out", str(out), "--partition", "1/2", "--quiet",
                                   *[a for o in settings() for a in ("--set", o)]], capture_output=True, text=True,
                                  timeout=300)
            seen["part 1"] = (part.returncode, part.stderr)
            for what, action in (("whole", lambda: build(synth_root, out, settings())),
                                 ("merge", lambda: merge_parts(out))):
                with pytest.raises(BuildError) as caught:
                    action()
                seen[what] = str(caught.value)

    build(synth_root, out, settings(), partition=Partition(0, 2), progress=during_part_0)
    assert seen["part 1"][0] == 0, seen["part 1"]
    assert seen["whole"] == seen["merge"] == (
        f"{out} is being written by another build (whole, partitioned or a merge) (lock .lock); wait for it or use "
        "another --out: a whole build and a partitioned build never share a folder")
    assert not (out / ".lock").exists()

    other = tmp_path / "w"

    def during_whole(p) -> None:
        if p.done == 1 and "part" not in seen:
            with pytest.raises(BuildError) as caught:
                build(synth_root, other, settings(), partition=Partition(0, 2))
            seen["part"] = str(caught.value)

    build(synth_root, other, settings(), progress=during_whole)
    assert seen["part"] == (f"{other} is being written by a whole build or a merge (lock .lock); wait for it or use "
                            "another --out: a whole build and a partitioned build never share a folder")
    assert merge_parts(out)[0].counts.written == load_manifest(other).counts.written


# --- up to date ---------------------------------------------------------------------------------


def stats(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_rerun_with_nothing_changed_says_so_and_rewrites_nothing(synth_root, tmp_path):
    out = tmp_path / "s"
    build(synth_root, out, settings())
    before, files = stats(out), snapshot(out)
    result = cli_build(synth_root, out, settings())
    assert result.exit_code == 0, result.output
    assert result.output == f"{out / 'manifest.json'} is up to date (9 samples in 3 shards); nothing to do\n"
    assert stats(out) == before and snapshot(out) == files


def test_rerun_after_a_source_image_changed_rebuilds(synth_root, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(synth_root, source)
    out = tmp_path / "s"
    first = build(source, out, settings())
    names = sorted(p.name for p in (source / "images" / "train").iterdir())
    shutil.copyfile(source / "images" / "train" / names[1], source / "images" / "train" / names[0])
    again = build(source, out, settings())
    assert not again.up_to_date and again.reused_shards == 0
    assert again.manifest.source["fingerprint"] != first.manifest.source["fingerprint"]
    assert again.manifest.source["annotation_sha256"] == first.manifest.source["annotation_sha256"]


def test_rerun_with_other_shard_settings_rebuilds_and_removes_old_shards(synth_root, tmp_path):
    out = tmp_path / "s"
    build(synth_root, out, settings(128, 2))
    with pytest.raises(BuildError) as refused:
        build(synth_root, out, settings(128, 4))
    assert str(refused.value) == (
        f"{out} holds shards built with other settings (manifest.json: shards.max_samples: 2 there, 4 now); pass "
        "--overwrite (overwrite=True) to replace them (a run reading them will stop with an error), or build into "
        "another --out")
    result = build(synth_root, out, settings(128, 4), overwrite=True)
    assert not result.up_to_date
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]


def test_verify_names_files_of_another_build_in_the_folder(synth_root, tmp_path):
    """What two kinds of build racing into one folder used to leave: a whole build's manifest beside
    a part's shards and part manifest. verify reports both; a merged folder's own parts are fine."""
    from wds_ocr.shards.merge import merge_parts
    from wds_ocr.shards.verify import verify_shards

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    build(synth_root, whole, settings())
    for index in range(2):
        build(synth_root, parts, settings(), partition=Partition(index, 2))
    merge_parts(parts)
    assert verify_shards(parts).ok, verify_shards(parts).problems
    assert verify_shards(whole).ok
    foreign = sorted(p.name for p in parts.iterdir() if p.name.startswith("shard-p000of002"))
    for name in [*foreign, "manifest.part-p000of002.json"]:
        shutil.copy(parts / name, whole / name)
    problems = [(p.shard, p.what) for p in verify_shards(whole).problems]
    assert problems == [
        (None, "manifest.part-p000of002.json is a part manifest of a partitioned build whose shards this manifest "
               "does not hold (another build's?); remove it or rebuild the folder"),
        *[(name, "shard file in the folder that this manifest does not account for (another build's: a whole and "
                 "a partitioned build into one folder?); remove it or rebuild the folder") for name in foreign]]
