"""Shared fixtures: the real receipts in ../shared/data/sroie-dev (skipped where absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SROIE_ROOT = REPO_ROOT.parent / "shared" / "data" / "sroie-dev"


@pytest.fixture(scope="session")
def sroie_root() -> Path:
    """Root of the real SROIE receipts; tests using it skip cleanly where ../shared is absent."""
    if not (SROIE_ROOT / "jsons" / "val.json").is_file():
        pytest.skip(f"real receipts not found at {SROIE_ROOT}")
    return SROIE_ROOT


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """12 synthetic receipts (train 9, val 3), a few stored with EXIF orientation tags."""
    from wds_ocr.data.synth import synthesize

    root = tmp_path_factory.mktemp("synth") / "data"
    synthesize(root, 12, seed=0)
    return root


def build_small_shards(source: Path, out: Path, split: str = "train", size: int = 64, max_samples: int = 4,
                       extra: tuple[str, ...] = ()) -> Path:
    """Shards at a small transform size (fast tests); ``max_samples`` sets how uneven they are."""
    from wds_ocr.config import load_config
    from wds_ocr.shards.build import build_shards

    config = load_config(None, [f"transform.size={size}", f"shards.max_samples={max_samples}", *extra])
    build_shards(source, split, out, config)
    return out


@pytest.fixture(scope="session")
def uneven_shards(synth_root, tmp_path_factory) -> Path:
    """9 train samples in shards of 4, 4 and 1 at 64x64."""
    return build_small_shards(synth_root, tmp_path_factory.mktemp("uneven") / "shards")


@pytest.fixture(scope="session")
def single_shard(synth_root, tmp_path_factory) -> Path:
    """The same 9 samples in one shard."""
    return build_small_shards(synth_root, tmp_path_factory.mktemp("single") / "shards", max_samples=100)


class _RangeHandler:
    """Built lazily: an http.server handler that honours single 'Range: bytes=a-b' requests."""

    @staticmethod
    def make(directory: Path):
        import http.server
        import re

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(directory), **kwargs)

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                path = Path(self.translate_path(self.path))
                if not path.is_file():
                    self.send_error(404, "not found")
                    return
                size = path.stat().st_size
                match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                start, stop = 0, size
                if match:
                    start = int(match.group(1))
                    stop = min(size, int(match.group(2)) + 1) if match.group(2) else size
                    if start >= size:
                        self.send_error(416, "range not satisfiable")
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(stop - start))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                with open(path, "rb") as handle:
                    handle.seek(start)
                    self.wfile.write(handle.read(stop - start))

        return Handler


@pytest.fixture
def serve_folder():
    """Start a real HTTP server (with Range support) on 127.0.0.1 for a folder; returns its URL."""
    import http.server
    import threading

    servers = []

    def start(directory: Path) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler.make(directory))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
