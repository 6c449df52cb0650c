"""Shards in an S3 bucket, against a real S3 API server (moto's server mode) on 127.0.0.1 that the
tests start themselves; they skip where moto or boto3 is missing or the server does not start."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from wds_ocr.cli import cli
from wds_ocr.errors import IntegrityError, ManifestError, RemoteError, ShardFormatError
from wds_ocr.loader.loaders import make_loader
from wds_ocr.storage.reader import RemoteSettings
from wds_ocr.loader.stream import ShardStream

pytest.importorskip("boto3")
pytest.importorskip("moto")

SETTINGS = ("--set", "transform.size=64", "--set", "shards.max_samples=4")
FAST = RemoteSettings(connect_timeout=2, stall_timeout=2, request_deadline=4, batch_deadline=8, tries=2, backoff=0.1)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class S3Server:
    """``python -m moto.server`` on 127.0.0.1 in a process of its own."""

    def __init__(self):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.skip("moto's S3 server did not start")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        pytest.skip("moto's S3 server did not answer within 20 s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _env(server: S3Server) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": server.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    """The server, its environment applied, and a boto3 client with a bucket 'shards'."""
    import boto3

    server = S3Server()
    saved = {k: os.environ.get(k) for k in _env(server)}
    os.environ.update(_env(server))
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    try:
        client = boto3.client("s3")
        client.create_bucket(Bucket="shards")
        yield server, client
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def objects(client, prefix: str) -> dict[str, bytes]:
    listing = client.list_objects_v2(Bucket="shards", Prefix=prefix + "/").get("Contents", [])
    return {item["Key"][len(prefix) + 1:]: client.get_object(Bucket="shards", Key=item["Key"])["Body"].read()
            for item in listing}


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def bucket_build(s3, synth_root, tmp_path_factory):
    """train built into s3://shards/run/train, and the same build into a local folder."""
    _, client = s3
    local = tmp_path_factory.mktemp("local") / "train"
    assert run("build-shards", synth_root, "--split", "train", "--out", local, "--workers", "1", *SETTINGS).exit_code == 0
    staging = tmp_path_factory.mktemp("staging") / "train"
    result = run("build-shards", synth_root, "--split", "train", "--out", "s3://shards/run/train", "--workers", "1",
                 "--staging", staging, *SETTINGS)
    assert result.exit_code == 0, result.output
    return local, staging, result.output


def test_a_bucket_build_uploads_the_bytes_of_a_folder_build(s3, bucket_build):
    _, client = s3
    local, _, output = bucket_build
    assert "s3://shards/run/train: 3 shards uploaded, 0 already there" in output
    assert "manifest: s3://shards/run/train/manifest.json" in output
    stored = objects(client, "run/train")
    assert sorted(stored) == ["manifest.json", "rejects.jsonl", "shard-000000.tar", "shard-000001.tar",
                              "shard-000002.tar"]
    for name, data in stored.items():
        assert data == (local / name).read_bytes(), name
    head = client.head_object(Bucket="shards", Key="run/train/shard-000001.tar")
    assert head["Metadata"]["sha256"] == hashlib.sha256(stored["shard-000001.tar"]).hexdigest()


def test_a_rebuild_uploads_only_what_the_bucket_lacks(s3, synth_root, bucket_build, tmp_path):
    _, client = s3
    again = run("build-shards", synth_root, "--split", "train", "--out", "s3://shards/run/train", "--workers", "1",
                *SETTINGS)  # default staging: every shard is built again, none is sent again
    assert again.exit_code == 0, again.output
    assert "s3://shards/run/train: 0 shards uploaded, 3 already there" in again.output
    # A build killed after its first upload: later shards and the manifest never arrived.
    client.delete_objects(Bucket="shards", Delete={"Objects": [{"Key": "run/train/shard-000002.tar"},
                                                               {"Key": "run/train/manifest.json"}]})
    before = client.head_object(Bucket="shards", Key="run/train/shard-000000.tar")["LastModified"]
    resumed = run("build-shards", synth_root, "--split", "train", "--out", "s3://shards/run/train", "--workers", "1",
                  *SETTINGS)
    assert resumed.exit_code == 0, resumed.output
    assert "s3://shards/run/train: 1 shards uploaded, 2 already there" in resumed.output
    assert client.head_object(Bucket="shards", Key="run/train/shard-000000.tar")["LastModified"] == before
    assert ShardStream("s3://shards/run/train", batch_size=9).manifest.total_samples == 9


def test_reads_from_the_bucket_equal_the_folders(s3, bucket_build):
    local, _, _ = bucket_build
    remote = ShardStream("s3://shards/run/train", batch_size=4, train=True, seed=3)
    here = ShardStream(local, batch_size=4, train=True, seed=3)
    assert remote.reader.describe("shard-000000.tar") == "s3://shards/run/train/shard-000000.tar"
    for mode in ("threads", "processes"):
        got = list(make_loader(remote, 2, mode=mode))
        want = list(make_loader(here, 2, mode=mode))
        assert [b.keys for b in got] == [b.keys for b in want]
        assert all(bytes(a.packed.payload.numpy()) == bytes(b.packed.payload.numpy()) for a, b in zip(got, want))


def test_verify_inspect_train_and_evaluate_from_the_bucket(s3, bucket_build, tmp_path):
    verified = run("verify", "s3://shards/run/train")
    assert verified.exit_code == 0, verified.output
    assert "3 shards, 9 records checked: OK" in verified.output
    inspected = run("inspect", "s3://shards/run/train", "--png", tmp_path / "record.png")
    assert inspected.exit_code == 0, inspected.output
    assert (tmp_path / "record.png").stat().st_size > 0
    trained = run("train", "--shards", "s3://shards/run/train", "--out", tmp_path / "run", "--max-steps", "2",
                  "--quiet", "--set", "model.neck_channels=16", "--set", "loader.batch_size=2",
                  "--set", "loader.workers=0")
    assert trained.exit_code == 0, trained.output
    evaluated = run("evaluate", "--checkpoint", tmp_path / "run" / "last.pt", "--shards", "s3://shards/run/train",
                    "--quiet", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert '"images": 9' in evaluated.output


def test_other_settings_in_the_prefix_are_refused_unless_overwrite(s3, synth_root):
    _, client = s3
    first = run("build-shards", synth_root, "--split", "val", "--out", "s3://shards/other/val", "--workers", "1",
                *SETTINGS)
    assert first.exit_code == 0, first.output
    before = objects(client, "other/val")
    refused = run("build-shards", synth_root, "--split", "val", "--out", "s3://shards/other/val", "--workers", "1",
                  "--set", "transform.size=96")
    assert refused.exit_code == 1, refused.output
    assert "s3://shards/other/val holds shards built with other settings (transform.size: 64 there, 96 now" in \
        refused.output
    assert "--overwrite" in refused.output
    assert objects(client, "other/val") == before
    replaced = run("build-shards", synth_root, "--split", "val", "--out", "s3://shards/other/val", "--workers", "1",
                   "--set", "transform.size=96", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert ShardStream("s3://shards/other/val").size == 96


def test_a_partitioned_build_merges_in_the_bucket(s3, synth_root, bucket_build):
    _, client = s3
    local, _, _ = bucket_build
    for part in ("0/2", "1/2"):
        built = run("build-shards", synth_root, "--split", "train", "--out", "s3://shards/parts/train",
                    "--partition", part, "--workers", "1", *SETTINGS)
        assert built.exit_code == 0, built.output
    assert "manifest.json" not in objects(client, "parts/train")
    merged = run("merge", "s3://shards/parts/train")
    assert merged.exit_code == 0, merged.output
    assert "merged 9 samples in" in merged.output and "s3://shards/parts/train/manifest.json" in merged.output
    whole = ShardStream(local, batch_size=9)
    parts = ShardStream("s3://shards/parts/train", batch_size=9)
    assert parts.manifest.fingerprint == whole.manifest.fingerprint
    assert [b.keys for b in make_loader(parts)] == [b.keys for b in make_loader(whole)]


def test_two_gloo_ranks_read_disjoint_parts_of_a_bucket(s3, uneven_shards, tmp_path):
    from test_loader_ddp import check_disjoint_and_complete, run_two_ranks

    _, client = s3
    for path in [uneven_shards / "manifest.json", *sorted(uneven_shards.glob("shard-*.tar"))]:
        client.upload_file(str(path), "shards", f"ddp/{path.name}")
    result = run_two_ranks("s3://shards/ddp", tmp_path)  # the server's environment is inherited
    check_disjoint_and_complete(result, ShardStream("s3://shards/ddp").manifest)


def test_a_replaced_object_is_caught_on_read(s3, synth_root):
    _, client = s3
    assert run("build-shards", synth_root, "--split", "train", "--out", "s3://shards/swap/train", "--workers", "1",
               *SETTINGS).exit_code == 0
    key = "swap/train/shard-000001.tar"
    data = bytearray(client.get_object(Bucket="shards", Key=key)["Body"].read())
    data[2000] ^= 0x01  # same size, one bit flipped
    client.put_object(Bucket="shards", Key=key, Body=bytes(data))
    with pytest.raises(IntegrityError) as caught:
        list(make_loader(ShardStream("s3://shards/swap/train", batch_size=9)))
    assert caught.value.shard == "shard-000001.tar"
    client.put_object(Bucket="shards", Key=key, Body=bytes(data[:-1024]))  # another size
    with pytest.raises(ShardFormatError, match=r"is \d+ bytes, the manifest says \d+ \(rebuilt or replaced\?\)"):
        list(make_loader(ShardStream("s3://shards/swap/train", batch_size=9)))


def test_a_manifest_cannot_name_objects_outside_its_prefix(s3, bucket_build):
    _, client = s3
    manifest = client.get_object(Bucket="shards", Key="run/train/manifest.json")["Body"].read()
    client.put_object(Bucket="shards", Key="evil/manifest.json",
                      Body=manifest.replace(b'"shard-000000.tar"', b'"../run/train/shard-000000.tar"'))
    with pytest.raises(ManifestError, match="shard"):
        ShardStream("s3://shards/evil")


def test_locations_wds_ocr_cannot_write_are_errors(tmp_path, synth_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("build-shards", synth_root, "--split", "val", "--out", "gs://bucket/val")
    assert result.exit_code == 2
    assert "--out gs://bucket/val: wds-ocr cannot write to gs:// locations; give a local folder or s3://bucket/prefix" \
        in result.output
    assert list(tmp_path.iterdir()) == []
    bad = run("build-shards", synth_root, "--split", "val", "--out", "s3://Bad_Bucket/val")
    assert bad.exit_code == 2 and "'bad_bucket' is not a bucket name" in bad.output.lower()


def test_a_stopped_server_is_a_prompt_error_not_a_hang(synth_root, tmp_path, monkeypatch):
    import boto3

    server = S3Server()
    try:
        for key, value in _env(server).items():
            monkeypatch.setenv(key, value)
        boto3.client("s3").create_bucket(Bucket="shards")
        assert run("build-shards", synth_root, "--split", "train", "--out", "s3://shards/t", "--workers", "1",
                   *SETTINGS).exit_code == 0
        stream = ShardStream("s3://shards/t", batch_size=4, remote=FAST)
        batches = iter(make_loader(stream, 1, mode="threads"))
        next(batches)
    finally:
        server.stop()
    started = time.monotonic()
    with pytest.raises(RemoteError, match=r"GET http://127\.0\.0\.1:\d+/shards/t/shard-00000\d\.tar bytes"):
        for _ in batches:
            pass
    assert time.monotonic() - started < 12
    gone = run("build-shards", synth_root, "--split", "val", "--out", "s3://shards/t2", "--workers", "1", *SETTINGS)
    assert gone.exit_code == 1, gone.output
    assert "s3://shards/t2" in gone.output and "Traceback" not in gone.output


def test_a_server_stopped_mid_upload_stops_the_build_with_an_error_and_a_rerun_resumes_its_work(synth_root, tmp_path,
                                                                                        monkeypatch):
    import boto3

    from wds_ocr.config import load_config
    from wds_ocr.shards.bucket import build_to_bucket
    from wds_ocr.storage.s3 import S3Url

    server = S3Server()
    for key, value in _env(server).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    boto3.client("s3").create_bucket(Bucket="shards")
    config = load_config(None, ["transform.size=64", "shards.max_samples=2"])
    staging = tmp_path / "staging"

    def stop_midway(progress) -> None:
        if progress.done == 5:  # two shards are final and queued or sent; the rest are not
            server.stop()

    try:
        with pytest.raises(RemoteError, match=r"s3://shards/cut/shard-00000\d\.tar"):
            build_to_bucket(synth_root, "train", S3Url.parse("s3://shards/cut"), config, progress=stop_midway,
                            staging=staging)
    finally:
        server.stop()
    assert sorted(p.name for p in staging.glob("shard-*.tar"))[:2] == ["shard-000000.tar", "shard-000001.tar"]
    again = S3Server()  # a new, empty server: every shard is uploaded, none is built again
    try:
        for key, value in _env(again).items():
            monkeypatch.setenv(key, value)
        boto3.client("s3").create_bucket(Bucket="shards")
        resumed = build_to_bucket(synth_root, "train", S3Url.parse("s3://shards/cut"), config, staging=staging)
        assert resumed.result.reused_shards >= 2
        assert (resumed.uploaded, resumed.kept) == (len(resumed.result.manifest.shards), 0) == (5, 0)
        assert ShardStream("s3://shards/cut").manifest.total_samples == 9
    finally:
        again.stop()


def test_missing_objects_and_misused_options_are_one_clear_error(s3, synth_root, tmp_path):
    verified = run("verify", "s3://shards/nothing-here")
    assert verified.exit_code == 1 and "Traceback" not in verified.output
    assert "s3://shards/nothing-here/manifest.json does not exist" in verified.output
    merged = run("merge", "s3://shards/nothing-here")
    assert merged.exit_code == 1
    assert "s3://shards/nothing-here holds no part manifests (manifest.part-i-of-n.json)" in merged.output
    staged = run("build-shards", synth_root, "--split", "val", "--out", tmp_path / "folder", "--staging", tmp_path / "s")
    assert staged.exit_code == 2 and "--staging is for --out s3://bucket/prefix only" in staged.output
    assert not (tmp_path / "folder").exists()
