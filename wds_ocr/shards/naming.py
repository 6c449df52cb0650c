"""Every name the shard format uses, in one place: record keys, shard and part file names, the
manifest, rejects, journal and lock files, the member extension and the record's map names.

Nothing here imports numpy, msgpack or OpenCV, so the model, loss and loader can share these
names without pulling in the data pipeline. Readers validate names from manifests against the
patterns below: a shard name from a manifest is a plain ``<prefix>-NNNNNN.tar`` file name, never a
path, a URL or anything with a scheme, so a manifest cannot point a reader anywhere but its own
folder.
"""

from __future__ import annotations

import re

MEMBER_EXTENSION = "msgpack"
MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.jsonl"
SHARD_PREFIX = "shard"

# The four target maps every record holds, in the order the codec, the loader's batches, the
# device code, the loss and verify use them.
MAP_NAMES = ("gt", "mask", "thresh_map", "thresh_mask")

_KEY_STEM_LENGTH = 64
KEY_PATTERN = re.compile(r"[0-9]{7,}_[A-Za-z0-9_-]{0,64}")
SHARD_PATTERN = re.compile(r"(shard(?:-p[0-9]{3}of[0-9]{3})?)-([0-9]{6})\.tar")
PART_MANIFEST_PATTERN = re.compile(r"manifest\.part-p([0-9]{3})of([0-9]{3})\.json")
# The largest listing index a key can carry (keys are sorted by it; a build lists at most this many).
MAX_INDEX = 10**12


def record_key(index: int, name: str) -> str:
    """A WebDataset-safe key: zero-padded listing index + the file stem with no dots."""
    stem = name.rsplit(".", 1)[0] if "." in name else name
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", stem)[:_KEY_STEM_LENGTH]
    return f"{index:07d}_{safe}"


def key_index(key: str) -> int | None:
    """The listing index a key starts with; None for a string that is not a record key."""
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        return None
    return int(key.split("_", 1)[0])


def part_tag(index: int, count: int) -> str:
    return f"p{index:03d}of{count:03d}"


def shard_prefix(part: tuple[int, int] | None) -> str:
    """``shard`` for a whole build, ``shard-pIIIofNNN`` for part (index, count) of a partitioned one."""
    if part is None or part[1] == 1:
        return SHARD_PREFIX
    return f"{SHARD_PREFIX}-{part_tag(*part)}"


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def manifest_name(part: tuple[int, int] | None) -> str:
    return MANIFEST_NAME if part is None or part[1] == 1 else f"manifest.part-{part_tag(*part)}.json"


def rejects_name(part: tuple[int, int] | None) -> str:
    return REJECTS_NAME if part is None or part[1] == 1 else f"rejects.part-{part_tag(*part)}.jsonl"


def member_name(key: str) -> str:
    return f"{key}.{MEMBER_EXTENSION}"


def journal_folder_name(prefix: str) -> str:
    return f".journal.{prefix}"


# The folder's lock: whole builds and merges hold it exclusively, the parts of a partitioned build shared.
FOLDER_LOCK_NAME = ".lock"


def lock_name(prefix: str) -> str:
    return f".lock.{prefix}"


def temporary_name(name: str) -> str:
    """Where a file is written before it is renamed to ``name``."""
    return f".{name}.tmp"


def stray_pattern(prefix: str) -> re.Pattern[str]:
    """Shard files of ``prefix`` and their temporary names."""
    return re.compile(rf"^\.?{re.escape(prefix)}-[0-9]{{6}}\.tar(\.tmp)?$")


def is_shard_name(name: object) -> bool:
    return isinstance(name, str) and SHARD_PATTERN.fullmatch(name) is not None
