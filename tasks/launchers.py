"""Launching training jobs: where ``model.trainer`` runs, how it is started, and how it is stopped.

A launcher starts ``model.trainer`` under torchrun somewhere and hands back a ``RunningJob``: its
log lines, its exit code, and a way to stop it. ``local`` runs torchrun as a subprocess in its own
process group (stopping the run stops the group), ``slurm`` submits an sbatch script rendered from
``infra/slurm/``, ``kubernetes`` applies a Job or PyTorchJob manifest rendered from
``infra/k8s/training/``. The launcher configs are pydantic models with a ``kind`` discriminator:
they are the launcher part of the Prefect run form.

A job runs in its run directory (model/run_dir.py), named after the run, never after the task run:
a Prefect retry starts the same run again and the trainer resumes from its latest complete
checkpoint instead of step 0. Every job this process started is registered, so that a cancelled or
crashed flow run stops them all (``jobs_stopped_on_exit``, ``stop_running_jobs``).
Following a job (its records, progress, the Prefect task) is tasks/training_job.py.
"""

from __future__ import annotations

import contextlib
import json
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
from pydantic import BaseModel, Field

from model.run_dir import RunDir
from tasks.atomic import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
TRAINER_ENTRYPOINT = ["-m", "model.trainer"]

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
    gpus_per_node: int = Field(8, ge=1, description="GPUs per node, one rank each (device cpu: CPU ranks).")
    device: Literal["cuda", "cpu"] = Field(
        "cuda", description="cuda: --gpus-per-node, NCCL; cpu: no GPU requested, gloo (CPU-only nodes)."
    )
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
    run_dir: RunDir
    total_steps: int = Field(ge=1, description="Steps the run is configured for (progress and ETA).")
    entrypoint: list[str] = Field(default_factory=lambda: list(TRAINER_ENTRYPOINT))

    @property
    def run_name(self) -> str:
        return self.run_dir.name

    def trainer_args(self) -> list[str]:
        """What follows torchrun's own options: the trainer module (or script) and its config."""
        return [*self.entrypoint, "--config", str(self.run_dir.config_path)]


def write_run_config(job: TrainJob, config: dict[str, Any]) -> Path:
    """Write the trainer's config for ``job`` atomically (sorted keys: same config, same bytes)."""
    atomic_write_json(job.run_dir.config_path, config)
    return job.run_dir.config_path


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
    return LocalJob(local_command(job, launcher), local_env(launcher), REPO, job.run_dir.log_path)


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
            log_path=str(job.run_dir.log_path),
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
    accounting = subprocess.run(
        ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"], capture_output=True, text=True, check=False
    )
    if accounting.returncode == 0:
        lines = accounting.stdout.split("\n")
        # Not yet in the accounting database reads as pending; "CANCELLED by 123" -> "CANCELLED".
        state = lines[0].split()[0].rstrip("+") if lines[0].strip() else "PENDING"
    else:
        # No accounting (a cluster without slurmdbd, e.g. infra/slurm/local-cluster.sh): the
        # controller keeps a finished job's state for MinJobAge.
        state = _run(["squeue", "-h", "-j", job_id, "--states=all", "-o", "%T"]).strip() or "PENDING"
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
    script = job.run_dir.root / "train.sbatch"
    atomic_write_text(script, render_sbatch(job, launcher))
    # The log is appended to by every attempt of the run: follow only what this attempt writes.
    log_start = job.run_dir.log_path.stat().st_size if job.run_dir.log_path.exists() else 0
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
        lambda: tail_file(job.run_dir.log_path, lambda: poll() is not None, launcher.poll_s, log_start),
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
    if not job.run_dir.root.is_relative_to(mount):
        raise ValueError(
            f"run dir {job.run_dir.root} is not under the volume mount {mount}: pods would not see it"
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
    atomic_write_text(job.run_dir.root / f"{k8s_resource(launcher)}.yaml", manifest)
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
    """Start ``job`` through ``launcher`` (its run config written first: ``write_run_config``)."""
    if _stopping.is_set():
        raise RuntimeError("this process is stopping its training jobs (flow run cancelled or crashed)")
    if not job.run_dir.config_path.exists():
        raise FileNotFoundError(f"{job.run_dir.config_path} missing: write the run config first")
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
