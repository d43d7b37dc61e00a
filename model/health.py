"""Loss-spike detection: a z-score of each new loss against a window of the losses before it.

The trainer feeds it the (globally averaged, finite) losses in step order at each host sync; every
rank sees the same losses, so every rank takes the same rollback decision without extra messages.
"""

from __future__ import annotations

import math
from collections import deque


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
