"""A real 2-process torch.distributed (gloo) run of the loader over uneven shards."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from collections import Counter

from wds_ocr.shards.manifest import load_manifest

WORKER = textwrap.dedent(
    """
    import json, sys
    from datetime import timedelta
    import torch
    import torch.distributed as dist
    from wds_ocr.loader.loaders import make_loader
    from wds_ocr.loader.stream import ShardStream

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    folder = sys.argv[1]
    stream = ShardStream(folder, batch_size=2, train=True, seed=3)  # rank/world from torch.distributed
    steps = 0
    for epoch in range(3):
        stream.set_epoch(epoch)
        for batch in make_loader(stream, 2, mode="processes"):
            # the collective every DDP step performs: a rank with fewer batches would hang here
            signal = torch.tensor([float(len(batch))])
            dist.all_reduce(signal)
            steps += 1
    dist.barrier()
    evaluation = ShardStream(folder, batch_size=2)
    keys = [k for b in make_loader(evaluation, 2, mode="processes") for k in b.keys]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, keys)
    if dist.get_rank() == 0:
        print(json.dumps({"steps": steps, "keys": gathered}))
    dist.destroy_process_group()
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_ranks(location: str, tmp_path, env: dict[str, str] | None = None) -> dict:
    """WORKER on 2 gloo ranks over ``location``; rank 0's JSON."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    procs = []
    for rank in range(2):
        environment = dict(os.environ, **(env or {}), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                           WORLD_SIZE="2", LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, str(script), str(location)], env=environment,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err[-2000:]
            outputs.append(out)
    finally:
        for proc in procs:
            proc.kill()
    return json.loads(outputs[0].strip().splitlines()[-1])


def check_disjoint_and_complete(result: dict, manifest) -> None:
    assert result["steps"] == 3 * 2  # 9 samples padded to 10: 5 per rank, 2 full batches, 3 epochs
    keys = [k for part in result["keys"] for k in part]
    expected = [k for entry in manifest.shards for k in entry.keys]
    assert Counter(keys) == Counter(expected) and len(keys) == 9


def test_two_process_gloo_run_over_uneven_shards_finishes(uneven_shards, tmp_path):
    check_disjoint_and_complete(run_two_ranks(str(uneven_shards), tmp_path), load_manifest(uneven_shards))
