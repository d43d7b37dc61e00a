"""Checkpoints with ``torch.distributed.checkpoint``, saved so that a crash never leaves one that looks complete.

Layout under the checkpoint dir::

    step-120/            a complete checkpoint (only ever appears by rename)
        COMPLETE         marker, written last, before the rename: {"step": 120, "world_size": 8}
        .metadata, __0_0.distcp, ...   DCP shards of model and optimizer (resharded on load)
        rank0.pt ...     per-rank state: step, tokens seen, scheduler, data-loader position, RNG states
    step-130.tmp/        a save in progress or killed mid-way: ignored and deleted on the next start

A save goes to ``step-N.tmp``; once every rank has written, rank 0 writes the marker and renames the
directory. Only directories named ``step-N`` holding the marker count.
"""

from __future__ import annotations

import json
import os
import re
import shutil
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


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


class Checkpointer:
    WRITER_THREADS = 8

    def __init__(self, root: Path, keep: int, rank: int, world_size: int) -> None:
        self.root, self.keep, self.rank, self.world_size = Path(root), keep, rank, world_size
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for partial in self.root.glob("step-*.tmp"):
                shutil.rmtree(partial)  # left by a killed save
        dist.barrier()

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict) -> Path:
        """Save model + optimizer (sharded) and this rank's ``extra``; collective over all ranks."""
        final, tmp = self.root / f"step-{step}", self.root / f"step-{step}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        # Several writer threads per rank: one thread leaves a fast filesystem mostly idle.
        writer = dcp.FileSystemWriter(tmp, thread_count=self.WRITER_THREADS)
        dcp.save({"model": model_state, "optim": optim_state}, storage_writer=writer)
        rank_file = tmp / f"rank{self.rank}.pt"
        torch.save(extra, rank_file)
        with open(rank_file, "rb+") as f:
            os.fsync(f.fileno())
        dist.barrier()
        if self.rank == 0:
            marker = tmp / COMPLETE
            with open(marker, "w") as f:
                json.dump({"step": step, "world_size": self.world_size}, f)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            if final.exists():  # a re-save of the same step (after a rollback): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            for _, old in complete_checkpoints(self.root)[: -self.keep]:
                shutil.rmtree(old)
        dist.barrier()
        return final

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
