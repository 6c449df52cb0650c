"""The one rule for symbolic links among the files wds-ocr reads (source images, annotation files,
shard files): a link is followed only when what it leads to lies inside the folder that holds the
link. The folder itself may be a link (a dataset on another disk), and a link between two files of
one folder is fine; a link that leads out of its folder (to ``/etc/...``, another user's files, a
device) is refused before the file is opened, so nothing of what it points at is read or quoted.
"""

from __future__ import annotations

import os
from pathlib import Path


def link_escape(path: str | Path) -> str | None:
    """Why ``path`` must not be opened (a symbolic link whose target resolves outside the folder
    that holds it), or None. Not a link, or a missing file: None (the open reports those)."""
    path = Path(path)
    try:
        if not path.is_symlink():
            return None
        folder = os.path.realpath(path.parent)
        target = os.path.realpath(path)
    except (OSError, ValueError):
        return None
    if os.path.commonpath([folder, target]) == folder and target != folder:
        return None
    return (f"{path} is a symbolic link to {target}, outside its folder {folder}; links are followed only "
            "within their folder: copy the file in, or link the whole folder")


def write_atomic(path: Path, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``.<name>.tmp`` beside ``path`` and rename it over ``path``, so no reader
    ever sees half a file. ``durable``: fsync the file before the rename and the folder after it
    (manifests, rejects, journals: a crash leaves the old file or the new one, never an empty
    one); without it (synthetic images, prediction files) the rename alone."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(temporary, path)
    if durable:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_at_most(fd: int, max_bytes: int) -> bytes | None:
    """Everything up to EOF from ``fd``, read in 1 MiB pieces; None when the file holds more than
    ``max_bytes`` (it may grow while it is read, after any size check)."""
    parts, total = [], 0
    while True:
        chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            return None
