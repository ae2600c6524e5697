"""Atomic writes: a reader (or a resumed run) sees the old file or directory, or the complete new one.

Everything is written under a `.tmp-` name beside its target, flushed to disk, then renamed over it
(a rename within one file system is atomic). The one home of this pattern for the whole tree; it sits
at the bottom layer so checkpoints, run directories and stages all reach it.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

TMP_PREFIX = ".tmp-"


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace the file `path` with `text` in one step."""
    tmp = path.with_name(TMP_PREFIX + path.name)
    tmp.write_text(text)
    fsync_file(tmp)
    os.replace(tmp, path)


def atomic_write_dir(target: Path, write_fn: Callable[[Path], None]) -> Path:
    """Write a directory under a temporary name, then rename it into place.

    A reader never sees a half-written directory: either the old one, or the complete new one.
    """
    target = Path(target)
    tmp = target.with_name(TMP_PREFIX + target.name)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_fn(tmp)
    for file in tmp.rglob("*"):
        if file.is_file():
            fsync_file(file)
    if target.exists():
        old = target.with_name(TMP_PREFIX + "old-" + target.name)
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)
    fsync_dir(target.parent)
    return target
