"""A real HTTP server on 127.0.0.1 serving a shard folder with Range support, for the benchmark's
HTTP row (and the tests): nginx when it is installed (``sendfile on``, one worker process, keep-alive),
otherwise a threaded Python server that answers single ``Range: bytes=a-b`` requests with
``os.sendfile`` (the body never passes through Python objects).
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import shutil
import socket
import subprocess
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

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), RangeHandler)
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


def _wait_for(port: int, process: subprocess.Popen, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited with status {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("nginx did not start listening within 10 s")


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
        try:
            _wait_for(port, process)
            yield f"http://127.0.0.1:{port}/"
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


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
    with python_server(root) as url:
        yield url, "Python ThreadingHTTPServer with os.sendfile"
