"""Checkpoints with ``torch.distributed.checkpoint``, saved so that a crash never leaves one that looks complete.

Layout under the checkpoint dir::

    step-120/            a complete checkpoint (only ever appears by rename)
        COMPLETE         marker, written last, before the rename: {"step": 120, "world_size": 8}
        .metadata, __0_0.distcp, ...   DCP shards of model and optimizer (resharded on load)
        rank0.pt ...     per-rank state: step, tokens seen, scheduler, data-loader position, RNG states
    step-130.tmp/        a save in progress or killed mid-way: ignored and deleted on the next start

A save goes to ``step-N.tmp``; once every rank has written, rank 0 writes the marker and renames the
directory. Only directories named ``step-N`` holding the marker count. Deleting one (retention, or a
rollback abandoning the checkpoints after it) renames it to ``step-N.deleted.tmp`` first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / COMPLETE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint so that a kill mid-way never leaves a torn one that looks complete: first
    one rename out of the ``step-N`` namespace (a name the next start deletes), then the files."""
    doomed = checkpoint.with_name(f"{checkpoint.name}.deleted.tmp")
    os.replace(checkpoint, doomed)
    shutil.rmtree(doomed)


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


@dataclass(frozen=True)
class Saved:
    """A checkpoint made complete: where, and what it cost (``blocked_s``: the training loop waited)."""

    step: int
    path: Path
    blocked_s: float
    total_s: float


@dataclass(frozen=True)
class _InFlight:
    step: int
    future: Future | None  # None: written synchronously
    started: float
    blocked_s: float


class Checkpointer:
    """Saves and loads checkpoints under ``root``; every method is collective over all ranks.

    ``asynchronous``: ``save`` returns once the state is copied to (pinned) host memory, and DCP
    writes it from a background thread over a gloo group of its own (the default group may be NCCL,
    which must not be driven from two threads), so training goes on while the files are written. The
    checkpoint becomes complete (marker + rename) in ``finish``, which the trainer calls as soon as
    every rank's write is done, or before the next save, a rollback or the end of the run.

    Retention keeps the newest ``keep`` checkpoints and the newest one at least ``keep_steps_before``
    steps older than the newest: the one a loss-spike recovery rolls back to (``model/health.py``).
    """

    WRITER_THREADS = 8  # per rank: one thread leaves a fast filesystem mostly idle

    def __init__(
        self,
        root: Path,
        keep: int,
        rank: int,
        world_size: int,
        *,
        asynchronous: bool = False,
        keep_steps_before: int = 0,
    ) -> None:
        self.root, self.keep, self.rank, self.world_size = Path(root), keep, rank, world_size
        self.keep_steps_before = keep_steps_before
        self.asynchronous = asynchronous
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for partial in self.root.glob("step-*.tmp"):
                shutil.rmtree(partial)  # left by a killed save
        self._group = dist.new_group(backend="gloo") if asynchronous else None
        # One writer for the run (each save points it at its directory). On GPU it stages into pinned
        # host buffers made at the first save and reused after: a fast copy, no allocation per save.
        self._writer = dcp.FileSystemWriter(
            self.root, thread_count=self.WRITER_THREADS, cache_staged_state_dict=torch.cuda.is_available()
        )
        self._in_flight: _InFlight | None = None
        dist.barrier()

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        extra: dict,
        *,
        wait: bool = True,
    ) -> Saved | None:
        """Save model + optimizer (sharded) and this rank's ``extra``.

        Synchronous, or asynchronous with ``wait``: returns the complete checkpoint. Asynchronous
        without ``wait``: returns None once the state is staged; ``finish`` completes it. One save
        at a time (the writer's staging buffers are reused): finish the previous one first.
        """
        if self._in_flight is not None:
            raise RuntimeError(f"checkpoint of step {self._in_flight.step} is still in flight")
        started = time.perf_counter()
        tmp = self.root / f"step-{step}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        rank_file = tmp / f"rank{self.rank}.pt"
        torch.save(extra, rank_file)
        with open(rank_file, "rb+") as f:
            os.fsync(f.fileno())
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        future = None
        if self.asynchronous:
            future = dcp.async_save(
                state, checkpoint_id=tmp, storage_writer=self._writer, process_group=self._group
            )
        else:
            dcp.save(state, checkpoint_id=tmp, storage_writer=self._writer)
        self._in_flight = _InFlight(step, future, started, time.perf_counter() - started)
        return self.finish() if wait or not self.asynchronous else None

    def writing(self) -> bool:
        """Whether this rank is still writing the save in flight (local: no collective)."""
        pending = self._in_flight
        return pending is not None and pending.future is not None and not pending.future.done()

    def finish(self) -> Saved | None:
        """Wait for the save in flight, if any, and make it a complete checkpoint."""
        pending, self._in_flight = self._in_flight, None
        if pending is None:
            return None
        if pending.future is not None:
            pending.future.result()  # raises what the background write raised
        final, tmp = self.root / f"step-{pending.step}", self.root / f"step-{pending.step}.tmp"
        dist.barrier()
        if self.rank == 0:
            marker = tmp / COMPLETE
            with open(marker, "w") as f:
                json.dump({"step": pending.step, "world_size": self.world_size}, f)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            if final.exists():  # a re-save of a step already on disk: replace it
                _remove(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._delete_old()
        dist.barrier()
        return Saved(pending.step, final, pending.blocked_s, time.perf_counter() - pending.started)

    def _delete_old(self) -> None:
        """Keep the newest ``keep`` checkpoints, and the newest one at least ``keep_steps_before``
        steps older than the newest: where a spike recovery rolls back to."""
        found = complete_checkpoints(self.root)
        kept = {step for step, _ in found[-self.keep :]}
        if found:
            older = [step for step, _ in found if step <= found[-1][0] - self.keep_steps_before]
            kept.update(older[-1:])
        for step, path in found:
            if step not in kept:
                _remove(path)

    def discard_after(self, step: int) -> None:
        """Delete the checkpoints of steps after ``step``: a rollback to ``step`` abandoned them."""
        if self.rank == 0:
            for later, path in complete_checkpoints(self.root):
                if later > step:
                    _remove(path)
            _fsync_dir(self.root)
        dist.barrier()

    def close(self) -> None:
        """Free the pinned staging buffers (after the last ``finish``); a later save makes new ones."""
        self._writer.state_dict_cache = None

    def load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Load model + optimizer in place from ``path``; returns this rank's ``extra``."""
        meta = json.loads((path / COMPLETE).read_text())
        if meta["world_size"] != self.world_size:
            # Weights would reshard, but each rank's data-loader position would not mean the same.
            raise ValueError(
                f"checkpoint {path} was written by {meta['world_size']} ranks, this run has {self.world_size}"
            )
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return torch.load(path / f"rank{self.rank}.pt", weights_only=False)
