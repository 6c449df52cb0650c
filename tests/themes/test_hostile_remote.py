"""Hostile remote locations (issue 9, points 2 and 3): manifests that try to redirect reads, and
misbehaving HTTP servers on 127.0.0.1 — dropped connections, trickling bytes, no Range support,
endless bodies, wrong bytes, redirects. Each test asserts the message and that time and memory
stay bounded; deadlines are shortened to seconds."""

from __future__ import annotations

import gc
import http.client
import http.server
import json
import re
import threading
import time
import tracemalloc
import urllib.parse
from pathlib import Path

import pytest

from conftest import build_small_shards
from wds_ocr.errors import IntegrityError, ManifestError, RemoteError
from wds_ocr.storage.http import HttpReader
from wds_ocr.storage.location import open_shards
from wds_ocr.storage.reader import RemoteSettings
from wds_ocr.loader.loaders import make_loader
from wds_ocr.loader.stream import ShardStream
from wds_ocr.shards.manifest import load_manifest

FAST = RemoteSettings(connect_timeout=2.0, stall_timeout=0.5, request_deadline=2.0, batch_deadline=4.0, tries=3,
                      backoff=0.05)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, behaviour):
        super().__init__(("127.0.0.1", 0), Handler)
        self.root = root
        self.behaviour = behaviour
        self.requests: list[tuple[str, str | None]] = []
        self.stop = threading.Event()
        self.sent = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def send(self, status: int, body: bytes, headers: dict[str, str] | None = None, length: bool = True) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)
        self.server.sent += len(body)

    def do_GET(self) -> None:
        server: Server = self.server
        header = self.headers.get("Range")
        server.requests.append((self.path, header))
        path = server.root / urllib.parse.unquote(self.path.lstrip("/"))
        if not path.is_file():
            self.send(404, b"not found")
            return
        data = path.read_bytes()
        wanted = None
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", header or "")
        if match:
            wanted = (int(match.group(1)), int(match.group(2)) + 1)
        if server.behaviour(self, path.name, wanted, data):
            return
        if wanted is None:
            self.send(200, data)
        else:
            start, stop = wanted
            self.send(206, data[start:stop], {"Content-Range": f"bytes {start}-{stop - 1}/{len(data)}"})


def normal(handler, name, wanted, data) -> bool:
    return False


@pytest.fixture
def serve():
    servers: list[Server] = []

    def start(root: Path, behaviour=normal) -> Server:
        server = Server(root, behaviour)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop.set()
        server.shutdown()
        server.server_close()


def keys_of(location, **kwargs) -> list[str]:
    stream = ShardStream(location, batch_size=4, remote=FAST, **kwargs)
    return [k for batch in make_loader(stream, 2, mode="threads") for k in batch.keys]


def bounded(action, seconds: float, megabytes: float):
    """Run ``action``; assert it took at most ``seconds`` and traced at most ``megabytes``."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        result = action()
    finally:
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert elapsed < seconds, f"took {elapsed:.1f} s"
        assert peak < megabytes * 1e6, f"traced {peak / 1e6:.1f} MB"
    return result


def raises(error_type, action, seconds: float = 10.0, megabytes: float = 64.0):
    with pytest.raises(error_type) as caught:
        bounded(action, seconds, megabytes)
    return caught.value


# --- manifests that try to send reads elsewhere ------------------------------------------------


@pytest.mark.parametrize("name", ["file:%2Fetc%2Fpasswd", "file:%2Fdev%2Fzero", "http:%2F%2Fevil.example%2Fx.tar",
                                  "%2E%2E%2Fshard-000000.tar", "shard-000000.tar?x=1", "shard-000000.tar#y",
                                  "shard-000000.tar\x00.png", "//evil.example/shard-000000.tar"])
def test_a_served_manifest_cannot_point_reads_outside_its_folder(uneven_shards, serve, tmp_path, name):
    folder = tmp_path / "served"
    folder.mkdir()
    body = json.loads((uneven_shards / "manifest.json").read_text())
    body["shards"][0]["name"] = name
    (folder / "manifest.json").write_text(json.dumps(body))
    server = serve(folder)
    error = raises(ManifestError, lambda: ShardStream(server.url, batch_size=2, remote=FAST), seconds=5)
    assert str(error) == (f"{server.url}/manifest.json shard {name!r}: shard names must be plain file names of the "
                          "form shard-NNNNNN.tar (or shard-pIIIofNNN-NNNNNN.tar); paths, URLs and other names are "
                          "refused").replace("//manifest", "/manifest")
    assert [path for path, _ in server.requests] == ["/manifest.json"]  # nothing but the manifest was asked for


@pytest.mark.parametrize("name", ["file:%2Fetc%2Fpasswd", "../manifest.json", "shard-000000.tar/../../x"])
def test_the_http_reader_refuses_names_that_leave_the_folder(name):
    reader = HttpReader("http://127.0.0.1:9/data/", FAST)
    with pytest.raises(RemoteError) as caught:
        reader.read(name, 0, 512)
    assert str(caught.value) == (f"shard {name!r}: not a shard name; a manifest can only name shard-NNNNNN.tar "
                                 "files in its own folder")


def test_redirects_to_another_host_or_scheme_are_refused(uneven_shards, serve):
    def elsewhere(handler, name, wanted, data) -> bool:
        if wanted is None:
            return False
        handler.send(302, b"", {"Location": "file:///etc/passwd" if wanted[0] == 0 else "http://10.0.0.1/x.tar"})
        return True

    server = serve(uneven_shards, elsewhere)
    error = raises(RemoteError, lambda: ShardStream(server.url, batch_size=2, remote=FAST), seconds=5)
    assert str(error) == (f"GET {server.url}shard-000000.tar: redirected to 'file:///etc/passwd', another scheme or "
                          "host; refused (shards are read only from the manifest's own server)")


def test_a_redirect_within_the_server_is_followed(uneven_shards, serve):
    def moved(handler, name, wanted, data) -> bool:
        if wanted is not None and not handler.path.startswith("/moved/"):
            handler.send(307, b"", {"Location": f"/moved/{name}"})
            return True
        return False

    folder = uneven_shards
    server = serve(folder, moved)
    (folder / "moved").mkdir(exist_ok=True)
    for entry in load_manifest(folder).shards:
        target = folder / "moved" / entry.name
        if not target.exists():
            target.symlink_to(folder / entry.name)
    assert keys_of(server.url) == [k for e in load_manifest(folder).shards for k in e.keys]


# --- misbehaving servers ------------------------------------------------------------------------


def test_a_connection_dropped_mid_body_is_retried(uneven_shards, serve):
    dropped: list[str] = []

    def drop_first(handler, name, wanted, data) -> bool:
        if wanted is None or wanted[0] == 0 and wanted[1] == 512 or name in dropped:
            return False
        dropped.append(name)  # the first read of each shard dies half way through its body
        start, stop = wanted
        handler.send_response(206)
        handler.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
        handler.send_header("Content-Length", str(stop - start))
        handler.end_headers()
        handler.wfile.write(data[start : (start + stop) // 2])
        handler.close_connection = True
        return True

    server = serve(uneven_shards, drop_first)
    expected = [k for e in load_manifest(uneven_shards).shards for k in e.keys]
    assert bounded(lambda: keys_of(server.url), seconds=10, megabytes=32) == expected
    assert sorted(dropped) == [e.name for e in load_manifest(uneven_shards).shards]


def test_a_server_that_always_drops_fails_after_its_tries(uneven_shards, serve):
    def always_drop(handler, name, wanted, data) -> bool:
        if wanted is None or wanted[1] == 512:
            return False
        handler.send_response(206)
        handler.send_header("Content-Range", f"bytes {wanted[0]}-{wanted[1] - 1}/{len(data)}")
        handler.send_header("Content-Length", str(wanted[1] - wanted[0]))
        handler.end_headers()
        handler.wfile.write(data[wanted[0] : wanted[0] + 100])
        handler.close_connection = True
        return True

    server = serve(uneven_shards, always_drop)
    entry = load_manifest(uneven_shards).shards[0]
    error = raises(RemoteError, lambda: keys_of(server.url, on_error="skip"), seconds=8)
    # the first batch's members follow each other in shard 0: they are read with one request
    start, stop = entry.span(0)[0], entry.span(3)[1]
    assert str(error) == (f"GET {server.url}{entry.name} bytes {start}-{stop - 1} failed: connection closed after 100 "
                          f"of {stop - start} bytes of the body (after 3 of 3 tries, deadline 2 s)")


def test_a_trickling_server_is_cut_off_at_the_deadline(uneven_shards, serve):
    def trickle(handler, name, wanted, data) -> bool:
        if wanted is None or wanted[1] == 512:
            return False
        handler.send_response(206)
        handler.send_header("Content-Range", f"bytes {wanted[0]}-{wanted[1] - 1}/{len(data)}")
        handler.send_header("Content-Length", str(wanted[1] - wanted[0]))
        handler.end_headers()
        for byte in data[wanted[0] : wanted[1]]:
            if handler.server.stop.wait(0.2):
                break
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
        return True

    server = serve(uneven_shards, trickle)
    started = time.perf_counter()
    error = raises(RemoteError, lambda: keys_of(server.url), seconds=FAST.request_deadline + 2)
    assert time.perf_counter() - started >= FAST.request_deadline - 0.1  # it did wait for the deadline, no longer
    assert re.fullmatch(rf"GET {re.escape(server.url)}shard-000000.tar bytes 0-\d+ failed: the body was not complete "
                        r"by the deadline \(\d+ of \d+ bytes\) \(after 1 of 3 tries, deadline 2 s\)", str(error))


def test_headers_trickled_a_byte_at_a_time_are_cut_off_too(uneven_shards, serve):
    def slow_headers(handler, name, wanted, data) -> bool:
        if wanted is None:
            return False
        for byte in b"HTTP/1.1 206 Partial Content\r\nX-Pad: " + b"x" * 1000:
            if handler.server.stop.wait(0.1):
                break
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
        return True

    server = serve(uneven_shards, slow_headers)
    error = raises(RemoteError, lambda: ShardStream(server.url, batch_size=2, remote=FAST),
                   seconds=FAST.request_deadline + 2)
    assert str(error).startswith(f"GET {server.url}shard-000000.tar bytes 0-511 failed: ")
    assert str(error).endswith("(after 1 of 3 tries, deadline 2 s)")


def test_a_server_without_range_support_is_refused_on_the_first_request(synth_root, tmp_path, serve, monkeypatch):
    folder = build_small_shards(synth_root, tmp_path / "big", size=384, max_samples=100)
    shard = load_manifest(folder).shards[0]
    assert shard.bytes > 2_000_000

    def ignore_range(handler, name, wanted, data) -> bool:  # what python -m http.server does
        handler.send(200, data)
        return True

    server = serve(folder, ignore_range)
    # Every way a response body can be read (the reader fills buffers with readinto; read(n) is
    # readinto underneath, so only the outermost call of a thread is counted).
    consumed = []
    inside = threading.local()

    def counted(original):
        def counting(self, *args):
            if getattr(inside, "depth", 0):
                return original(self, *args)
            inside.depth = 1
            try:
                result = original(self, *args)
            finally:
                inside.depth = 0
            consumed.append(result if isinstance(result, int) else len(result))
            return result
        return counting

    for method in ("read", "read1", "readinto", "readinto1", "readline"):
        monkeypatch.setattr(http.client.HTTPResponse, method, counted(getattr(http.client.HTTPResponse, method)))
    error = raises(RemoteError, lambda: ShardStream(server.url, batch_size=2, remote=FAST), seconds=5,
                   megabytes=3 * shard.bytes / 1e6)  # the server thread holds the file; the client reads none of it
    assert sum(consumed) == len((folder / "manifest.json").read_bytes())  # the manifest, and no shard byte
    assert str(error) == (f"GET {server.url}{shard.name} bytes 0-511: the server answered 200 (the whole file) to a "
                          "Range request, so it does not support Range; serve the shards from a server that does "
                          "(nginx, Apache, S3, ...; python -m http.server does not)")
    assert len(server.requests) == 2  # the manifest, then one range request


def test_an_endless_body_is_refused_once_it_passes_the_range(uneven_shards, serve):
    def endless(handler, name, wanted, data) -> bool:
        if wanted is None or wanted[1] == 512:
            return False
        handler.send_response(206)
        handler.send_header("Content-Range", f"bytes {wanted[0]}-{wanted[1] - 1}/{len(data)}")
        handler.send_header("Connection", "close")  # no Content-Length: the body ends when the connection does
        handler.end_headers()
        handler.close_connection = True
        chunk = b"\x00" * 65536
        while not handler.server.stop.is_set():
            try:
                handler.wfile.write(chunk)
            except OSError:
                break
        return True

    server = serve(uneven_shards, endless)
    entry = load_manifest(uneven_shards).shards[0]
    start, stop = entry.span(0)
    error = raises(RemoteError, lambda: keys_of(server.url), seconds=5, megabytes=16)
    stop = entry.span(3)[1]  # the first batch's four members follow each other: one request reads them
    assert str(error) == f"GET {server.url}{entry.name}: the server sent more than {stop - start} bytes asked for; refused"


def test_a_manifest_over_the_cap_is_refused_before_it_is_read(uneven_shards, serve):
    def huge_manifest(handler, name, wanted, data) -> bool:
        if name != "manifest.json":
            return False
        handler.send_response(200)
        handler.send_header("Content-Length", str(3 << 30))
        handler.end_headers()
        return True

    server = serve(uneven_shards, huge_manifest)
    settings = RemoteSettings(**{**FAST.__dict__, "max_manifest_bytes": 1 << 20})
    error = raises(ManifestError, lambda: ShardStream(server.url, batch_size=2, remote=settings), megabytes=4)
    assert str(error) == (f"cannot fetch {server.url}manifest.json: GET {server.url}manifest.json: {3 << 30} bytes, "
                          f"over the {1 << 20}-byte limit")


def test_a_manifest_without_length_is_capped_as_it_streams(uneven_shards, serve):
    def endless_manifest(handler, name, wanted, data) -> bool:
        if name != "manifest.json":
            return False
        handler.send_response(200)
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.close_connection = True
        while not handler.server.stop.is_set():
            try:
                handler.wfile.write(b" " * 65536)
            except OSError:
                break
        return True

    server = serve(uneven_shards, endless_manifest)
    settings = RemoteSettings(**{**FAST.__dict__, "max_manifest_bytes": 1 << 20})
    error = raises(ManifestError, lambda: ShardStream(server.url, batch_size=2, remote=settings), megabytes=8)
    assert str(error) == (f"cannot fetch {server.url}manifest.json: GET {server.url}manifest.json: the server sent more "
                          f"than the {1 << 20}-byte limit; refused")


def test_wrong_bytes_from_a_server_never_reach_a_batch(uneven_shards, serve):
    manifest = load_manifest(uneven_shards)
    spans = {entry.name: [entry.span(i) for i in range(entry.samples)] for entry in manifest.shards}

    def wrong(handler, name, wanted, data) -> bool:
        if wanted is None or wanted[1] == 512:
            return False
        start, stop = wanted
        body = bytearray(data[start:stop])
        for first, last in spans[name]:  # same length, one wrong byte in every member's record
            if start <= first and last <= stop:
                body[(first + last) // 2 - start] ^= 0x40
        handler.send(206, bytes(body), {"Content-Range": f"bytes {start}-{stop - 1}/{len(data)}"})
        return True

    server = serve(uneven_shards, wrong)
    first = manifest.shards[0]
    error = raises(IntegrityError, lambda: keys_of(server.url))
    assert str(error) == f"{first.name} [{first.keys[0]}]: bytes differ from the manifest's checksum (corrupt or replaced shard)"
    stream = ShardStream(server.url, batch_size=4, remote=FAST, on_error="skip")
    batches = list(make_loader(stream, 2, mode="threads"))
    assert sum(len(b) for b in batches) == 0 and stream.policy.count == manifest.total_samples == 9
    assert stream.policy.examples[0].line() == str(error)


def test_server_errors_are_retried_and_missing_shards_fail_at_once(uneven_shards, serve):
    failures = {"count": 0}

    def flaky(handler, name, wanted, data) -> bool:
        if wanted is not None and wanted[1] != 512 and failures["count"] < 2:
            failures["count"] += 1
            handler.send(503, b"busy")
            return True
        return False

    server = serve(uneven_shards, flaky)
    assert len(keys_of(server.url)) == 9 and failures["count"] == 2

    def gone(handler, name, wanted, data) -> bool:
        if wanted is not None and wanted[1] != 512:
            handler.send(404, b"gone")
            return True
        return False

    server = serve(uneven_shards, gone)
    error = raises(RemoteError, lambda: keys_of(server.url), seconds=3)
    assert re.fullmatch(rf"GET {re.escape(server.url)}shard-000000.tar bytes 0-\d+: HTTP 404 Not Found", str(error))


def test_a_worker_process_error_arrives_as_itself(uneven_shards, serve):
    def gone(handler, name, wanted, data) -> bool:
        if wanted is not None and wanted[1] != 512:
            handler.send(404, b"gone")
            return True
        return False

    server = serve(uneven_shards, gone)
    stream = ShardStream(server.url, batch_size=4, remote=FAST)
    error = raises(RemoteError, lambda: list(make_loader(stream, 2, mode="processes")), seconds=20, megabytes=256)
    assert re.fullmatch(rf"GET {re.escape(server.url)}shard-000000.tar bytes 0-\d+: HTTP 404 Not Found", str(error))


def test_a_failing_batch_does_not_wait_for_slow_reads_in_flight(uneven_shards, serve):
    manifest = load_manifest(uneven_shards)
    first = manifest.shards[0]

    def fail_first_stall_rest(handler, name, wanted, data) -> bool:
        if wanted is None or wanted[1] == 512:
            return False
        if name == first.name and wanted[0] == 0:
            handler.send(404, b"gone")  # batch 0's first sample fails at once
            return True
        handler.server.stop.wait(30)  # every other read hangs
        return True

    server = serve(uneven_shards, fail_first_stall_rest)
    slow = RemoteSettings(**{**FAST.__dict__, "stall_timeout": 30.0, "request_deadline": 30.0, "batch_deadline": 30.0})
    stream = ShardStream(server.url, batch_size=1, remote=slow)
    gc.collect()  # idle read threads of loaders other tests dropped go with their pools
    before = {t for t in threading.enumerate() if t.name.startswith("wds-ocr-read")}

    def ours() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("wds-ocr-read")} - before

    started = time.perf_counter()
    with pytest.raises(RemoteError, match="HTTP 404"):
        for _ in make_loader(stream, 3, mode="threads"):
            pass
    # The failure surfaces long before the 30 s the stalled reads would take (bounds loose enough
    # for a loaded machine; what is checked is that nothing waits for a stalled read).
    assert time.perf_counter() - started < 15.0
    deadline = time.monotonic() + 10.0  # the reads in flight are cancelled, not left to their 30 s deadline
    while ours() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not ours()
    assert time.perf_counter() - started < 25.0  # inside the 30 s the stalled reads would have taken


def test_a_shard_the_server_reports_with_another_size_is_named(uneven_shards, serve):
    def other_size(handler, name, wanted, data) -> bool:
        if wanted is None:
            return False
        start, stop = wanted
        handler.send(206, data[start:stop], {"Content-Range": f"bytes {start}-{stop - 1}/{len(data) + 512}"})
        return True

    server = serve(uneven_shards, other_size)
    entry = load_manifest(uneven_shards).shards[0]
    error = raises(Exception, lambda: ShardStream(server.url, batch_size=2, remote=FAST), seconds=5)
    assert str(error) == (f"{entry.name}: {server.url}{entry.name} is {entry.bytes + 512} bytes, the manifest says "
                          f"{entry.bytes} (rebuilt or replaced?)")


def test_open_shards_checks_range_support_with_one_small_request(uneven_shards, serve):
    server = serve(uneven_shards)
    opened = open_shards(server.url, FAST)
    assert server.requests == [("/manifest.json", None), (f"/{opened.manifest.shards[0].name}", "bytes=0-511")]


@pytest.mark.parametrize("declared", ["²", "¹²", "12abc", "-5", "9" * 30])
def test_a_content_length_that_is_not_an_ascii_byte_count_is_a_remote_error(uneven_shards, serve, declared):
    """'²'.isdigit() is True (and int() takes other scripts' digits): only ASCII digits, at most 19,
    are a byte count."""
    def odd_length(handler, name, wanted, data) -> bool:
        if name != "manifest.json":
            return False
        handler.send_response(200)
        handler.send_header("Content-Length", declared)
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.close_connection = True
        return True

    server = serve(uneven_shards, odd_length)
    error = raises(ManifestError, lambda: ShardStream(server.url, batch_size=2, remote=FAST), seconds=5)
    assert f"GET {server.url}manifest.json: the server sent Content-Length {declared[:40]!r}, not a byte count" \
        in str(error)



def test_endless_chunked_trailers_do_not_hold_a_read_to_its_deadline(uneven_shards, serve):
    """A chunked 206 whose body is the range asked for, then a last chunk followed by trailer lines
    without end: http.client would read them until the deadline; the reader stops after the body."""
    def trailers(handler, name, wanted, data) -> bool:
        if wanted is None:
            return False
        start, stop = wanted
        handler.send_response(206)
        handler.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        handler.close_connection = True
        body = data[start:stop]
        try:
            handler.wfile.write(b"%x\r\n" % len(body) + body + b"\r\n0\r\n")
            while not handler.server.stop.is_set():
                handler.wfile.write(b"X-Trailer: more\r\n" * 64)
                handler.wfile.flush()
                time.sleep(0.01)
        except OSError:
            pass
        return True

    server = serve(uneven_shards, trailers)
    slow = RemoteSettings(connect_timeout=2.0, stall_timeout=2.0, request_deadline=20.0, batch_deadline=40.0, tries=1,
                          backoff=0.1)
    stream = ShardStream(server.url, batch_size=4, remote=slow)
    keys = bounded(lambda: [k for b in make_loader(stream, 1, mode="threads") for k in b.keys], seconds=8,
                   megabytes=32)
    assert sorted(keys) == sorted(k for e in load_manifest(uneven_shards).shards for k in e.keys)


def test_the_manifest_cap_is_one_setting_for_folders_and_fsspec_urls(uneven_shards):
    """``RemoteSettings.max_manifest_bytes`` caps a local manifest and an fsspec one as it caps
    an HTTP one; the check runs on the size before anything is read."""
    fsspec = pytest.importorskip("fsspec")
    size = (uneven_shards / "manifest.json").stat().st_size
    small = RemoteSettings(**{**FAST.__dict__, "max_manifest_bytes": size - 1})
    path = uneven_shards / "manifest.json"
    error = raises(ManifestError, lambda: ShardStream(uneven_shards, batch_size=2, remote=small))
    assert str(error) == f"{path} is {size} bytes, over the {size - 1}-byte limit; a manifest is a regular JSON file"
    assert ShardStream(uneven_shards, batch_size=2, remote=RemoteSettings(max_manifest_bytes=size)).manifest.total_samples
    memory = fsspec.filesystem("memory")
    for item in uneven_shards.iterdir():
        if item.is_file():  # the session's fixture folder may hold other tests' subfolders
            memory.pipe(f"/cap/{item.name}", item.read_bytes())
    try:
        error = raises(ManifestError, lambda: open_shards("memory://cap", small))
        assert str(error) == (f"memory://cap/manifest.json is {size} bytes, over the {size - 1}-byte limit "
                              "(RemoteSettings.max_manifest_bytes)")
        opened = open_shards("memory://cap", RemoteSettings(max_manifest_bytes=size))
        assert opened.manifest.total_samples == load_manifest(uneven_shards).total_samples
    finally:
        memory.rm("/cap", recursive=True)
