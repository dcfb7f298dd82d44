"""Byte-level text corpora: the Python standard library's source, split into train and held-out files.

Every machine with Python has this text, so the trained model and its evaluation need no download.
The split is by a hash of each file's path relative to the library root, so a file lands on the
same side on every machine and Python version that has it; the bytes themselves follow the
running Python's own library (the recorded results name the version they were made with).
"""

from __future__ import annotations

import hashlib
import pathlib
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from lynx_export.errors import DataError

__all__ = ["CorpusError", "Corpus", "stdlib_root", "stdlib_corpus", "text_corpus", "HELD_OUT_BUCKETS"]

# Test suites and tools are excluded: Lib/test alone is larger than the rest of the library and is
# mostly generated-looking test data; the model should learn ordinary library code.
_EXCLUDED_PARTS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__"})
# A file is held out when the first byte of sha1(relative path) falls in these buckets (of 256): ~10%.
HELD_OUT_BUCKETS = range(0, 26)
# Files are joined with a separator the model sees as a document boundary.
_SEPARATOR = b"\n\x00\n"


class CorpusError(DataError):
    """A corpus that cannot be read or has too little text (one-line message)."""


@dataclass(frozen=True, eq=False)
class Corpus:
    """Concatenated bytes of some files, and which files they came from."""

    data: np.ndarray  # uint8 [N]
    files: tuple[str, ...]

    def windows(self, count: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """`count` random windows of `length` bytes as int64 [count, length]."""
        if self.data.size < length + 1:
            raise CorpusError(f"corpus has {self.data.size} bytes, fewer than one window of {length}")
        starts = rng.integers(0, self.data.size - length, size=count)
        return np.stack([self.data[s : s + length] for s in starts]).astype(np.int64)

    def sequences(self, count: int, length: int) -> np.ndarray:
        """`count` evenly spaced, non-overlapping windows of `length` bytes (deterministic) [count, length]."""
        available = self.data.size // length
        if available < count:
            raise CorpusError(f"corpus has room for {available} sequences of {length} bytes, {count} requested")
        stride = available // count
        return np.stack([self.data[i * stride * length : (i * stride + 1) * length] for i in range(count)]).astype(np.int64)


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _is_held_out(relative: str) -> bool:
    return hashlib.sha1(relative.encode()).digest()[0] in HELD_OUT_BUCKETS


def stdlib_corpus(split: str, root: pathlib.Path | None = None) -> Corpus:
    """The standard library's .py files of one split ("train" or "held_out"), in sorted path order."""
    if split not in ("train", "held_out"):
        raise CorpusError(f"unknown split '{split}': expected 'train' or 'held_out'")
    root = root or stdlib_root()
    chosen = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if _EXCLUDED_PARTS & set(path.relative_to(root).parts):
            continue
        if _is_held_out(relative) == (split == "held_out"):
            chosen.append((relative, path))
    return _join(chosen, f"the standard library at {root}")


def text_corpus(paths: Sequence[pathlib.Path]) -> Corpus:
    """Files given by the user; folders contribute every regular file below them, in sorted order."""
    chosen = []
    for given in paths:
        if given.is_dir():
            chosen += [(f.as_posix(), f) for f in sorted(given.rglob("*")) if f.is_file()]
        elif given.is_file():
            chosen.append((given.as_posix(), given))
        else:
            raise CorpusError(f"{given}: no such file or folder")
    return _join(chosen, ", ".join(str(p) for p in paths))


def _join(chosen: Iterable[tuple[str, pathlib.Path]], where: str) -> Corpus:
    names, parts = [], []
    for name, path in chosen:
        try:
            parts.append(path.read_bytes())
        except OSError as exc:
            raise CorpusError(f"{path}: cannot read ({exc.strerror or exc})") from None
        names.append(name)
    if not parts:
        raise CorpusError(f"no text files found in {where}")
    return Corpus(np.frombuffer(_SEPARATOR.join(parts), dtype=np.uint8), tuple(names))
