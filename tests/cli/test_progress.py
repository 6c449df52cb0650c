"""Progress output: a bar on a terminal, plain lines (no carriage returns) in files and CI logs."""

from __future__ import annotations

import io

from wds_ocr.cli.progress import Progress


def test_plain_lines_when_not_on_a_terminal(monkeypatch):
    monkeypatch.setenv("WDS_OCR_PROGRESS_SECONDS", "0")
    out = io.StringIO()
    progress = Progress("train", "step", stream=out, terminal=False)
    for step in range(0, 5):
        progress.update(step, 4 if step < 4 else 4, loss="1.2500")
    progress.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0].startswith("train: 0/4 steps (0%)") and lines[0].endswith("; loss 1.2500")
    assert lines[-1].startswith("train: 4/4 steps (100%), ") and ("s/step" in lines[-1] or "steps/s" in lines[-1])
    assert len(lines) == 5  # every update (interval 0); the final state is not printed twice


def test_lines_are_spaced_by_the_interval(monkeypatch):
    monkeypatch.setenv("WDS_OCR_PROGRESS_SECONDS", "3600")
    out = io.StringIO()
    progress = Progress("build", "sample", stream=out, terminal=False)
    for done in range(1, 101):
        progress.update(done, 100, written=done, rejected=0)
    progress.close()
    lines = out.getvalue().splitlines()
    assert [line.split(";")[0].split(",")[0] for line in lines] == ["build: 1/100 samples (1%)",
                                                                    "build: 100/100 samples (100%)"]
    assert lines[-1].endswith("; written 100, rejected 0")


def test_a_bar_on_a_terminal_and_nothing_when_quiet():
    out = io.StringIO()
    progress = Progress("evaluate", "img", stream=out, terminal=True)
    progress.update(3, 10)
    progress.close()
    assert "\r" in out.getvalue() and "3/10" in out.getvalue()
    quiet = io.StringIO()
    silent = Progress("evaluate", "img", quiet=True, stream=quiet, terminal=False)
    silent.update(3, 10)
    silent.close()
    assert quiet.getvalue() == ""
