"""Atomic folder output: stage beside the target, rename into place only when complete."""

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

from lynx_export.errors import OutputError

__all__ = ["check_out_dir", "staged_folder", "write_results"]


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


def _publish(staging: pathlib.Path, out_dir: pathlib.Path) -> None:
    with _folder_lock(out_dir.parent):
        _swap_in(staging, out_dir)


def _swap_in(staging: pathlib.Path, out_dir: pathlib.Path) -> None:
    if out_dir.exists():
        old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "previous")
        os.replace(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out_dir)


@contextmanager
def staged_folder(out_dir: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yield an empty staging folder beside `out_dir`; on success it replaces `out_dir`.

    On any exception (KeyboardInterrupt included) the staging folder is removed and `out_dir`
    is left as it was.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield staging
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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
