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
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TEMP_GLOB = ".*.tmp"


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
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
