"""Shards over HTTP(S): Range requests with caps, deadlines and bounded retries (``storage.s3``
signs the same requests).

A location is a folder (or its manifest.json) holding the shards. Readers fetch exact byte
ranges taken from the manifest's per-sample offsets, straight into the caller's buffer
(``read_into``, what the loader uses: its batch buffer): local files with ``os.preadv`` (one
system call, no seek state shared between threads), HTTP with ``Range`` requests on kept-alive
connections (one per thread) whose body is read into the buffer as it arrives, other schemes
through fsspec when it is installed (one extra copy there). Readers open lazily, so they can be
created before DataLoader workers start and used inside each worker.

Hostile manifests and servers (see docs/SECURITY.md):

- A shard location is the manifest's own folder plus a name the manifest parser accepted (a
  plain ``shard-NNNNNN.tar``); the URL built from it is checked to keep the manifest's scheme, host
  and folder, so a manifest served over HTTP can never make the loader open a local file or
  another host. Redirects are followed only within the same scheme and host.
- Local shards must be regular files of the size the manifest gives (no FIFO, device or folder).
- Every HTTP body is read into a buffer of exactly the size asked for: a longer body, a body
  without a length that does not end, a 200 answer to a Range request (a server without Range
  support: refused on the first request, after reading only the status line and headers), a wrong
  Content-Range or a compressed body are errors, never a larger allocation. A manifest is capped at
  ``RemoteSettings.max_manifest_bytes``.
- Each attempt fails after ``stall_timeout`` seconds without a byte; a request (all its attempts and
  their backoff) ends at its deadline, which also bounds a server trickling one byte at a time:
  a watchdog thread shuts the socket down when the deadline passes or the read is cancelled, so
  no blocking call outlives it. Transient failures (connection dropped mid-body, timeouts, 5xx,
  429) are retried ``tries`` times with exponential backoff; others fail at once.
- Failures are ``RemoteError`` (never skipped by ``on_error="skip"``: the transport failed, the
  records are not known to be bad); a body that arrives but differs from the manifest is caught
  by the stream's per-member checksum.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import threading
import time
import urllib.parse

from wds_ocr.errors import ManifestError, RemoteError, ShardFormatError
from wds_ocr.shards.naming import is_shard_name
from wds_ocr.shards.tario import BLOCK
from wds_ocr.storage.reader import Deadline, RangeReader, ReadCancelled, RemoteSettings

_CHUNK = 1 << 20
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_MAX_REDIRECTS = 3
# Byte counts in headers: ASCII digits only (str.isdigit and int() also take '²' or Arabic-Indic
# digits), at most 19 of them (int64).
_DECIMAL = re.compile(r"[0-9]{1,19}")
_CONTENT_RANGE = re.compile(r"bytes\s+([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19})")


class _Watchdog:
    """One daemon thread per process that shuts down the sockets of reads past their deadline."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # the thread does not follow a fork

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[int, tuple[socket.socket, Deadline]] = {}
        self._started = False
        self._tokens = 0

    def watch(self, sock: socket.socket, deadline: Deadline) -> int:
        with self._lock:
            if not self._started:
                threading.Thread(target=self._run, name="wds-ocr-watchdog", daemon=True).start()
                self._started = True
            self._tokens += 1
            self._entries[self._tokens] = (sock, deadline)
            return self._tokens

    def release(self, token: int) -> None:
        with self._lock:
            self._entries.pop(token, None)

    def _run(self) -> None:
        while True:
            time.sleep(0.02)
            with self._lock:
                expired = [(t, s) for t, (s, d) in self._entries.items() if d.over]
                for token, _ in expired:
                    del self._entries[token]
            for _, sock in expired:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


_WATCHDOG = _Watchdog()


class _Attempt(Exception):
    """A failed attempt that may be retried (its message says why)."""


class HttpReader(RangeReader):
    """Range reads over HTTP(S) with caps, deadlines and bounded retries (see the module docstring)."""

    def __init__(self, base_url: str, settings: RemoteSettings | None = None, sizes: dict[str, int] | None = None):
        self.settings = settings or RemoteSettings()
        self.base = base_url if base_url.endswith("/") else base_url + "/"
        parts = urllib.parse.urlsplit(self.base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ManifestError(f"{base_url} is not an http(s) URL")
        self._scheme, self._netloc, self._folder = parts.scheme, parts.netloc, parts.path
        self.sizes = sizes or {}
        self._local = threading.local()
        self._range_checked = False

    # -- URLs ---------------------------------------------------------------------------------

    def describe(self, shard: str) -> str:
        return self.base + urllib.parse.quote(shard)

    def _path_for(self, name: str, what: str) -> str:
        """The request path of ``name``: refused unless it stays in the manifest's own folder.

        A shard must have a shard name; the manifest itself (``what`` == "file") is the last part
        of the URL the user gave."""
        if not is_shard_name(name) if what == "shard" else ("/" in name or name in ("", ".", "..")):
            raise RemoteError(f"{what} {name!r}: not a shard name; a manifest can only name shard-NNNNNN.tar "
                              "files in its own folder")
        quoted = urllib.parse.quote(name)
        target = urllib.parse.urlsplit(urllib.parse.urljoin(self.base, quoted))
        if (target.scheme, target.netloc, target.path) != (self._scheme, self._netloc, self._folder + quoted) or \
                target.query or target.fragment:
            raise RemoteError(f"{what} {name!r} would resolve to {urllib.parse.urlunsplit(target)!r}, outside "
                              f"{self.base}; refused")
        return self._folder + quoted

    # -- connections --------------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.pid, local.conn = os.getpid(), None
        if local.conn is None:
            kind = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            local.conn = kind(self._netloc, timeout=self.settings.connect_timeout)
        return local.conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        self._local.conn = None

    def close(self) -> None:
        self._drop_connection()

    # -- one request --------------------------------------------------------------------------

    def _signed(self, url: str, headers: dict[str, str]) -> dict[str, str]:
        """The headers of one attempt at ``url`` (``storage.s3.S3Reader`` signs them)."""
        return headers

    def _attempt(self, path: str, headers: dict[str, str], wanted: tuple[int, int] | None, cap: int,
                 deadline: Deadline, url: str, shard: str | None, into: memoryview | None) -> bytes:
        """One GET. ``wanted`` = (start, stop) for a range (body exactly that long), else a whole
        file of at most ``cap`` bytes. Raises _Attempt (retry), RemoteError or IntegrityError."""
        conn = self._connection()
        token = None
        try:
            if conn.sock is None:
                conn.timeout = max(0.001, min(self.settings.connect_timeout, deadline.remaining()))
                conn.connect()
            conn.timeout = max(0.001, min(self.settings.stall_timeout, deadline.remaining()))
            conn.sock.settimeout(conn.timeout)
            token = _WATCHDOG.watch(conn.sock, deadline)
            conn.request("GET", path, headers=self._signed(url, headers))
            response = conn.getresponse()
            if deadline.over:  # the watchdog cut the headers short: what arrived is not an answer
                raise OSError("no complete answer by the deadline" if not deadline.cancelled else "cancelled")
            body = self._body(response, wanted, cap, deadline, url, shard, into)
            if response.will_close:
                self._drop_connection()
            return body
        except (RemoteError, ShardFormatError):
            self._drop_connection()
            raise
        except (OSError, http.client.HTTPException) as exc:
            self._drop_connection()
            if deadline.cancelled:
                raise ReadCancelled(f"GET {url}: cancelled (the loader is shutting down)") from None
            raise _Attempt(_describe(exc)) from None
        finally:
            if token is not None:
                _WATCHDOG.release(token)

    def _body(self, response: http.client.HTTPResponse, wanted: tuple[int, int] | None, cap: int,
              deadline: Deadline, url: str, shard: str | None, into: memoryview | None) -> bytes:
        status = response.status
        if status in _RETRY_STATUS:
            raise _Attempt(f"HTTP {status} {response.reason}")
        if 300 <= status < 400:
            raise _Redirect(response.getheader("Location") or "")
        if wanted is not None and status == 200:
            raise RemoteError(f"GET {url} bytes {wanted[0]}-{wanted[1] - 1}: the server answered 200 (the whole "
                              "file) to a Range request, so it does not support Range; serve the shards from a "
                              "server that does (nginx, Apache, S3, ...; python -m http.server does not)")
        expected_status = 206 if wanted is not None else 200
        if status != expected_status:
            raise RemoteError(f"GET {url}{_range_text(wanted)}: HTTP {status} {response.reason}")
        encoding = (response.getheader("Content-Encoding") or "identity").strip().lower()
        if encoding != "identity":
            raise RemoteError(f"GET {url}: the server sent a {encoding}-encoded body; serve the files as they are")
        declared = response.getheader("Content-Length")
        if declared is not None and not _DECIMAL.fullmatch(declared.strip()):
            raise RemoteError(f"GET {url}{_range_text(wanted)}: the server sent Content-Length {declared[:40]!r}, "
                              "not a byte count")
        length = int(declared) if declared is not None else None
        if wanted is not None:
            expected = wanted[1] - wanted[0]
            self._check_content_range(response.getheader("Content-Range"), wanted, url, shard)
            if length is not None and length != expected:
                raise RemoteError(f"GET {url}{_range_text(wanted)}: the server declares {length} bytes for a "
                                  f"{expected}-byte range")
        else:
            if length is not None and length > cap:
                raise RemoteError(f"GET {url}: {length} bytes, over the {cap}-byte limit")
            expected = length
        return _read_body(response, expected, cap, deadline, url, length is not None, into)

    def _check_content_range(self, header: str | None, wanted: tuple[int, int], url: str, shard: str | None) -> None:
        start, stop = wanted
        match = _CONTENT_RANGE.fullmatch((header or "").strip())
        if match is None:
            raise RemoteError(f"GET {url}{_range_text(wanted)}: answered 206 with Content-Range {header!r}; "
                              "expected 'bytes first-last/total'")
        first, last, total = (int(group) for group in match.groups())
        if (first, last) != (start, stop - 1):
            raise RemoteError(f"GET {url}{_range_text(wanted)}: the server sent bytes {first}-{last} instead")
        expected_total = self.sizes.get(shard) if shard is not None else None
        if expected_total is not None and total != expected_total:
            raise ShardFormatError(shard, None, f"{url} is {total} bytes, the manifest says {expected_total} "
                                                "(rebuilt or replaced?)")
        self._range_checked = True

    def _get(self, name: str, wanted: tuple[int, int] | None, cap: int, deadline: Deadline,
             shard: str | None, into: memoryview | None = None) -> bytes:
        """A GET with retries and same-origin redirects within ``deadline``; a range body goes into
        ``into`` when given (each attempt rewrites it from its start)."""
        path = self._path_for(name, "shard" if shard is not None else "file")
        headers = {"Accept-Encoding": "identity"}
        if wanted is not None:
            headers["Range"] = f"bytes={wanted[0]}-{wanted[1] - 1}"
        url = f"{self._scheme}://{self._netloc}{path}"
        settings = self.settings
        last = "no attempt finished"
        redirects = 0
        attempt = 0
        while attempt < settings.tries:
            if deadline.cancelled:
                raise ReadCancelled(f"GET {url}: cancelled (the loader is shutting down)")
            if deadline.remaining() <= 0:
                break
            try:
                return self._attempt(path, headers, wanted, cap, deadline, url, shard, into)
            except _Redirect as redirect:
                redirects += 1
                path, url = self._follow(redirect.location, url, redirects)
                continue
            except _Attempt as exc:
                last = str(exc)
            attempt += 1
            if attempt < settings.tries:
                pause = min(settings.backoff * 2 ** (attempt - 1), max(0.0, deadline.remaining()))
                if deadline.cancel is not None:
                    deadline.cancel.wait(pause)
                else:
                    time.sleep(pause)
        raise RemoteError(f"GET {url}{_range_text(wanted)} failed: {last} (after {attempt} of {settings.tries} "
                          f"tries, deadline {settings.request_deadline:g} s)")

    def _follow(self, location: str, url: str, count: int) -> tuple[str, str]:
        if count > _MAX_REDIRECTS:
            raise RemoteError(f"GET {url}: more than {_MAX_REDIRECTS} redirects")
        target = urllib.parse.urlsplit(urllib.parse.urljoin(url, location))
        if (target.scheme, target.netloc) != (self._scheme, self._netloc):
            raise RemoteError(f"GET {url}: redirected to {urllib.parse.urlunsplit(target)!r}, another scheme or "
                              "host; refused (shards are read only from the manifest's own server)")
        path = target.path + (f"?{target.query}" if target.query else "")
        return path, urllib.parse.urlunsplit(target)

    # -- the RangeReader interface --------------------------------------------------------------

    def read(self, shard: str, start: int, stop: int, deadline: Deadline | None = None) -> bytes:
        request = Deadline(self.settings.request_deadline, parent=deadline)
        return self._get(shard, (start, stop), stop - start, request, shard)

    def read_into(self, shard: str, start: int, stop: int, out: memoryview, deadline: Deadline | None = None) -> None:
        if len(out) != stop - start:
            raise ValueError(f"read_into needs a buffer of {stop - start} bytes, got {len(out)}")
        request = Deadline(self.settings.request_deadline, parent=deadline)
        self._get(shard, (start, stop), stop - start, request, shard, out)

    def fetch(self, name: str) -> bytes:
        """A whole (small) file of the folder, e.g. the manifest, capped at ``max_manifest_bytes``."""
        try:
            return self._get(name, None, self.settings.max_manifest_bytes, Deadline(self.settings.request_deadline),
                             None)
        except RemoteError as exc:
            raise ManifestError(f"cannot fetch {self.describe(name)}: {exc}") from None

    def check_range_support(self, shard: str) -> None:
        """The first request of a stream: one header block of a shard (refuses a server without Range)."""
        self.read(shard, 0, BLOCK)


class _Redirect(Exception):
    def __init__(self, location: str):
        super().__init__(location)
        self.location = location


def _range_text(wanted: tuple[int, int] | None) -> str:
    return "" if wanted is None else f" bytes {wanted[0]}-{wanted[1] - 1}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, http.client.IncompleteRead):
        return f"connection closed after {len(exc.partial)} bytes of the body"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "no data within the stall timeout"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the server closed the connection without an answer"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _read_body(response: http.client.HTTPResponse, expected: int | None, cap: int, deadline: Deadline, url: str,
               has_length: bool, into: memoryview | None = None) -> bytes:
    """Exactly ``expected`` bytes (or, when None, everything up to ``cap``), checking the deadline
    after every chunk. A body longer than asked for is refused without reading it all. With
    ``into`` (``expected`` bytes long) the body is read straight into it and b"" is returned."""
    if expected is None:
        return _read_unsized(response, cap, deadline, url)
    view = into if into is not None else memoryview(bytearray(expected))
    got = 0
    while got < expected:
        if deadline.over:
            if deadline.cancelled:
                raise ReadCancelled(f"GET {url}: cancelled (the loader is shutting down)")
            raise _Attempt(f"the body was not complete by the deadline ({got} of {expected} bytes)")
        count = response.readinto(view[got : min(expected, got + _CHUNK)])
        if not count:
            break
        got += count
    if got < expected:
        if deadline.cancelled:
            raise ReadCancelled(f"GET {url}: cancelled (the loader is shutting down)")
        if deadline.over:  # the watchdog shut the socket down
            raise _Attempt(f"the body was not complete by the deadline ({got} of {expected} bytes)")
        raise _Attempt(f"connection closed after {got} of {expected} bytes of the body")
    if response.chunked:
        # The range is here. What follows is the last chunk and its trailer lines, which http.client
        # reads without a bound on their number (a server sending them without end held every read
        # to its deadline): more bytes in the current chunk are refused; the rest is left unread and
        # the connection is dropped rather than kept.
        if response.chunk_left:
            raise RemoteError(f"GET {url}: the server sent more than {expected} bytes asked for; refused")
        response.will_close = True
    elif not has_length:
        if response.read1(1):  # the end of the stream must follow
            raise RemoteError(f"GET {url}: the server sent more than {expected} bytes asked for; refused")
    else:
        response.read()  # nothing is left: marks the response complete so the connection is kept
    return b"" if into is not None else bytes(view)


def _read_unsized(response: http.client.HTTPResponse, cap: int, deadline: Deadline, url: str) -> bytes:
    """A body of unknown length (a manifest without Content-Length), refused past ``cap`` bytes."""
    buffer = bytearray()
    while True:
        if deadline.over:
            if deadline.cancelled:
                raise ReadCancelled(f"GET {url}: cancelled (the loader is shutting down)")
            raise _Attempt(f"the body was not complete by the deadline ({len(buffer)} of its bytes)")
        chunk = response.read1(min(_CHUNK, cap - len(buffer) + 1))
        if not chunk:
            break
        if len(buffer) + len(chunk) > cap:
            raise RemoteError(f"GET {url}: the server sent more than the {cap}-byte limit; refused")
        buffer += chunk
    return bytes(buffer)


__all__ = ["HttpReader"]
