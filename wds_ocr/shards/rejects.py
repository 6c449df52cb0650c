"""Rejected samples and skipped words: one ``Reject`` inside the package, one JSON line in
``rejects.jsonl`` (and in journal entries) at the file edge.

A line is ``{"index", "kind", "name", "word_id", "reason"}``: ``kind`` is ``"sample"`` (the whole
sample is out; ``word_id`` null) or ``"word"`` (one word of a written sample); ``index`` is the
sample's listing position, null for a sample rejected while the source was listed (an image
without annotations, say). Reading validates every field, so a hand-edited file is refused with
its line number rather than half-used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

from wds_ocr import jsonio
from wds_ocr.data.sources import Skip, read_regular_file
from wds_ocr.errors import ManifestError
from wds_ocr.data.paths import write_atomic
from wds_ocr.shards.manifest import MAX_MANIFEST_BYTES
from wds_ocr.shards.naming import MAX_INDEX

_KINDS = ("sample", "word")
_MAX_TEXT = 1 << 16


@dataclass(frozen=True)
class Reject:
    index: int | None  # listing position; None: rejected while listing
    kind: Literal["sample", "word"]
    name: str
    word_id: str | None  # None for a whole sample
    reason: str

    @classmethod
    def sample(cls, index: int | None, name: str, reason: str) -> "Reject":
        return cls(index, "sample", name, None, reason)

    @classmethod
    def from_skip(cls, skip: Skip, index: int | None) -> "Reject":
        """A sources.Skip: a word skip when it names a word, else a whole sample."""
        return cls(index, "word" if skip.word_id is not None else "sample", skip.name, skip.word_id, skip.reason)

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "kind": self.kind, "name": self.name, "word_id": self.word_id,
                "reason": self.reason}

    @classmethod
    def from_dict(cls, body: Any, where: str) -> "Reject":
        """From one JSON object; ValueError names what is wrong."""
        if not isinstance(body, dict) or set(body) != {"index", "kind", "name", "word_id", "reason"}:
            raise ValueError(f"{where}: expected an object with index, kind, name, word_id and reason")
        index, kind, name, word_id, reason = (body[f] for f in ("index", "kind", "name", "word_id", "reason"))
        if index is not None and (type(index) is not int or not 0 <= index < MAX_INDEX):
            raise ValueError(f"{where}: index must be null or a listing position, got {index!r}")
        if kind not in _KINDS:
            raise ValueError(f"{where}: kind must be 'sample' or 'word', got {kind!r}")
        # A name may be empty: an annotation entry named "" is rejected under that name.
        if not isinstance(name, str) or len(name) > _MAX_TEXT:
            raise ValueError(f"{where}: name must be a string of at most {_MAX_TEXT} characters")
        if not isinstance(reason, str) or not reason or len(reason) > _MAX_TEXT:
            raise ValueError(f"{where}: reason must be a non-empty string of at most {_MAX_TEXT} characters")
        if kind == "word" and (not isinstance(word_id, str) or index is None):
            raise ValueError(f"{where}: a word skip needs a word_id and the sample's index")
        if kind == "sample" and word_id is not None:
            raise ValueError(f"{where}: a sample reject has no word_id")
        return cls(index, kind, name, word_id, reason)

    def sort_key(self) -> tuple:
        return (-1 if self.index is None else self.index, self.name, self.kind != "sample", self.word_id or "",
                self.reason)


def write_rejects(path: Path, rejects: Iterable[Reject]) -> None:
    """rejects.jsonl: one JSON object per rejected sample or skipped word, in listing order."""
    ordered = sorted(rejects, key=Reject.sort_key)
    lines = [json.dumps(r.as_dict(), sort_keys=True, ensure_ascii=False) for r in ordered]
    write_atomic(path, ("\n".join(lines) + "\n" if lines else "").encode("utf-8"))


def read_rejects(path: Path) -> list[Reject]:
    """Every line of a rejects file; ManifestError naming the file (and line) when it is unusable."""
    try:
        raw = read_regular_file(path, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise ManifestError(f"{path} is missing: rebuild the shards (it is written with the manifest)") from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ManifestError(f"{path} is not UTF-8 text") from None
    rejects = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            rejects.append(Reject.from_dict(jsonio.loads(line), where))
        except (json.JSONDecodeError, RecursionError):
            raise ManifestError(f"{where} is not valid JSON") from None
        except jsonio.JsonNumberError as exc:
            raise ManifestError(f"{where} {exc}") from None
        except ValueError as exc:
            raise ManifestError(str(exc)) from None
    return rejects
