"""Training runs submitted from Prefect: launchers, and the task that follows a run to its end.

A run lives in one directory named after the run: ``run.json`` (the trainer's config),
``checkpoints/`` and ``train.log``. The directory comes from the run name, never from the task
run, so a Prefect retry starts the same run again and the trainer resumes from its latest complete
checkpoint instead of step 0.

A launcher starts ``model.trainer`` under torchrun somewhere and hands back a ``RunningJob``: its
log lines, its exit code, and a way to stop it. ``local`` runs torchrun as a subprocess in its own
process group (stopping the run stops the group), ``slurm`` submits an sbatch script rendered from
``infra/slurm/``, ``kubernetes`` applies a Job or PyTorchJob manifest rendered from
``infra/k8s/training/``. The launcher configs are pydantic models with a ``kind`` discriminator:
they are the launcher part of the Prefect run form.

The trainer prints ``METRIC {json}`` and ``EVENT {json}`` lines; everything else is plain log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import jinja2
from prefect import get_client, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from pydantic import BaseModel, Field

from model.checkpoint import complete_checkpoints
from tasks import dataset as ds

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
TRAINER_ENTRYPOINT = ["-m", "model.trainer"]
RUN_CONFIG = "run.json"  # the trainer's config, in the run directory


# ---------------------------------------------------------------------------------------------
# Launcher configs (the Prefect UI form)


class LocalLauncher(BaseModel):
    """torchrun on this machine: one process per GPU, or N CPU processes talking gloo."""

    kind: Literal["local"] = "local"
    nproc_per_node: int = Field(1, ge=1, description="Processes to start: one per GPU, or CPU ranks.")
    device: Literal["cuda", "cpu"] = Field("cuda", description="cuda: NCCL, one GPU per process; cpu: gloo.")
    stop_grace_s: float = Field(30.0, ge=0, description="Seconds between SIGTERM and SIGKILL on stop.")


class SlurmLauncher(BaseModel):
    """sbatch of ``infra/slurm/train.sbatch.j2``: one torchrun per node, c10d rendezvous on the first."""

    kind: Literal["slurm"] = "slurm"
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(8, ge=1)
    cpus_per_node: int = Field(64, ge=1)
    mem: str = Field("0", description="sbatch --mem ('0' = all of the node's memory).")
    time_limit: str = Field("2-00:00:00", description="sbatch --time.")
    partition: str | None = None
    account: str | None = None
    workdir: str = Field(
        str(REPO), description="Checkout of this repository on the cluster's shared filesystem."
    )
    setup: str = Field("source .venv/bin/activate", description="Shell line run before torchrun.")
    poll_s: float = Field(15.0, gt=0, description="How often to ask Slurm for the job state.")
    stop_grace_s: float = Field(60.0, ge=0)


class KubernetesLauncher(BaseModel):
    """A batch/v1 Job (one node) or a Kubeflow PyTorchJob (several nodes) from ``infra/k8s/training/``."""

    kind: Literal["kubernetes"] = "kubernetes"
    image: str = Field(description="Image with this repository installed at workdir.")
    namespace: str = "default"
    nodes: int = Field(
        1, ge=1, description="1: a plain Job; more: a PyTorchJob (needs the training operator)."
    )
    gpus_per_node: int = Field(8, ge=1)
    cpu: str = "32"
    memory: str = "256Gi"
    workdir: str = "/app"
    volume_claim: str = Field(
        description="PersistentVolumeClaim holding data and runs, mounted at mount_path."
    )
    mount_path: str = Field(
        "/mnt/pretrain", description="Where the claim is mounted; run paths must lie under it."
    )
    shm_size: str = "64Gi"
    poll_s: float = Field(15.0, gt=0)
    stop_grace_s: float = Field(60.0, ge=0)


# The run form shows one of the three, picked by ``kind``.
Launcher = Annotated[LocalLauncher | SlurmLauncher | KubernetesLauncher, Field(discriminator="kind")]


# ---------------------------------------------------------------------------------------------
# A run: its directory and what the launchers need to start it


class TrainJob(BaseModel):
    run_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    run_dir: Path
    total_steps: int = Field(ge=1, description="Steps the run is configured for (progress and ETA).")
    entrypoint: list[str] = Field(default_factory=lambda: list(TRAINER_ENTRYPOINT))

    @property
    def config_path(self) -> Path:
        return self.run_dir / RUN_CONFIG

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "train.log"

    def trainer_args(self) -> list[str]:
        """What follows torchrun's own options: the trainer module (or script) and its config."""
        return [*self.entrypoint, "--config", str(self.config_path)]


def run_dir_for(runs_root: str | Path, run_name: str) -> Path:
    """The run's directory: a pure function of the run name, so retries and restarts find it."""
    return Path(runs_root).resolve() / run_name


def write_run_config(job: TrainJob, config: dict[str, Any]) -> Path:
    """Write the trainer's config for ``job`` atomically (sorted keys: same config, same bytes)."""
    job.run_dir.mkdir(parents=True, exist_ok=True)
    ds.atomic_write_text(job.config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return job.config_path


# ---------------------------------------------------------------------------------------------
# Running jobs


class RunningJob(Protocol):
    description: str

    def lines(self) -> Iterator[str]:
        """The job's log lines, as they come, until its output ends."""

    def wait(self) -> int:
        """Block until the job has ended; its exit code (0 = success)."""

    def stop(self, grace_s: float) -> None:
        """Ask the job to stop (SIGTERM or equivalent), force it after ``grace_s`` seconds."""


class LocalJob:
    """torchrun as a subprocess, session leader of its own process group."""

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: Path, log_path: Path):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        # Its own session: a signal meant for the flow process does not reach the ranks half-way, and
        # stop() can reach every rank (and anything they started) through the group id.
        self.process = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            errors="replace",
            start_new_session=True,
        )
        self.description = f"local torchrun pid {self.process.pid}: {shlex.join(cmd)}"

    @property
    def pgid(self) -> int:
        return self.process.pid

    def lines(self) -> Iterator[str]:
        assert self.process.stdout is not None
        with open(self.log_path, "a", encoding="utf-8") as log:
            for line in self.process.stdout:
                log.write(line)
                log.flush()
                yield line.rstrip("\n")

    def wait(self) -> int:
        return self.process.wait()

    def stop(self, grace_s: float) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _group_alive(self.pgid, self.process):
            time.sleep(0.1)
        # Whatever is left (a rank stuck in a collective, a leader that exited before its workers):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        self.process.wait()


def _group_alive(pgid: int, leader: subprocess.Popen) -> bool:
    leader.poll()  # reap the leader so it does not count as a member
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def local_command(job: TrainJob, launcher: LocalLauncher) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # single node, a free rendezvous port: two local runs never collide
        f"--nproc-per-node={launcher.nproc_per_node}",
        *job.trainer_args(),
    ]


def local_env(launcher: LocalLauncher) -> dict[str, str]:
    env = dict(os.environ)
    # Not PYTHONUNBUFFERED: unbuffered, print() writes the text and its newline separately and two
    # ranks' lines interleave. The trainer prints whole lines with flush=True instead.
    env.pop("PYTHONUNBUFFERED", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    if launcher.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the trainer picks gloo on CPU
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def submit_local(job: TrainJob, launcher: LocalLauncher) -> LocalJob:
    return LocalJob(local_command(job, launcher), local_env(launcher), REPO, job.log_path)


# ---------------------------------------------------------------------------------------------
# Slurm


def _templates(folder: Path) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(folder),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["q"] = lambda value: shlex.quote(str(value))
    env.filters["tojson"] = lambda value: json.dumps(value)
    return env


def slurm_job_name(job: TrainJob) -> str:
    return f"train-{job.run_name}"


def render_sbatch(job: TrainJob, launcher: SlurmLauncher) -> str:
    """The sbatch script of ``job`` from ``infra/slurm/train.sbatch.j2``."""
    return (
        _templates(INFRA / "slurm")
        .get_template("train.sbatch.j2")
        .render(
            job_name=slurm_job_name(job),
            launcher=launcher,
            log_path=str(job.log_path),
            trainer_args=shlex.join(job.trainer_args()),
        )
    )


class CommandJob:
    """A job on a scheduler, followed through its CLI: the log is tailed, the state polled."""

    def __init__(
        self,
        description: str,
        log_lines: Callable[[], Iterator[str]],
        state: Callable[[], int | None],
        stop: Callable[[float], None],
        poll_s: float,
    ):
        self.description = description
        self._log_lines = log_lines
        self._state = state
        self._stop = stop
        self._poll_s = poll_s

    def lines(self) -> Iterator[str]:
        return self._log_lines()

    def wait(self) -> int:
        while (code := self._state()) is None:
            time.sleep(self._poll_s)
        return code

    def stop(self, grace_s: float) -> None:
        self._stop(grace_s)


def _run(cmd: list[str], input: str | None = None) -> str:
    done = subprocess.run(cmd, input=input, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


# Slurm job states that mean the job is over, and whether it succeeded (0) or not (1). The script
# asks for no requeue: a preempted job fails here and Prefect's retry resubmits it, to resume.
SLURM_FINAL_STATES = {"COMPLETED": 0} | dict.fromkeys(
    ["FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"], 1
)


def slurm_state(job_id: str) -> int | None:
    """None while the job is pending or running, else 0 (completed) or 1."""
    lines = _run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"]).split("\n")
    # Not yet in the accounting database reads as pending; "CANCELLED by 123" -> "CANCELLED".
    state = lines[0].split()[0].rstrip("+") if lines[0].strip() else "PENDING"
    return SLURM_FINAL_STATES.get(state)


def tail_file(path: Path, finished: Callable[[], bool], poll_s: float, position: int = 0) -> Iterator[str]:
    """Lines appended to ``path`` after byte ``position`` until ``finished()`` and nothing more is left."""
    while True:
        done = finished()  # checked before reading, so the last lines are never missed
        if path.exists():
            with open(path, encoding="utf-8", errors="replace") as f:
                f.seek(position)
                while line := f.readline():
                    if not line.endswith("\n") and not done:
                        break  # a line still being written: read it whole next time
                    position = f.tell()
                    yield line.rstrip("\n")
        if done:
            return
        time.sleep(poll_s)


def submit_slurm(job: TrainJob, launcher: SlurmLauncher) -> CommandJob:
    script = job.run_dir / "train.sbatch"
    ds.atomic_write_text(script, render_sbatch(job, launcher))
    # The log is appended to by every attempt of the run: follow only what this attempt writes.
    log_start = job.log_path.stat().st_size if job.log_path.exists() else 0
    job_id = _run(["sbatch", "--parsable", str(script)]).strip().split(";")[0]

    def poll() -> int | None:
        return slurm_state(job_id)

    def stop(grace_s: float) -> None:
        # TERM to the batch step and its children first (torchrun forwards it to the ranks), then cancel.
        subprocess.run(["scancel", "--signal=TERM", "--full", job_id], check=False)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and poll() is None:
            time.sleep(min(launcher.poll_s, 5.0))
        subprocess.run(["scancel", job_id], check=False)

    return CommandJob(
        f"slurm job {job_id} ({script})",
        lambda: tail_file(job.log_path, lambda: poll() is not None, launcher.poll_s, log_start),
        poll,
        stop,
        launcher.poll_s,
    )


# ---------------------------------------------------------------------------------------------
# Kubernetes


def k8s_name(job: TrainJob) -> str:
    """A DNS-1123 name for the run's Job (lowercase, dashes, at most 63 characters)."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"train-{job.run_name}".lower()).strip("-")
    return name[:63].rstrip("-")


def render_k8s(job: TrainJob, launcher: KubernetesLauncher) -> str:
    """The manifest of ``job``: ``job.yaml.j2`` for one node, ``pytorchjob.yaml.j2`` for several."""
    mount = Path(launcher.mount_path)
    if not job.run_dir.is_relative_to(mount):
        raise ValueError(
            f"run dir {job.run_dir} is not under the volume mount {mount}: pods would not see it"
        )
    template = "job.yaml.j2" if launcher.nodes == 1 else "pytorchjob.yaml.j2"
    return (
        _templates(INFRA / "k8s" / "training")
        .get_template(template)
        .render(name=k8s_name(job), run_name=job.run_name, launcher=launcher, trainer_args=job.trainer_args())
    )


def k8s_resource(launcher: KubernetesLauncher) -> str:
    return "job" if launcher.nodes == 1 else "pytorchjob"


def k8s_state(launcher: KubernetesLauncher, name: str) -> int | None:
    ref = [f"{k8s_resource(launcher)}/{name}", "-n", launcher.namespace]
    status = json.loads(_run(["kubectl", "get", *ref, "-o", "json"])).get("status", {})
    for condition in status.get("conditions", []):
        if condition.get("status") == "True" and condition.get("type") in ("Complete", "Succeeded"):
            return 0
        if condition.get("status") == "True" and condition.get("type") == "Failed":
            return 1
    return None


def submit_kubernetes(job: TrainJob, launcher: KubernetesLauncher) -> CommandJob:
    manifest = render_k8s(job, launcher)
    ds.atomic_write_text(job.run_dir / f"{k8s_resource(launcher)}.yaml", manifest)
    name = k8s_name(job)
    ref = [f"{k8s_resource(launcher)}/{name}", "-n", launcher.namespace]
    # A retry submits the run again under the same name: the previous attempt's object goes first.
    _run(["kubectl", "delete", *ref, "--ignore-not-found", "--wait=true"])
    _run(["kubectl", "apply", "-f", "-"], input=manifest)
    # Rank 0 writes the METRIC/EVENT lines: follow its pod (the Job's only pod, or the PyTorchJob's master).
    selector = (
        f"job-name={name}"
        if launcher.nodes == 1
        else f"training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type=master"
    )
    logs = ["kubectl", "logs", "-f", "-n", launcher.namespace, "-l", selector, "--tail=-1"]
    logs += ["--pod-running-timeout=24h"]

    def log_lines() -> Iterator[str]:
        with subprocess.Popen(logs, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as follower:
            assert follower.stdout is not None
            for line in follower.stdout:
                yield line.rstrip("\n")

    def stop(grace_s: float) -> None:
        subprocess.run(
            ["kubectl", "delete", *ref, f"--grace-period={int(grace_s)}", "--wait=false"], check=False
        )

    return CommandJob(
        f"kubernetes {ref[0]} in namespace {launcher.namespace}",
        log_lines,
        lambda: k8s_state(launcher, name),
        stop,
        launcher.poll_s,
    )


def submit(job: TrainJob, launcher: Launcher) -> RunningJob:
    if isinstance(launcher, LocalLauncher):
        return submit_local(job, launcher)
    if isinstance(launcher, SlurmLauncher):
        return submit_slurm(job, launcher)
    return submit_kubernetes(job, launcher)


# ---------------------------------------------------------------------------------------------
# Jobs running in this process, so that a cancelled or crashed flow run can stop them.

_running: dict[int, tuple[RunningJob, float]] = {}
_running_lock = threading.Lock()
# Set once the process stops its jobs: a task retry racing the shutdown must not start a new one.
_stopping = threading.Event()


@contextlib.contextmanager
def registered(job: RunningJob, grace_s: float) -> Iterator[RunningJob]:
    with _running_lock:
        _running[id(job)] = (job, grace_s)
    try:
        yield job
    finally:
        with _running_lock:
            _running.pop(id(job), None)


def stop_running_jobs(*_hook_args: Any) -> int:
    """Stop every job started by this process (usable as a flow ``on_cancellation``/``on_crashed`` hook)."""
    _stopping.set()
    with _running_lock:
        jobs = list(_running.values())
    for job, grace_s in jobs:
        job.stop(grace_s)
    return len(jobs)


@contextlib.contextmanager
def jobs_stopped_on_exit() -> Iterator[None]:
    """Stop this process's jobs when the block is left by an exception or a signal.

    For a flow that follows its job from a task thread: when the flow run is cancelled, Prefect raises
    TerminationSignal in the flow's own thread, and a runner-owned cancellation runs the flow's
    ``on_cancellation`` hooks in the runner's process, not this one. This block is what reaches the job.
    """
    _stopping.clear()  # a new flow run in this process may start jobs again
    try:
        yield
    except BaseException:
        stop_running_jobs()
        raise


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
) -> int:
    """Stream ``job``'s lines to ``log`` and its records to ``on_record``; its exit code.

    Whatever ends the following early (an error, KeyboardInterrupt, Prefect's TerminationSignal when
    the flow run is cancelled) stops the job first: a run never outlives the task following it.
    """
    with registered(job, grace_s):
        try:
            for line in job.lines():
                log.info(line)
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
) -> TrainResult:
    """Submit ``job`` through ``launcher``, follow it to the end; raise TrainingFailed if it failed."""
    if not job.config_path.exists():
        raise FileNotFoundError(f"{job.config_path} missing: write the run config first (write_run_config)")
    progress = Progress(job.total_steps, publish_progress or (lambda percent, description: None))
    seen: dict[str, Any] = {"first_step": None, "done": None}

    def handle(kind: str, record: dict[str, Any]) -> None:
        if kind == "METRIC" and "step" in record:
            if seen["first_step"] is None:
                seen["first_step"] = int(record["step"])
            progress.observe(record)
        if kind == "EVENT" and record.get("event") == "done":
            seen["done"] = record
        if on_record is not None:
            on_record(kind, record)

    if _stopping.is_set():
        raise RuntimeError("this process is stopping its training jobs (flow run cancelled or crashed)")
    running = submit(job, launcher)
    log.info("submitted %s", running.description)
    tail: list[str] = []
    code = follow(running, launcher.stop_grace_s, log, handle, tail)
    progress.flush()
    if code != 0:
        last = "\n".join(tail)
        raise TrainingFailed(f"{running.description} exited with {code}; last lines:\n{last}")
    return TrainResult(
        run_name=job.run_name,
        run_dir=job.run_dir,
        checkpoint_dir=job.checkpoint_dir,
        exit_code=code,
        last_step=progress.step,
        last_loss=progress.loss,
        first_step=seen["first_step"],
        done=seen["done"],
    )


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


def mlflow_run_for(
    tracking_uri: str, experiment: str, run_name: str, params: dict[str, str]
) -> tuple[str, str]:
    """(experiment id, run id) of the MLflow run named ``run_name``: the existing one, so that a re-run
    of the same training run continues its MLflow run as it continues its checkpoints, or a new one
    holding ``params``."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    quoted = run_name.replace("'", "\\'")
    runs = client.search_runs(
        [experiment_id], filter_string=f"attributes.run_name = '{quoted}'", max_results=1
    )
    if runs:
        return experiment_id, runs[0].info.run_id
    run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
    items = [Param(key, value) for key, value in sorted(params.items())]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[start : start + 100])
    return experiment_id, run_id


def mlflow_run_url(ui_url: str | None, tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page: on ``ui_url``, else on the tracking server, else on a local ``mlflow ui``."""
    base = ui_url or (
        tracking_uri if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    )
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


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
    with concurrency(name, occupy=occupy):
        log.info("holding %d %s slots", occupy, name)
        yield


def artifact_key(run_name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"train-{run_name}".lower()).strip("-")


class ProgressArtifact:
    """A Prefect progress artifact for the run, created on the first report and then updated."""

    def __init__(self, key: str):
        self.key = key
        self.artifact_id = None

    def __call__(self, percent: float, description: str) -> None:
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(percent, key=self.key, description=description)
        else:
            update_progress_artifact(self.artifact_id, percent, description=description)


@task(name="train", cache_policy=NO_CACHE, retry_delay_seconds=5)
def train(job: TrainJob, launcher: Launcher) -> TrainResult:
    """Run the job through the launcher on held devices, streaming its log and progress to Prefect.

    A retry (``train.with_options(retries=n)``) starts the same run directory again: the trainer
    resumes from its last complete checkpoint.
    """
    log = get_run_logger()
    with holding_devices(launcher, log):
        return run_training(job, launcher, log, publish_progress=ProgressArtifact(artifact_key(job.run_name)))
