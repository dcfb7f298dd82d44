"""Expensive test artefacts (exports, builds, engines, compiled libraries), made once per content key.

`cached(kind, key, make)` is the one cache every test module shares:

1. the artefact lives at `CACHE/kind/<digest of key>` (a file, or a folder for `folder=True`), so
   the key must hold everything that decides its content: configuration, the versions of the
   packages that make it and the source of the code that does (`versions`, `sources`);
2. it is made under an exclusive lock on that name, so two pytest-xdist workers, or two runs,
   asking for the same artefact wait for one `make` instead of racing;
3. `make` writes to a temporary name beside it that is renamed into place: a reader never sees half
   an artefact, and an interrupted `make` leaves nothing that looks finished;
4. a failure of the type given as `remember` (an exporter that cannot export a model) is kept as
   `<digest>.error` and raised again, so that it costs its time once.

The cache is outside the checkout (`$LYNX_EXPORT_TEST_CACHE`, else `~/.cache/lynx-export/tests`),
so that a fresh clone on the same machine reuses it; point the variable at an empty folder to
time a cold run. Artefacts are shared: a test that changes one works on its own copy.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

__all__ = ["CACHE", "ROOT", "cached", "digest", "locked", "sources", "versions"]

ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE = pathlib.Path(
    os.environ.get("LYNX_EXPORT_TEST_CACHE") or pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "lynx-export" / "tests"
)


def digest(key: Any) -> str:
    """A short hash of a JSON-able key (dict keys sorted; other objects by their str)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def versions(*packages: str) -> dict[str, str | None]:
    """Installed versions of `packages` (None where one is missing)."""
    out: dict[str, str | None] = {}
    for package in packages:
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def sources(*patterns: str, root: pathlib.Path = ROOT) -> str:
    """One hash of every file matching the glob `patterns` below `root`: names and contents."""
    h = hashlib.sha256()
    for pattern in patterns:
        for path in sorted(root.glob(pattern)):
            if path.is_file() and "__pycache__" not in path.parts:
                h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:20]


@contextlib.contextmanager
def locked(path: pathlib.Path) -> Iterator[None]:
    """An exclusive lock on `path` (created if missing) for the block: across processes, and across
    threads of one process (each `open` is its own lock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached(kind: str, key: Any, make: Callable[[pathlib.Path], Any], *, folder: bool = False, suffix: str = "",
           remember: type[Exception] | None = None) -> pathlib.Path:
    """The artefact `make(path)` writes at `path` for `key`, made at most once (see the module doc).

    `make` gets a path that does not exist yet and must create it (a file, or with `folder=True`
    a folder). `suffix` ends the file's name (`.onnx`), temporary and final alike.
    """
    where = CACHE / kind
    where.mkdir(parents=True, exist_ok=True)
    name = digest(key) + suffix
    target, error = where / name, where / f"{name}.error"

    def ready() -> pathlib.Path | None:
        if target.exists():
            return target
        if error.exists() and remember is not None:
            raise remember(error.read_text())
        return None

    if (found := ready()) is not None:
        return found
    with locked(where / f"{name}.lock"):
        if (found := ready()) is not None:  # made while this process waited for the lock
            return found
        staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}.", dir=where))
        try:
            made = staging / (name if not folder else "out")
            try:
                make(made)
            except Exception as exc:
                if remember is not None and isinstance(exc, remember):
                    note = staging / "error"
                    note.write_text(str(exc))
                    os.replace(note, error)
                raise
            if not made.exists():
                raise FileNotFoundError(f"making {kind} artefact {name} wrote nothing at {made}")
            os.replace(made, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target
