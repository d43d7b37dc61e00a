"""Atomic file writes, standard library only: ``infra/`` and every stage use it without pulling in
pyarrow or Prefect. (``model/`` keeps its own: it never imports ``tasks/``.)

A write goes to a temporary file beside the target and replaces it in one rename, so a reader sees
the old bytes or the new ones, never a part. Temporary names start with ``.`` and end with ``.tmp``
(``TEMP_GLOB``) so that a later run can find and remove what a killed writer left behind.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TEMP_GLOB = ".*.tmp"
KILL_AT_ENV = "PRETRAIN_TEST_KILL_AT"  # tests only: see kill_point


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        kill_point(target)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def kill_point(target: Path) -> None:
    """Test hook (``tests/test_kill_points.py``): SIGKILL this process's group (a refresh with its
    task workers) when the new bytes of a target matching the glob in ``$PRETRAIN_TEST_KILL_AT`` are
    written but not yet renamed into place: the first such write is a deterministic kill point."""
    pattern = os.environ.get(KILL_AT_ENV)
    if pattern and fnmatch.fnmatch(str(target), pattern):
        os.killpg(os.getpgrp(), signal.SIGKILL)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Indented, key-sorted JSON with a final newline: the same data gives the same bytes."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def remove_stale_temp_files(directory: str | os.PathLike[str]) -> int:
    """Remove what killed writers left anywhere under ``directory`` (``TEMP_GLOB`` names, files or
    directories); returns how many were removed.

    Call it only when nothing writes there, as a stage's run does before it writes: the temporary
    file of a live writer looks the same.
    """
    removed = 0
    for parent, dirs, files in os.walk(directory):
        for name in fnmatch.filter(files, TEMP_GLOB):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(parent, name))
                removed += 1
        for name in fnmatch.filter(dirs, TEMP_GLOB):
            dirs.remove(name)  # not walked into: removed whole
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            removed += 1
    return removed


def remove_unlisted(directory: str | os.PathLike[str], listed: set[str]) -> int:
    """Remove every entry of an index's ``directory`` that the index does not name: what a killed
    index writer left (half-copied temporaries, entries renamed into place before the index was
    replaced). Only the index's one writer may call it. Returns how many were removed."""
    removed = 0
    for entry in Path(directory).iterdir() if Path(directory).is_dir() else []:
        if entry.name in listed:
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed += 1
    return removed
