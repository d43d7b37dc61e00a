"""The Slurm launcher on a real Slurm: a single-node cluster on loopback (infra/slurm/local-cluster.sh,
which installs Debian's slurm-wlm and munge when missing) runs the pretrain flow's training job as
2 CPU ranks: followed (log lines, progress), lost mid-run and resumed by the task's retry from its
last checkpoint, cancelled with the flow run (no rank survives), and a controller that cannot be
reached is one clear error. Needs root and apt-get (or Slurm already installed); skipped otherwise."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL

from flows.pretrain import pretrain
from model.run_dir import RunDir
from tasks import launchers as la
from tasks.prefect_artifacts import artifact_key
from tests.conftest import free_port
from tests.test_pretrain_flow import CANCEL_SCRIPT, packed_dir, prefect_api, small_run, trainer_ranks

__all__ = ["packed_dir", "prefect_api"]  # fixtures shared with the local-launcher flow tests

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "infra" / "slurm" / "local-cluster.sh"
CPU2 = la.SlurmLauncher(
    device="cpu",
    gpus_per_node=2,
    cpus_per_node=2,
    mem="2G",
    time_limit="0:10:00",
    poll_s=0.5,
    stop_grace_s=20,
)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[None]:
    """The loopback cluster, started for the session (and stopped after, unless it was already up)."""
    if os.geteuid() != 0:
        pytest.skip("a local Slurm cluster needs root (slurmctld/slurmd run as SlurmUser=root)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and there is no apt-get to install slurm-wlm and munge")
    was_up = subprocess.run([CLUSTER, "status"], capture_output=True).returncode == 0
    started = subprocess.run([CLUSTER, "start"], capture_output=True, text=True, timeout=900)
    if started.returncode == 3:
        pytest.skip(started.stderr.strip().splitlines()[-1])
    assert started.returncode == 0, started.stderr
    yield
    if not was_up:
        subprocess.run([CLUSTER, "stop"], capture_output=True, timeout=60)


def slurm_jobs(run_dir: RunDir) -> list[tuple[str, str]]:
    """(job id, state) of every job of the run the controller knows, oldest first (by its script:
    the same run name in an earlier test session is another job)."""
    out = subprocess.run(
        ["squeue", "-h", "--states=all", "-o", "%i %T %o"], capture_output=True, text=True, check=True
    ).stdout
    script = str(run_dir.root / "train.sbatch")
    jobs = [line.split(" ", 2) for line in out.splitlines()]
    return sorted(((i, state) for i, state, command in jobs if command == script), key=lambda j: int(j[0]))


def events(run_dir: RunDir) -> list[dict]:
    lines = run_dir.log_path.read_text().splitlines()
    return [json.loads(line[6:]) for line in lines if line.startswith("EVENT ")]


def cancel_job_after(checkpoint: Path, run_dir: RunDir, cancelled: list[str]) -> threading.Thread:
    """scancel the run's Slurm job once ``checkpoint`` is complete: a preempted or lost job."""

    def watch() -> None:
        deadline = time.monotonic() + 600  # generous: a loaded machine starts torch slowly
        while time.monotonic() < deadline and not (checkpoint / "COMPLETE").exists():
            time.sleep(0.05)
        running = [job_id for job_id, state in slurm_jobs(run_dir) if state == "RUNNING"]
        if running:
            subprocess.run(["scancel", running[0]], check=True)
            cancelled.append(running[0])

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_the_flow_follows_a_slurm_job_and_its_retry_resumes_from_the_last_checkpoint(
    slurm_cluster, packed_dir, tmp_path, prefect_api, monkeypatch
):
    params = small_run(packed_dir, tmp_path, "slurm-cpu", max_steps=20).model_copy(update={"launcher": CPU2})
    # As a deployment has it: MLflow's registry resolves logged models through the global tracking URI.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", params.mlflow_tracking_uri)
    run_dir = RunDir.of(params.runs_root, params.run_name)
    cancelled: list[str] = []
    watcher = cancel_job_after(run_dir.checkpoint_dir / "step-10", run_dir, cancelled)
    result = pretrain(params)
    watcher.join(5)

    assert cancelled, "the job ended before it could be cancelled"
    jobs = slurm_jobs(run_dir)
    assert [state for _, state in jobs] == ["CANCELLED", "COMPLETED"], jobs
    assert jobs[0][0] == cancelled[0]
    starts = [e for e in events(run_dir) if e["event"] in ("start", "resumed")]
    assert [e["event"] for e in starts] == ["start", "resumed"]
    resumed_at = starts[1]["step"]
    assert resumed_at >= 10 and starts[1]["checkpoint"].endswith(f"step-{resumed_at}")
    # The task followed the second job from where it resumed to the end, through its log.
    assert result.train.first_step > resumed_at
    assert result.train.last_step == 20 and result.train.done["step"] == 20
    assert (run_dir.root / "train.sbatch").read_text() == la.render_sbatch(
        la.TrainJob(run_dir=run_dir, total_steps=20), CPU2
    )
    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_latest_artifacts()}
    progress = artifacts[artifact_key("train", params.run_name)]
    assert float(progress.data) == 100.0 and progress.description.startswith("step 20/20, loss ")
    assert result.evals and result.evals[-1].step == 20


def test_terminating_the_flow_run_cancels_the_slurm_job_and_every_rank(
    slurm_cluster, packed_dir, tmp_path, prefect_api
):
    params = small_run(
        packed_dir, tmp_path, "slurm-cancel", max_steps=100_000, checkpoint_interval=1000
    ).model_copy(update={"launcher": CPU2})
    run_dir = RunDir.of(params.runs_root, params.run_name)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
    flow_process = subprocess.Popen(
        [sys.executable, "-c", CANCEL_SCRIPT, params.model_dump_json()],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
        run_dir.log_path.exists() and "METRIC" in run_dir.log_path.read_text()
    ):
        assert flow_process.poll() is None, "the flow process ended early"
        time.sleep(0.2)
    ranks = trainer_ranks(run_dir.config_path)
    assert len(ranks) == 2, "two trainer ranks run under slurmd"
    assert [state for _, state in slurm_jobs(run_dir)] == ["RUNNING"]

    flow_process.send_signal(signal.SIGTERM)
    flow_process.wait(timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (trainer_ranks(run_dir.config_path) or _torchruns(run_dir)):
        time.sleep(0.2)
    assert not trainer_ranks(run_dir.config_path) and not _torchruns(run_dir)
    assert all(p.status() == psutil.STATUS_ZOMBIE for p in ranks if p.is_running())
    [(_, state)] = slurm_jobs(run_dir)
    assert state in ("CANCELLED", "FAILED"), state


def _torchruns(run_dir: RunDir) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "torch.distributed.run" in cmdline and str(run_dir.config_path) in cmdline:
            found.append(proc)
    return found


def test_an_unreachable_controller_is_one_line_naming_it(slurm_cluster, tmp_path, monkeypatch):
    conf = Path("/etc/slurm/slurm.conf").read_text()
    port = free_port()  # nothing listens there
    (tmp_path / "slurm.conf").write_text(f"{conf}SlurmctldPort={port}\nMessageTimeout=2\n")
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "slurm.conf"))
    job = la.TrainJob(run_dir=RunDir.of(tmp_path / "runs", "unreachable"), total_steps=1)
    la.write_run_config(job, {})
    started = time.monotonic()
    with pytest.raises(RuntimeError) as failure:
        la.submit(job, CPU2)
    assert time.monotonic() - started < 60
    message = str(failure.value)
    assert message.startswith("sbatch ") and "Unable to contact slurm controller" in message
    assert len(message.splitlines()) == 1, message


def test_dask_jobqueue_workers_are_slurm_jobs(slurm_cluster, tmp_path):
    """infra/dask/slurm_cluster.py on the real Slurm: a worker job starts, computes, and is cancelled
    when the cluster closes."""
    from distributed import Client

    from infra.dask.slurm_cluster import make_cluster

    cluster = make_cluster(
        cores=1, processes=1, memory="1GiB", walltime="00:10:00", job_extra_directives=[],
        job_script_prologue=[f"cd {REPO}"], python=sys.executable, local_directory=str(tmp_path),
        log_directory=str(tmp_path / "logs"), death_timeout=30,
        scheduler_options={"host": "127.0.0.1", "port": 0, "dashboard_address": ":0"},
    )  # fmt: skip
    with cluster, Client(cluster) as client:
        cluster.scale(jobs=1)
        client.wait_for_workers(1, timeout=120)
        [job_id] = client.run(lambda: os.environ["SLURM_JOB_ID"]).values()
        assert client.submit(sum, [1, 2, 3]).result() == 6
        assert _job_state(job_id) == "RUNNING"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _job_state(job_id) in ("RUNNING", "COMPLETING"):
        time.sleep(0.5)
    assert _job_state(job_id) in ("CANCELLED", "COMPLETED")


def _job_state(job_id: str) -> str:
    return subprocess.run(
        ["squeue", "-h", "--states=all", "-j", job_id, "-o", "%T"], capture_output=True, text=True, check=True
    ).stdout.strip()
