"""Loss-spike detection and recovery.

``SpikeDetector``: a z-score of each new loss against a window of the losses before it. The trainer
feeds it the (globally averaged, finite) losses in step order at each host sync; every rank sees the
same losses, so every rank takes the same recovery decision without extra messages.

``Recovery``: PaLM's recipe (Chowdhery et al. 2022, section 5.1). A spike usually comes from updates
made before it shows, so a checkpoint saved inside the spike window can already hold the damage and
a plain replay spikes again. A recovery rolls back to a checkpoint at least N steps before the spike,
skips the batches from there on up to (at least) the spike's own, and may run a while at a lower
learning rate. Each one is kept in the trainer state, so a resume replays it exactly.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


class SpikeDetector:
    def __init__(self, window: int, min_history: int, zscore: float) -> None:
        self.window, self.min_history, self.zscore = window, min_history, zscore
        self.history: deque[float] = deque(maxlen=window)

    def score(self, loss: float) -> float | None:
        """How many standard deviations ``loss`` lies above the window's mean (None: too little history)."""
        if len(self.history) < self.min_history:
            return None
        mean = sum(self.history) / len(self.history)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
        # A floor on std: a flat window must not turn noise into a spike.
        return (loss - mean) / max(std, 1e-3 * abs(mean), 1e-8)

    def observe(self, loss: float) -> float | None:
        """Score ``loss``; if it is no spike, add it to the window. Returns the z-score when it is a spike."""
        z = self.score(loss)
        if z is not None and z > self.zscore:
            return z
        self.history.append(loss)
        return None

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(state["history"], maxlen=self.window)


def rollback_step(checkpoint_steps: list[int], spike_step: int, min_steps_before: int) -> int | None:
    """The newest checkpoint step at least ``min_steps_before`` steps before the spike; None: none is."""
    return max((s for s in checkpoint_steps if s <= spike_step - min_steps_before), default=None)


@dataclass(frozen=True)
class Recovery:
    """One spike recovery: the spike, the checkpoint rolled back to, the batches skipped, the cooling.

    Data steps count step-sized batches drawn from the loader (skipped ones included); steps count
    optimizer updates. Both ranges are inclusive.
    """

    spike_step: int
    spike_data_step: int
    loss: float
    zscore: float
    to_step: int  # the checkpoint's step
    checkpoint: str
    skip_first_data_step: int
    skip_last_data_step: int
    lr_factor: float  # the steps to_step + 1 .. lr_until_step train at lr * lr_factor
    lr_until_step: int

    @property
    def skipped_batches(self) -> int:
        return self.skip_last_data_step - self.skip_first_data_step + 1

    def skips(self, data_step: int) -> bool:
        return self.skip_first_data_step <= data_step <= self.skip_last_data_step

    def lr_scale(self, step: int) -> float:
        """The learning-rate factor of the update that makes step ``step``."""
        return self.lr_factor if self.to_step < step <= self.lr_until_step else 1.0


def plan_recovery(
    *,
    spike_step: int,
    spike_data_step: int,
    loss: float,
    zscore: float,
    to_step: int,
    to_data_step: int,
    checkpoint: str,
    skip_batches: int,
    lr_factor: float,
    lr_steps: int,
) -> Recovery:
    """The recovery from a spike back to a checkpoint (at ``to_step``, having drawn ``to_data_step``
    batches): skip ``skip_batches`` batches after it, and at least every batch up to the spike's."""
    return Recovery(
        spike_step=spike_step,
        spike_data_step=spike_data_step,
        loss=loss,
        zscore=zscore,
        to_step=to_step,
        checkpoint=checkpoint,
        skip_first_data_step=to_data_step + 1,
        skip_last_data_step=max(spike_data_step, to_data_step + skip_batches),
        lr_factor=lr_factor,
        lr_until_step=to_step + lr_steps,
    )


def recoveries_near(recoveries: list[Recovery], step: int, window: int) -> int:
    """How many recoveries were for spikes less than ``window`` steps from ``step`` (either side: a
    rollback moves the step count back, so a later spike can have a smaller step)."""
    return sum(abs(r.spike_step - step) < window for r in recoveries)
