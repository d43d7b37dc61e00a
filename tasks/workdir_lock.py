"""One writer per workdir: a data refresh holds an exclusive lock on its workdir while it runs.

The lock is ``fcntl.flock`` on ``<workdir>/.refresh.lock``. The kernel releases it when the holding
process dies, however it dies, so the lock of a SIGKILLed refresh is simply taken by the next one
(nothing to judge by pid or age). The file also holds a JSON record of the holder (host, pid,
command, flow run, since when) for the one-line message a second writer gets; a clean release
removes the file.

The process that runs the flow holds the lock; the stage tasks it submits (to a process pool or a
Dask cluster) never take it, so they cannot wait on their own flow. Within one process the lock is
re-entrant: the CLI takes it before it starts a Prefect server (a busy workdir is one line at once,
not after a server start) and the flow, in the same process, takes it again. The file descriptor is
not inherited by spawned processes (Python opens it close-on-exec). Task workers of a process pool
outlive a flow process killed alone and may still be writing: they inherit the holder's token
(``WRITER_ENV``), and whoever takes the lock over stops them first (``stop_leftovers``; same host).

On a workdir shared over NFS, Linux maps ``flock`` to NFS byte-range locks, so it holds across
hosts; a crashed host's lock goes when its lease expires.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shlex
import signal
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

LOCK_FILE = ".refresh.lock"
POLL_S = 0.5
# Set while a process holds a workdir and inherited by what it starts (its task workers), so that
# the next holder can find a dead holder's processes: pool workers outlive a SIGKILLed parent.
WRITER_ENV = "PRETRAIN_WORKDIR_WRITER"

log = logging.getLogger(__name__)


class WorkdirBusy(RuntimeError):
    """Another process holds the workdir's lock; the message names it."""


@dataclass
class _Held:
    fd: int
    record: dict[str, Any]
    outer_writer: str | None  # WRITER_ENV before this hold
    depth: int = 1


_held: dict[Path, _Held] = {}  # lock file -> this process's hold on it


def lock_path(workdir: str | os.PathLike[str]) -> Path:
    return Path(workdir).resolve() / LOCK_FILE


def read_holder(workdir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The holder record in the lock file (of a live holder or a dead one), or None."""
    try:
        return json.loads(lock_path(workdir).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):  # no file, or its holder is between open and write
        return None


def describe(record: dict[str, Any] | None) -> str:
    """The holder in a few words: who, where, which run, since when."""
    if not record:
        return "a process that has not written its holder record yet"
    run = f"flow run {record['flow_run']}, " if record.get("flow_run") else ""
    return (
        f"pid {record.get('pid')} on {record.get('host')} ({run}`{record.get('command')}`) "
        f"since {record.get('since')}"
    )


def acquire(workdir: str | os.PathLike[str], wait_s: float = 0.0, *, flow_run: str | None = None) -> None:
    """Take the workdir's lock, waiting up to ``wait_s`` seconds; else raise ``WorkdirBusy``.

    Taken again in the process that holds it: counted, and ``flow_run`` is added to the record.
    """
    path = lock_path(workdir)
    if held := _held.get(path):
        held.depth += 1
        if flow_run and held.record.get("flow_run") != flow_run:
            held.record["flow_run"] = flow_run
            _write_record(held.fd, held.record)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while (fd := _try_lock(path)) is None:
        if time.monotonic() >= deadline:
            raise WorkdirBusy(
                f"workdir {path.parent} is being written by another data refresh: "
                f"{describe(read_holder(path.parent))}; waited {wait_s:g} s "
                "(wait longer with --lock-wait SECONDS / lock_wait_s)"
            )
        time.sleep(POLL_S)
    if previous := read_holder(path.parent):  # a holder that died without releasing
        stopped = stop_leftovers(previous)
        log.warning(
            "workdir %s: taking over the lock of %s, which is gone%s",
            path.parent,
            describe(previous),
            f"; stopped the processes it left running: {stopped}" if stopped else "",
        )
    record = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
        "flow_run": flow_run,
        "since": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "token": uuid.uuid4().hex,
    }
    _write_record(fd, record)
    _held[path] = _Held(fd, record, os.environ.get(WRITER_ENV))
    os.environ[WRITER_ENV] = record["token"]


def release(workdir: str | os.PathLike[str]) -> None:
    """Give up one hold; the last one removes the lock file and releases the lock."""
    path = lock_path(workdir)
    held = _held[path]
    held.depth -= 1
    if held.depth:
        return
    del _held[path]
    if held.outer_writer is None:
        os.environ.pop(WRITER_ENV, None)
    else:
        os.environ[WRITER_ENV] = held.outer_writer
    # Unlinked while still locked: a waiter that opened this file finds it gone and opens anew.
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    os.close(held.fd)


@contextlib.contextmanager
def hold(
    workdir: str | os.PathLike[str], wait_s: float = 0.0, *, flow_run: str | None = None
) -> Iterator[None]:
    """Hold the workdir's lock for the block (see ``acquire``)."""
    acquire(workdir, wait_s, flow_run=flow_run)
    try:
        yield
    finally:
        release(workdir)


def stop_leftovers(record: dict[str, Any], timeout_s: float = 10.0) -> list[int]:
    """SIGKILL the processes a dead holder started on this host (they carry its token in their
    environment: task workers a killed flow left, perhaps still writing); returns their pids."""
    if record.get("host") != socket.gethostname():
        return []  # another host's processes are out of sight
    pids = writer_processes(record.get("token"))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return sorted(pids)


def writer_processes(token: str | None) -> list[int]:
    """Live processes on this host that carry a holder's token (``WRITER_ENV``) from their start."""
    if not token:
        return []
    needle = f"{WRITER_ENV}={token}".encode()
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):  # gone meanwhile, or another user's
            if needle in (proc / "environ").read_bytes().split(b"\0") and _alive(int(proc.name)):
                pids.append(int(proc.name))
    return sorted(pids)


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its parent to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _try_lock(path: Path) -> int | None:
    """An open, locked descriptor of the lock file at ``path`` now, or None when another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    try:  # the holder may have released (and removed) the file between our open and our lock
        current = os.stat(path)
    except FileNotFoundError:
        current = None
    opened = os.fstat(fd)
    if current is None or (current.st_dev, current.st_ino) != (opened.st_dev, opened.st_ino):
        os.close(fd)
        return _try_lock(path)
    return fd


def _write_record(fd: int, record: dict[str, Any]) -> None:
    data = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def wait_free(workdir: str | os.PathLike[str], wait_s: float = 0.0) -> None:
    """Return once no other process holds the workdir (up to ``wait_s`` seconds), else raise
    ``WorkdirBusy``: a check before slow setup; the writer itself still takes the lock."""
    with hold(workdir, wait_s):
        pass
