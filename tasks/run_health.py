"""Run health as Prefect events: what a person or an automation (deployment.yaml) can act on.

Each event is ``pretrain.run.<kind>`` about the resource ``pretrain.run.<run_name>``, related to the
flow run following the run (Prefect adds its flow, deployment, task run and tags), with the details as
payload:

    loss-spike          the trainer saw a loss spike (EVENT rollback / spike_not_rolled_back)
    recovery            ... and recovered from it: rolled back to a checkpoint (EVENT rollback)
    nonfinite-skipped   an update skipped for a non-finite loss or gradient (EVENT nonfinite_skipped)
    throughput-drop     tokens/s below ``throughput_fraction`` of its running median (METRIC records)
    stalled             no progress record for ``stall_after_s`` seconds (the job's output)
    eval-regression     ``val/bpb`` rose at ``regression_evals`` evaluations in a row

The detectors are plain classes (no Prefect): the training task (tasks/training_job.py) feeds them the
job's records and a clock, the pretrain flow its evaluations; ``emit`` sends what they find.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

EVENT_PREFIX = "pretrain.run"
# Trainer events after which the job only shuts down.
FINAL_EVENTS = frozenset({"done", "failed", "preempted"})


class RunHealthConfig(BaseModel):
    """When the run-health events fire (deployment.yaml's automations act on them)."""

    stall_after_s: float = Field(
        900.0, gt=0, description="Emit 'stalled' after this long without a progress record from the job."
    )
    throughput_fraction: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="Emit 'throughput-drop' when tokens/s falls below this share of its median.",
    )
    throughput_window: int = Field(20, ge=3, description="Reports in the running median of tokens/s.")
    throughput_min_reports: int = Field(
        5, ge=1, description="No throughput check before this many reports (warm-up, first compile)."
    )
    regression_evals: int = Field(
        3, ge=1, description="Emit 'eval-regression' when val/bpb rose at this many evaluations in a row."
    )


@dataclass(frozen=True)
class HealthEvent:
    kind: str  # the part after "pretrain.run."
    step: int | None
    payload: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{EVENT_PREFIX}.{self.kind}"

    def describe(self) -> str:
        details = ", ".join(f"{k}={v}" for k, v in self.payload.items() if k not in ("event", "step"))
        return f"{self.kind} at step {self.step}" + (f" ({details})" if details else "")


def from_trainer_event(record: dict[str, Any]) -> list[HealthEvent]:
    """The health events an ``EVENT {...}`` record of the trainer (model/trainer.py) stands for."""
    kind, step = record.get("event"), record.get("step")
    if kind == "nonfinite_skipped":
        return [HealthEvent("nonfinite-skipped", step, record)]
    if kind == "spike_not_rolled_back":
        return [HealthEvent("loss-spike", step, {**record, "recovered": False})]
    if kind == "rollback":  # a spike, and the recovery from it (its fields say from where, what skipped)
        return [
            HealthEvent("loss-spike", step, {**record, "recovered": True}),
            HealthEvent("recovery", step, record),
        ]
    return []


class ThroughputWatch:
    """tokens/s against the running median of the reports before it: one event per drop, re-armed
    once throughput is back above the threshold."""

    def __init__(self, fraction: float, window: int, min_reports: int) -> None:
        self.fraction, self.min_reports = fraction, min_reports
        self.history: deque[float] = deque(maxlen=window)
        self.dropped = False

    def observe(self, step: int, tokens_per_s: float) -> HealthEvent | None:
        found = None
        if len(self.history) >= self.min_reports:
            median = statistics.median(self.history)
            low = tokens_per_s < self.fraction * median
            if low and not self.dropped:
                found = HealthEvent(
                    "throughput-drop",
                    step,
                    {"tokens_per_s": tokens_per_s, "median_tokens_per_s": median, "fraction": self.fraction},
                )
            self.dropped = low
        self.history.append(tokens_per_s)  # a lasting drop becomes the new normal, and re-arms
        return found


class StallWatch:
    """No progress for ``after_s`` seconds: one event per stall, re-armed by the next progress.
    The clock starts at ``start()`` (the job's first output: a job queued on a cluster is no stall)."""

    def __init__(self, after_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.after_s, self.clock = after_s, clock
        self.last_progress: float | None = None
        self.step: int | None = None
        self.reported = False
        self.stopped = False  # the job said it is ending

    def start(self) -> None:
        if self.last_progress is None:
            self.last_progress = self.clock()

    def progress(self, step: int | None) -> None:
        self.last_progress, self.reported = self.clock(), self.stopped
        if step is not None:
            self.step = step

    def stop(self) -> None:
        self.reported = True
        self.stopped = True

    def check(self) -> HealthEvent | None:
        if self.last_progress is None or self.reported:
            return None
        silent = self.clock() - self.last_progress
        if silent < self.after_s:
            return None
        self.reported = True
        return HealthEvent(
            "stalled", self.step, {"silent_s": round(silent, 1), "stall_after_s": self.after_s}
        )


class EvalRegressionWatch:
    """``val/bpb`` higher than at the evaluation before, ``evals`` times in a row: one event per
    such streak (the next one needs a fall first)."""

    def __init__(self, evals: int) -> None:
        self.evals = evals
        self.history: list[tuple[int, float]] = []
        self.rises = 0

    def observe(self, step: int, bpb: float) -> HealthEvent | None:
        if self.history and step <= self.history[-1][0]:
            return None  # the same checkpoint again (a resumed flow): no new information
        rose = bool(self.history) and bpb > self.history[-1][1]
        self.rises = self.rises + 1 if rose else 0
        self.history.append((step, bpb))
        if self.rises != self.evals:
            return None
        streak = self.history[-self.evals - 1 :]
        return HealthEvent(
            "eval-regression",
            step,
            {
                "metric": "val/bpb",
                "evals": self.evals,
                "steps": [s for s, _ in streak],
                "values": [v for _, v in streak],
            },
        )


class JobHealth:
    """The health of one attempt of a training job, from its output: the trainer's events, its
    throughput, and stalls (``line`` at every output line, ``record`` at every record, ``check``
    now and then from a watchdog)."""

    def __init__(self, config: RunHealthConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.throughput = ThroughputWatch(
            config.throughput_fraction, config.throughput_window, config.throughput_min_reports
        )
        self.stall = StallWatch(config.stall_after_s, clock)

    def line(self, line: str) -> None:
        self.stall.start()

    def record(self, kind: str, record: dict[str, Any]) -> list[HealthEvent]:
        self.stall.progress(record.get("step"))
        if kind == "EVENT":
            if record.get("event") in FINAL_EVENTS:  # the job is ending: its silence from now on is no stall
                self.stall.stop()
            return from_trainer_event(record)
        if isinstance(record.get("tokens_per_s"), int | float) and "step" in record:
            found = self.throughput.observe(int(record["step"]), float(record["tokens_per_s"]))
            return [found] if found else []
        return []

    def check(self) -> list[HealthEvent]:
        found = self.stall.check()
        return [found] if found else []


# ---------------------------------------------------------------------------------------------
# Prefect


def resource(run_name: str) -> dict[str, str]:
    return {
        "prefect.resource.id": f"{EVENT_PREFIX}.{run_name}",
        "prefect.resource.name": run_name,
        "pretrain.run.name": run_name,
    }


def flow_run_resource() -> dict[str, str] | None:
    """The flow run this code runs in (as a related resource), or None outside one."""
    from prefect.runtime import flow_run

    if not flow_run.id:
        return None
    return {
        "prefect.resource.id": f"prefect.flow-run.{flow_run.id}",
        "prefect.resource.role": "flow-run",
        "prefect.resource.name": flow_run.name or "",
    }


def emit(event: HealthEvent, run_name: str, log: logging.Logger | None = None) -> None:
    """Send ``event`` to Prefect (and say it in the run's log). Never raises: health reporting must
    not stop a run, also while the Prefect server is away."""
    from prefect.events import emit_event

    if log is not None:
        log.warning("run health: %s", event.describe())
    related = [r] if (r := flow_run_resource()) else []
    payload = {"step": event.step, **{k: v for k, v in event.payload.items() if k != "traceback"}}
    try:
        emit_event(event.name, resource=resource(run_name), related=related, payload=payload)
    except Exception as exc:  # e.g. an oversized payload; the log line above still tells
        if log is not None:
            log.warning("run health event %s not sent: %r", event.name, exc)
