"""Atomic, durable output, the one way the tool writes what it keeps: stage beside the target, sync
it, rename it into place only when complete, and never lose the previous output on the way. A
whole folder (`staged_folder`: a build), or files into a folder that holds others (`staged_files`,
`staged_file`: a trace, a checkpoint, an exported model and its data)."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from lynx_export.errors import OutputError, one_line

__all__ = ["check_out_dir", "staged_folder", "staged_files", "staged_file", "write_results"]


def check_out_dir(out_dir: pathlib.Path, force: bool) -> None:
    """Refuse a target that is a file, or a non-empty folder unless `force`."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise OutputError(f"{out_dir}: folder exists and is not empty (use --force to replace it)")


@contextmanager
def _folder_lock(folder: pathlib.Path) -> Iterator[None]:
    """Exclusive lock on a folder (flock on its descriptor): publishes into it take turns."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _fsync(path: str | os.PathLike) -> None:
    """fsync one file or folder: a folder's own entries (names, renames) only reach the disk so."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _raise(exc: OSError) -> None:
    """os.walk's onerror: a folder that cannot be listed is a folder that cannot be synced."""
    raise exc


def _fsync_tree(root: pathlib.Path) -> None:
    """fsync every file, then every folder bottom-up, so the rename publishes data already on disk
    (without it a crash soon after the rename can leave the new names pointing at empty files)."""
    for folder, _dirs, files in os.walk(root, topdown=False, onerror=_raise):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):  # a link's own entry is synced with its folder
                _fsync(path)
        _fsync(folder)


def _kept(out_dir: pathlib.Path) -> str:
    """The end of every failure message: what the user still has at `out_dir`."""
    return "the previous output is intact" if out_dir.exists() else "nothing was published"


def _move_aside(out_dir: pathlib.Path) -> pathlib.Path | None:
    """Move a previous `out_dir` into a hidden `.name.old-*` folder beside it, where it waits until
    the new output is in place and durable; None when there is no previous output."""
    if not out_dir.exists():
        return None
    old = None
    try:
        old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "previous")
    except BaseException as exc:
        failure = f"could not move the previous output aside ({one_line(exc)})"
        _roll_back(out_dir, old, failure)
        if isinstance(exc, OSError):
            raise OutputError(f"{out_dir}: {failure}; {_kept(out_dir)}") from exc
        raise
    return old


def _roll_back(out_dir: pathlib.Path, old: pathlib.Path | None, failure: str, staging: pathlib.Path | None = None) -> None:
    """Undo a swap that failed halfway (`staging`: the new output already renamed to `out_dir`),
    so a failed publish leaves `out_dir` as it was. If even that fails, say where the previous
    output lies and leave it there."""
    try:
        if staging is not None:
            os.replace(out_dir, staging)
        if old is not None and (old / "previous").exists():
            os.replace(old / "previous", out_dir)
    except OSError as exc:
        where = f"the previous output is in {old / 'previous'}" if old is not None else f"{out_dir} holds the new output"
        raise OutputError(f"{out_dir}: {failure}, and undoing it failed too ({one_line(exc)}); {where}") from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _swap_in(staging: pathlib.Path, out_dir: pathlib.Path) -> None:
    """Rename `staging` to `out_dir`, keeping a previous `out_dir` aside until the renames are on
    disk (fsync of the parent folder); any failure puts the previous output back."""
    old = _move_aside(out_dir)
    renamed = False
    try:
        os.replace(staging, out_dir)
        renamed = True
        _fsync(out_dir.parent)
    except BaseException as exc:
        step = "could not sync the parent folder after the rename" if renamed else "could not rename the staged output into place"
        failure = f"{step} ({one_line(exc)})"
        _roll_back(out_dir, old, failure, staging if renamed else None)
        if isinstance(exc, OSError):
            raise OutputError(f"{out_dir}: {failure}; {_kept(out_dir)}") from exc
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _publish(staging: pathlib.Path, out_dir: pathlib.Path) -> None:
    """Sync the staged files, then swap them in under the parent folder's lock."""
    try:
        _fsync_tree(staging)
    except OSError as exc:
        raise OutputError(f"{out_dir}: could not sync the staged output to disk ({one_line(exc)}); {_kept(out_dir)}") from exc
    with _folder_lock(out_dir.parent):
        _swap_in(staging, out_dir)


@contextmanager
def staged_folder(out_dir: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yield an empty staging folder beside `out_dir`; on success it replaces `out_dir`.

    On any exception (KeyboardInterrupt included) the staging folder is removed and `out_dir`
    is left as it was. An OSError, from the caller's writes or from publishing, becomes a
    one-line OutputError; other exceptions are re-raised unchanged.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield staging
        _publish(staging, out_dir)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise OutputError(f"{out_dir}: could not write the output ({one_line(exc)}); {_kept(out_dir)}") from exc
        raise


@contextmanager
def staged_files(folder: pathlib.Path, last: str | None = None) -> Iterator[pathlib.Path]:
    """Yield an empty staging folder beside `folder`'s files; on success every file written there is
    synced and renamed into `folder` (file `last` after the others: a model after the data file it
    names, so it never names data that is not there), and `folder` is synced. On any exception the
    staging folder is removed and `folder`'s files are as they were; an OSError becomes a one-line
    OutputError. Each file is replaced atomically, not the set: a crash between two renames leaves
    the ones before it new."""
    folder.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".lynx-partial-", dir=folder))
    try:
        yield staging
        _fsync_tree(staging)
        for file in sorted(staging.iterdir(), key=lambda f: (f.name == last, f.name)):
            os.replace(file, folder / file.name)
        _fsync(folder)
    except OSError as exc:
        raise OutputError(f"{folder}: could not write the output ({one_line(exc)})") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def staged_file(path: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yield a path to write `path`'s new content to; on success it replaces `path` (`staged_files`)."""
    with staged_files(path.parent) as staging:
        yield staging / path.name


def write_results(out_dir: pathlib.Path, results: Mapping[str, Any], fields: Sequence[str], rows: Iterable[Mapping[str, Any]],
                  markdown: str) -> list[pathlib.Path]:
    """A measurement's results.json, results.csv (one row per measurement) and summary.md.

    Written in place: they are measurements, not build artifacts, and a rerun replaces them.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "results.json", out_dir / "results.csv", out_dir / "summary.md"]
    written[0].write_text(json.dumps(results, indent=2) + "\n")
    with open(written[1], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    written[2].write_text(markdown)
    return written
