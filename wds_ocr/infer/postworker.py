"""A post-processing worker: ``python -m wds_ocr.infer.postworker RING_FD``, started by ``PostPool``.

It reads the ring message (layout, map form, settings), maps the ring file it inherited as
``RING_FD`` read-only, says it is ready, then scores one task per frame until its input closes
(the parent is done, or died). An exception is reported to the parent as an error frame (the
traceback goes to stderr, which the parent quotes) and ends the worker. It imports no torch.
"""

from __future__ import annotations

import mmap
import os
import signal
import sys
import traceback
from typing import BinaryIO

import numpy as np

from wds_ocr.config import PostprocessConfig
from wds_ocr.infer.handoff import RingLayout, outcome_message, pack_frame, read_frame, truth_from_message
from wds_ocr.infer.scoring import MapForm, ScoringSettings, score_image

WORKER_MODULE = "wds_ocr.infer.postworker"


def serve(source: BinaryIO, sink: BinaryIO, ring_fd: int) -> None:
    """The worker loop: a ring message, then tasks until the input closes; maps are read from the
    ring file inherited as descriptor ``ring_fd``."""
    import cv2

    cv2.setNumThreads(1)
    hello = read_frame(source)
    if hello is None:
        return
    if hello.get("op") != "ring":
        raise ValueError(f"expected the ring message first, got {hello.get('op')!r}")
    form = MapForm(hello["form"], None if hello["table"] is None else np.frombuffer(hello["table"], dtype="<f4"))
    layout = RingLayout(hello["groups"], hello["capacity"], hello["map_size"], form.dtype.itemsize)
    mapping = mmap.mmap(ring_fd, max(1, layout.nbytes), access=mmap.ACCESS_READ)
    maps = np.frombuffer(mapping, dtype=form.dtype, count=layout.groups * layout.capacity * layout.map_size ** 2
                         ).reshape(layout.groups, layout.capacity, layout.map_size, layout.map_size)
    settings = ScoringSettings(PostprocessConfig.model_validate(hello["postprocess"]), hello["metric"],
                               tuple(PostprocessConfig.model_validate(a) for a in hello.get("alternatives", ())))
    sink.write(pack_frame({"op": "ready", "pid": os.getpid()}))
    sink.flush()
    while (message := read_frame(source)) is not None:
        truth = truth_from_message(message)
        try:
            outcome = score_image(maps[message["group"], message["row"]], form, truth, settings)
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it there
            traceback.print_exc()
            sink.write(pack_frame({"op": "error", "id": message["id"], "error": f"{type(exc).__name__}: {exc}"}))
            sink.flush()
            raise SystemExit(1) from None
        sink.write(pack_frame(outcome_message(message["id"], outcome)))
        sink.flush()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when its workers stop
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        raise SystemExit(f"usage: python -m {WORKER_MODULE} RING_FD (started by PostPool, not by hand)")
    serve(sys.stdin.buffer, sys.stdout.buffer, int(sys.argv[1]))


if __name__ == "__main__":
    main()
