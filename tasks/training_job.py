"""Following a training job: its log lines and METRIC/EVENT records, progress and ETA, the device
slots it holds on this machine, and the Prefect ``train`` task that does all of it.

The trainer prints ``METRIC {json}`` and ``EVENT {json}`` lines; everything else is plain log.
Starting and stopping the job is tasks/launchers.py.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prefect import get_client, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from pydantic import BaseModel, Field

from model.checkpoint import complete_checkpoints
from tasks.launchers import Launcher, LocalLauncher, RunningJob, TrainJob, registered, submit
from tasks.prefect_artifacts import artifact_key
from tasks.run_health import HealthEvent, JobHealth, RunHealthConfig, emit

# ---------------------------------------------------------------------------------------------
# Following a run: log lines, METRIC/EVENT records, progress


_RECORD = re.compile(r"^(?:\[[^\]]*\]:?\s*)?(METRIC|EVENT) (\{.*\})\s*$")


def parse_record(line: str) -> tuple[str, dict[str, Any]] | None:
    """``("METRIC", {...})`` or ``("EVENT", {...})`` for a trainer record line (a torchrun
    ``[rank0]:`` prefix allowed), else None."""
    match = _RECORD.match(line)
    if not match:
        return None
    try:
        record = json.loads(match.group(2))
    except json.JSONDecodeError:
        return None
    return (match.group(1), record) if isinstance(record, dict) else None


class Progress:
    """Step, loss and ETA of a run from its METRIC records, published at most every ``every_s``."""

    def __init__(
        self,
        total_steps: int,
        publish: Callable[[float, str], None],
        every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total_steps = total_steps
        self.publish = publish
        self.every_s = every_s
        self.clock = clock
        self.step: int | None = None
        self.loss: float | None = None
        self.trainer_eta_s: float | None = None  # the trainer's own estimate, when it sends one
        self._first: tuple[float, int] | None = None  # (time, step) of the first record of this attempt
        self._published_at: float | None = None

    def observe(self, metric: dict[str, Any]) -> None:
        if "step" not in metric:
            return
        now = self.clock()
        self.step = int(metric["step"])
        self.loss = metric.get("loss", self.loss)
        self.trainer_eta_s = metric.get("eta_s")
        if self._first is None:
            self._first = (now, self.step)
        if self._published_at is None or now - self._published_at >= self.every_s:
            self.flush()

    def eta_s(self) -> float | None:
        if self._first is None or self.step is None:
            return None
        t0, step0 = self._first
        elapsed, done = self.clock() - t0, self.step - step0
        if done <= 0 or elapsed <= 0:
            return None
        return max(self.total_steps - self.step, 0) * elapsed / done

    def describe(self) -> str:
        parts = [f"step {self.step}/{self.total_steps}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        eta = self.trainer_eta_s if self.trainer_eta_s is not None else self.eta_s()
        if eta is not None:
            parts.append(f"ETA {_duration(eta)}")
        return ", ".join(parts)

    def percent(self) -> float:
        return 0.0 if self.step is None else min(100.0, 100.0 * self.step / self.total_steps)

    def flush(self) -> None:
        if self.step is not None:
            self.publish(self.percent(), self.describe())
            self._published_at = self.clock()


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class TrainResult(BaseModel):
    run_name: str
    run_dir: Path
    checkpoint_dir: Path
    exit_code: int
    last_step: int | None
    last_loss: float | None
    first_step: int | None = Field(description="First step this attempt reported (> 0 when it resumed).")
    done: dict[str, Any] | None = Field(description="The trainer's final EVENT done record.")


class TrainingFailed(RuntimeError):
    pass


def follow(
    job: RunningJob,
    grace_s: float,
    log: logging.Logger,
    on_record: Callable[[str, dict[str, Any]], None],
    tail: list[str] | None = None,
    on_line: Callable[[str], None] | None = None,
) -> int:
    """Stream ``job``'s lines to ``log`` (and ``on_line``) and its records to ``on_record``; its
    exit code.

    Whatever ends the following early (an error, KeyboardInterrupt, Prefect's TerminationSignal when
    the flow run is cancelled) stops the job first: a run never outlives the task following it.
    """
    with registered(job, grace_s):
        try:
            for line in job.lines():
                log.info(line)
                if on_line is not None:
                    on_line(line)
                if tail is not None:
                    tail.append(line)
                    del tail[:-80]  # enough to hold the failing rank's traceback and torchrun's report
                if record := parse_record(line):
                    on_record(*record)
            return job.wait()
        except BaseException:
            log.warning("stopping %s", job.description)
            job.stop(grace_s)
            raise


def run_training(
    job: TrainJob,
    launcher: Launcher,
    log: logging.Logger,
    on_record: Callable[[str, dict[str, Any]], None] | None = None,
    publish_progress: Callable[[float, str], None] | None = None,
    health: RunHealthConfig | None = None,
    report_health: Callable[[HealthEvent], None] | None = None,
) -> TrainResult:
    """Submit ``job`` through ``launcher``, follow it to the end; raise TrainingFailed if it failed.
    With ``report_health``, the job's health events (tasks/run_health.py) go there as they are found."""
    progress = Progress(job.total_steps, publish_progress or (lambda percent, description: None))
    seen: dict[str, Any] = {"first_step": None, "done": None}
    watch = JobHealth(health or RunHealthConfig()) if report_health is not None else None

    def handle(kind: str, record: dict[str, Any]) -> None:
        if kind == "METRIC" and "step" in record:
            if seen["first_step"] is None:
                seen["first_step"] = int(record["step"])
            progress.observe(record)
        if kind == "EVENT" and record.get("event") == "done":
            seen["done"] = record
        if watch is not None:
            for event in watch.record(kind, record):
                report_health(event)
        if on_record is not None:
            on_record(kind, record)

    running = submit(job, launcher)
    log.info("submitted %s", running.description)
    tail: list[str] = []
    with watchdog(watch, report_health) if watch is not None else contextlib.nullcontext():
        code = follow(running, launcher.stop_grace_s, log, handle, tail, watch.line if watch else None)
    progress.flush()
    if code != 0:
        last = "\n".join(tail)
        raise TrainingFailed(f"{running.description} exited with {code}; last lines:\n{last}")
    return TrainResult(
        run_name=job.run_name,
        run_dir=job.run_dir.root,
        checkpoint_dir=job.run_dir.checkpoint_dir,
        exit_code=code,
        last_step=progress.step,
        last_loss=progress.loss,
        first_step=seen["first_step"],
        done=seen["done"],
    )


@contextlib.contextmanager
def watchdog(watch: JobHealth, report: Callable[[HealthEvent], None]) -> Iterator[None]:
    """Check ``watch`` for stalls from a thread while the block runs (the follower itself waits on
    the job's output, which is what stops coming). The thread runs in the caller's context, so its
    Prefect events name the same flow and task run."""
    stop = threading.Event()
    every_s = min(5.0, watch.stall.after_s / 4)

    def look() -> None:
        while not stop.wait(every_s):
            for event in watch.check():
                report(event)

    thread = threading.Thread(
        target=contextvars.copy_context().run, args=(look,), name="stall-watch", daemon=True
    )
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def new_checkpoints(
    checkpoint_dir: Path, finished: Callable[[], bool], poll_s: float = 5.0
) -> Iterator[Path]:
    """Each time a newer complete checkpoint appears, the newest one; ends once ``finished()`` and
    nothing newer is left. Checkpoints that came and went between two looks are passed over: an
    eval slower than the checkpoint interval evaluates the latest, it does not fall behind."""
    last_step = -1
    while True:
        finished_before_look = finished()  # so the final checkpoint is never missed
        found = complete_checkpoints(checkpoint_dir)
        if found and found[-1][0] > last_step:
            last_step, path = found[-1]
            yield path
        elif finished_before_look:
            return
        else:
            time.sleep(poll_s)


# ---------------------------------------------------------------------------------------------
# Prefect: device slots, progress artifact, the task


def device_slots(launcher: Launcher) -> tuple[str, int, int] | None:
    """(global concurrency limit, slots this run occupies, slots the machine has) for a local run.

    Slurm and Kubernetes schedule devices themselves; on this machine a Prefect global concurrency
    limit does it: ``gpu`` (one slot per GPU) for CUDA runs, ``cpu`` (one per core) for CPU runs.
    """
    if not isinstance(launcher, LocalLauncher):
        return None
    if launcher.device == "cuda":
        import torch

        return "gpu", launcher.nproc_per_node, torch.cuda.device_count()
    return "cpu", launcher.nproc_per_node, os.cpu_count() or 1


def ensure_concurrency_limit(name: str, slots: int) -> int:
    """Create the global concurrency limit ``name`` with ``slots`` unless it exists (an operator's
    setting wins); its limit. Works against any Prefect API, the ephemeral one included."""
    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name).limit
        except ObjectNotFound:
            pass
        with contextlib.suppress(ObjectAlreadyExists):  # another run created it meanwhile
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
        return client.read_global_concurrency_limit_by_name(name).limit


@contextlib.contextmanager
def holding_devices(launcher: Launcher, log: logging.Logger) -> Iterator[None]:
    """Hold the run's device slots for as long as the block runs (nothing to hold off this machine)."""
    slots = device_slots(launcher)
    if slots is None:
        yield
        return
    name, occupy, available = slots
    limit = ensure_concurrency_limit(name, available)
    if occupy > limit:
        raise ValueError(
            f"the run needs {occupy} {name} slots but the {name!r} concurrency limit has {limit}"
        )
    log.info("waiting for %d of %d %s slots", occupy, limit, name)
    with contextlib.ExitStack() as held:
        held.enter_context(concurrency(name, occupy=occupy))
        log.info("holding %d %s slots", occupy, name)
        yield
        release = held.pop_all()
    try:
        release.close()
    except Exception as exc:  # the run is done: a Prefect API still away must not fail it now
        log.warning("%s slots not released (%r); the server frees them when their lease expires", name, exc)


class ProgressArtifact:
    """A Prefect progress artifact for the run, created on the first report and then updated.

    Published from a thread, the latest report winning: a slow or restarting Prefect API (its client
    retries for about a minute) never holds up the following of the job, and a report that could not
    be sent is only logged; the next one brings the artifact up to date.
    """

    def __init__(self, key: str, log: logging.Logger):
        self.key, self.log = key, log
        self.artifact_id = None
        self._latest: tuple[float, str] | None = None
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(
            target=contextvars.copy_context().run, args=(self._publish,), name="progress", daemon=True
        )
        self._thread.start()

    def __call__(self, percent: float, description: str) -> None:
        with self._wake:
            self._latest = (percent, description)
            self._wake.notify()

    def close(self) -> None:
        """Publish the last report, then stop the thread."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def _publish(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._latest is not None or self._closed)
                report, self._latest = self._latest, None
            if report is None:
                return
            try:
                if self.artifact_id is None:
                    self.artifact_id = create_progress_artifact(
                        report[0], key=self.key, description=report[1]
                    )
                else:
                    update_progress_artifact(self.artifact_id, report[0], description=report[1])
            except Exception as exc:  # the Prefect API is away: the job goes on, the next report catches up
                self.log.warning("progress artifact not updated: %r", exc)


@task(name="train", cache_policy=NO_CACHE, retry_delay_seconds=5)
def train(job: TrainJob, launcher: Launcher, health: RunHealthConfig | None = None) -> TrainResult:
    """Run the job through the launcher on held devices, streaming its log, progress and health
    events (tasks/run_health.py) to Prefect.

    A retry (``train.with_options(retries=n)``) starts the same run directory again: the trainer
    resumes from its last complete checkpoint.
    """
    log = get_run_logger()
    progress = ProgressArtifact(artifact_key("train", job.run_name), log)
    try:
        with holding_devices(launcher, log):
            return run_training(
                job,
                launcher,
                log,
                publish_progress=progress,
                health=health,
                report_health=lambda event: emit(event, job.run_name, log),
            )
    finally:
        progress.close()
