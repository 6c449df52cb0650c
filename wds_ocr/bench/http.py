"""A real HTTP server on 127.0.0.1 serving a shard folder with Range support, for the benchmark's
HTTP row (and the tests): nginx when it is installed (``sendfile on``, one worker process, keep-alive),
otherwise a threaded Python server that answers single ``Range: bytes=a-b`` requests with
``os.sendfile`` (the body never passes through Python objects). For the benchmark the Python
server runs in a process of its own (``python -m wds_ocr.bench.http ROOT PORT``), as any real
server would: in the benchmark's process its request handling would take the GIL from the
loader's threads. The tests use it in-process (``python_server``).
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """GET of a file in ``server.root``: the whole file (200) or one byte range (206)."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the loader's readers expect

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        name = self.path.split("?", 1)[0].lstrip("/")
        path = Path(self.server.root) / name
        if "/" in name or name in ("", ".", "..") or not path.is_file():
            self._answer(404, b"not found")
            return
        size = path.stat().st_size
        start, stop = 0, size
        match = _RANGE.fullmatch(self.headers.get("Range", ""))
        if match:
            start = int(match.group(1))
            stop = min(size, int(match.group(2)) + 1) if match.group(2) else size
            if start >= size or stop <= start:
                self._answer(416, b"range not satisfiable")
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(stop - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        with open(path, "rb") as handle:
            sent = start
            while sent < stop:
                count = os.sendfile(self.connection.fileno(), handle.fileno(), sent, stop - sent)
                if count == 0:
                    break
                sent += count

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class RangeServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, port: int = 0):
        super().__init__(("127.0.0.1", port), RangeHandler)
        self.root = Path(root)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


@contextlib.contextmanager
def python_server(root: Path) -> Iterator[str]:
    server = RangeServer(root)
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="wds-ocr-range-server")
    thread.start()
    try:
        yield server.url
    finally:
        server.shutdown()
        server.server_close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(port: int, process: subprocess.Popen, seconds: float = 10.0, what: str = "nginx") -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start listening within {seconds:g} s")


@contextlib.contextmanager
def _stopping(process: subprocess.Popen) -> Iterator[subprocess.Popen]:
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def python_process_server(root: Path) -> Iterator[str]:
    """The Python Range server in a process of its own, on a free port of 127.0.0.1."""
    port = _free_port()
    package_root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    process = subprocess.Popen([sys.executable, "-m", "wds_ocr.bench.http", str(Path(root).resolve()), str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    with _stopping(process):
        _wait_for(port, process, 30.0, "the Python HTTP server")
        yield f"http://127.0.0.1:{port}/"


@contextlib.contextmanager
def nginx_server(root: Path, nginx: str) -> Iterator[str]:
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="wds-ocr-nginx-") as prefix:
        config = Path(prefix) / "nginx.conf"
        config.write_text(f"""
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    types {{ application/x-tar tar; application/json json; }}
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {Path(root).resolve()};
        location / {{ }}
    }}
}}
""")
        process = subprocess.Popen([nginx, "-c", str(config), "-p", prefix], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
        with _stopping(process):
            _wait_for(port, process)
            yield f"http://127.0.0.1:{port}/"


def find_nginx() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                          if os.access(p, os.X_OK)), None)


@contextlib.contextmanager
def local_server(root: Path, kind: str = "auto") -> Iterator[tuple[str, str]]:
    """(URL, what serves it) of a Range-capable HTTP server on 127.0.0.1 for ``root``.

    ``kind``: ``auto`` (nginx if installed, else Python), ``nginx`` or ``python``."""
    nginx = find_nginx() if kind in ("auto", "nginx") else None
    if kind == "nginx" and nginx is None:
        raise RuntimeError("nginx is not installed (apt-get install nginx-light), or use --http python")
    if nginx is not None:
        version = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip()
        with nginx_server(root, nginx) as url:
            yield url, f"{version.replace('nginx version: ', '')} (sendfile, 1 worker)"
        return
    with python_process_server(root) as url:
        yield url, "Python ThreadingHTTPServer with os.sendfile, in its own process"


def main(argv: list[str] | None = None) -> None:
    """``python -m wds_ocr.bench.http ROOT PORT``: serve ROOT on 127.0.0.1:PORT until terminated."""
    root, port = (argv if argv is not None else sys.argv[1:])
    server = RangeServer(Path(root), int(port))
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
