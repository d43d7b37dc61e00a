"""The layout of a training run's directory, defined once for the launcher, the trainer and the evals.

    <runs_root>/<run_name>/
        run.json               the trainer's resolved config (TrainConfig)
        train.log              the job's log as the launcher saw it
        checkpoints/step-N/    complete checkpoints (model/checkpoint.py)

The directory is a pure function of the run name, so a retry or a restart finds it and resumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RUN_CONFIG = "run.json"
TRAIN_LOG = "train.log"
CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def of(cls, runs_root: str | Path, run_name: str) -> RunDir:
        return cls(Path(runs_root).resolve() / run_name)

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunDir:
        """The run a checkpoint ``<run>/checkpoints/step-N`` belongs to."""
        return cls(Path(checkpoint).resolve().parent.parent)

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def config_path(self) -> Path:
        return self.root / RUN_CONFIG

    @property
    def log_path(self) -> Path:
        return self.root / TRAIN_LOG

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / CHECKPOINTS
