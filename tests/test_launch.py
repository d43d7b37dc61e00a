"""Launchers: the local one runs real torchrun jobs (a small fake trainer script that speaks the
METRIC/EVENT protocol and checkpoints like model.trainer); Slurm and Kubernetes are checked by
rendering their manifests (and by the clients' dry-run where a cluster is reachable)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.exceptions import TerminationSignal
from pydantic import TypeAdapter

from model.run_dir import RunDir
from tasks import launchers as la
from tasks import training_job as tj
from tasks.prefect_artifacts import artifact_key

FAKE_TRAINER = r"""
import json, os, pathlib, subprocess, sys, time
config = json.loads(pathlib.Path(sys.argv[sys.argv.index("--config") + 1]).read_text())
rank = int(os.environ["RANK"])
ckpt = pathlib.Path(config["checkpoint_dir"])
complete = [int(p.name[5:]) for p in ckpt.glob("step-*") if (p / "COMPLETE").exists()]
start = max(complete, default=0)
if config.get("stamps"):
    with open(config["stamps"], "a") as f:
        f.write(f"start {rank} {time.time()}\n")
if config.get("spawn_child"):  # a grandchild of torchrun, e.g. a data-loader worker
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(f"rank {rank} starting at step {start}", flush=True)
for step in range(start + 1, config["max_steps"] + 1):
    time.sleep(config["step_s"])
    if rank == 0:
        print("METRIC " + json.dumps({"step": step, "loss": 10.0 / step, "tokens_per_s": 1e3}), flush=True)
        if step % config["checkpoint_interval"] == 0:
            (ckpt / f"step-{step}").mkdir(parents=True, exist_ok=True)
            (ckpt / f"step-{step}" / "COMPLETE").write_text("{}")
    if step == config.get("crash_at_step") and start == 0:
        print(f"rank {rank} crashing at step {step}", flush=True)
        sys.exit(3)
if config.get("stamps"):
    with open(config["stamps"], "a") as f:
        f.write(f"end {rank} {time.time()}\n")
if rank == 0:
    print("EVENT " + json.dumps({"event": "done", "step": config["max_steps"]}), flush=True)
"""

CPU2 = la.LocalLauncher(nproc_per_node=2, device="cpu", stop_grace_s=5)


@pytest.fixture(scope="module")
def prefect_api(prefect_harness):
    """The session's one Prefect test server (tests/conftest.py)."""
    return None


def fake_job(tmp_path: Path, name: str, **config) -> la.TrainJob:
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    job = la.TrainJob(
        run_dir=RunDir.of(tmp_path / "runs", name),
        total_steps=config.setdefault("max_steps", 6),
        entrypoint=[str(script)],
    )
    config.setdefault("step_s", 0.05)
    config.setdefault("checkpoint_interval", 2)
    la.write_run_config(job, {"checkpoint_dir": str(job.run_dir.checkpoint_dir), **config})
    return job


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def capture_log() -> tuple[logging.Logger, Lines]:
    log = logging.getLogger(f"test-launch-{time.monotonic_ns()}")
    log.setLevel(logging.INFO)
    handler = Lines()
    log.addHandler(handler)
    return log, handler


# ---------------------------------------------------------------------------------------------
# Parsing and progress


def test_parse_record_reads_trainer_lines_only():
    assert tj.parse_record('METRIC {"step": 3, "loss": 2.5}') == ("METRIC", {"step": 3, "loss": 2.5})
    assert tj.parse_record('[rank0]: EVENT {"event": "done"}') == ("EVENT", {"event": "done"})
    assert tj.parse_record("METRIC {not json}") is None
    assert tj.parse_record("METRIC [1, 2]") is None
    assert tj.parse_record("loss went METRIC {} nowhere") is None
    assert tj.parse_record("W1121 torch warning") is None


def test_progress_reports_step_loss_and_eta_throttled():
    now = [100.0]
    published: list[tuple[float, str]] = []
    progress = tj.Progress(100, lambda p, d: published.append((p, d)), every_s=5.0, clock=lambda: now[0])
    progress.observe({"step": 40, "loss": 3.0})  # resumed run: ETA counts from here
    assert published == [(40.0, "step 40/100, loss 3.0000")]
    now[0] += 2.0
    progress.observe({"step": 50, "loss": 2.5})
    assert len(published) == 1  # throttled
    now[0] += 4.0
    progress.observe({"step": 60, "loss": 2.0})
    # 20 steps in 6 s -> 40 steps left take 12 s
    assert published[-1] == (60.0, "step 60/100, loss 2.0000, ETA 0m12s")
    progress.observe({"event": "no step"})
    assert progress.step == 60


# ---------------------------------------------------------------------------------------------
# The local launcher


def test_local_launcher_runs_two_ranks_and_streams_lines(tmp_path):
    job = fake_job(tmp_path, "fake-ok", max_steps=6)
    log, lines = capture_log()
    published: list[tuple[float, str]] = []
    records: list[tuple[str, dict]] = []
    result = tj.run_training(
        job,
        CPU2,
        log,
        on_record=lambda k, r: records.append((k, r)),
        publish_progress=lambda p, d: published.append((p, d)),
    )
    assert result.exit_code == 0 and result.first_step == 1 and result.last_step == 6
    assert result.done == {"event": "done", "step": 6}
    assert "rank 0 starting at step 0" in lines.lines
    assert any(line.startswith("rank 1 starting") for line in lines.lines)  # both ranks' output comes through
    assert [r["step"] for k, r in records if k == "METRIC"] == [1, 2, 3, 4, 5, 6]
    assert published[-1][0] == 100.0 and published[-1][1].startswith("step 6/6")
    assert "rank 1 starting" in job.run_dir.log_path.read_text()
    assert sorted(p.name for p in job.run_dir.checkpoint_dir.iterdir()) == ["step-2", "step-4", "step-6"]


def test_failed_job_raises_with_its_last_lines(tmp_path):
    job = fake_job(tmp_path, "fake-crash", max_steps=6, crash_at_step=3)
    log, _ = capture_log()
    with pytest.raises(tj.TrainingFailed, match="crashing at step 3"):
        tj.run_training(job, CPU2, log)
    assert la._running == {}  # nothing left registered for the cancellation hook


def test_missing_run_config_is_a_clear_error(tmp_path):
    job = la.TrainJob(run_dir=RunDir(tmp_path / "nothing"), total_steps=1)
    with pytest.raises(FileNotFoundError, match=r"run\.json missing"):
        tj.run_training(job, CPU2, logging.getLogger("x"))


def _descendants(pid: int) -> list[psutil.Process]:
    return [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]


def _all_gone(processes: list[psutil.Process]) -> bool:
    alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    return not alive


def test_termination_signal_stops_the_whole_process_group(tmp_path):
    """What a cancelled flow run does to its process: SIGTERM, which Prefect turns into TerminationSignal."""
    job = fake_job(tmp_path, "fake-cancel", max_steps=10_000, step_s=0.1, spawn_child=True)
    log, _ = capture_log()
    running = la.submit_local(job, CPU2)
    seen: list[psutil.Process] = []

    def on_record(kind: str, record: dict) -> None:
        if not seen and record.get("step", 0) >= 3:
            # torchrun, both ranks and each rank's child are up by now
            seen.extend(_descendants(running.process.pid))
            os.kill(os.getpid(), signal.SIGTERM)

    def raise_termination(signum, frame):
        raise TerminationSignal(signal=signum)

    previous = signal.signal(signal.SIGTERM, raise_termination)
    try:
        with pytest.raises(TerminationSignal):
            tj.follow(running, grace_s=5, log=log, on_record=on_record)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert len(seen) == 5  # torchrun + 2 ranks + 2 grandchildren
    assert _all_gone(seen), [p for p in seen if p.is_running()]
    assert running.process.returncode is not None


def test_stop_running_jobs_hook_stops_jobs_followed_in_other_threads(tmp_path):
    """A flow's on_cancellation/on_crashed hook runs in the flow's thread while a task thread follows."""
    job = fake_job(tmp_path, "fake-hook", max_steps=10_000, step_s=0.1)
    log, lines = capture_log()
    outcome: list[BaseException | int] = []

    def follow() -> None:
        try:
            outcome.append(
                tj.follow(la.submit_local(job, CPU2), grace_s=5, log=log, on_record=lambda k, r: None)
            )
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=follow)
    thread.start()
    deadline = time.monotonic() + 60
    while not any(line.startswith("METRIC") for line in lines.lines) and time.monotonic() < deadline:
        time.sleep(0.1)
    ((running, _),) = la._running.values()
    pids = _descendants(running.process.pid)
    try:
        assert la.stop_running_jobs() == 1
    finally:
        la._stopping.clear()  # this test process goes on starting jobs
    thread.join(30)
    assert not thread.is_alive() and outcome and outcome[0] != 0
    assert _all_gone(pids)


# ---------------------------------------------------------------------------------------------
# Through Prefect: progress artifact, retry resumes, device slots


@pytest.mark.slow
def test_train_task_reports_progress_and_a_retry_resumes_from_the_checkpoint(tmp_path, prefect_api):
    job = fake_job(tmp_path, "fake-retry", max_steps=8, crash_at_step=5)

    @flow
    def run() -> tj.TrainResult:
        return tj.train.with_options(retries=1, retry_delay_seconds=0)(job, CPU2)

    result = run()
    # The first attempt crashed at step 5 after checkpointing step 4; the retry went on from there.
    assert result.first_step == 5 and result.last_step == 8 and result.done is not None
    log = job.run_dir.log_path.read_text()
    assert "rank 0 starting at step 0" in log and "rank 0 starting at step 4" in log

    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
        progress = [a for a in artifact if a.key == artifact_key("train", "fake-retry")]
    assert progress and progress[0].type == "progress" and float(progress[0].data) == 100.0
    assert "step 8/8" in progress[0].description


@pytest.mark.slow
def test_two_runs_never_share_the_device_slots(tmp_path, prefect_api):
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name("cpu", 2)  # this machine: two cores
    stamps = tmp_path / "stamps.txt"
    jobs = [
        fake_job(tmp_path, f"fake-slot-{i}", max_steps=10, step_s=0.1, stamps=str(stamps)) for i in range(2)
    ]

    @flow
    def two_runs() -> list[tj.TrainResult]:
        futures = [tj.train.submit(job, CPU2) for job in jobs]
        return [f.result() for f in futures]

    assert [r.last_step for r in two_runs()] == [10, 10]
    events = [line.split() for line in stamps.read_text().splitlines()]
    # Sorted by time, the four starts and ends of the two runs' ranks never interleave.
    kinds = [kind for kind, _, _ in sorted(events, key=lambda e: float(e[2]))]
    assert kinds == ["start", "start", "end", "end", "start", "start", "end", "end"], events


def test_a_run_larger_than_the_limit_fails_instead_of_waiting_forever(prefect_api):
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name("cpu", 2)
    with (
        pytest.raises(ValueError, match="needs 3 cpu slots"),
        tj.holding_devices(la.LocalLauncher(nproc_per_node=3, device="cpu"), logging.getLogger("x")),
    ):
        pass


def test_ensure_concurrency_limit_creates_once_and_keeps_operator_setting(prefect_api):
    assert tj.ensure_concurrency_limit("gpu-test-limit", 4) == 4
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name("gpu-test-limit", 2)
    assert tj.ensure_concurrency_limit("gpu-test-limit", 8) == 2


# ---------------------------------------------------------------------------------------------
# Launcher configs (the UI form) and the cluster launchers' manifests

RUN = la.TrainJob(run_dir=RunDir(Path("/mnt/pretrain/runs/Web_1B.v2")), total_steps=1000)


def test_launcher_form_is_a_discriminated_union():
    adapter = TypeAdapter(la.Launcher)
    assert isinstance(adapter.validate_python({"kind": "local", "nproc_per_node": 2}), la.LocalLauncher)
    assert isinstance(adapter.validate_python({"kind": "slurm", "nodes": 4}), la.SlurmLauncher)
    k8s = adapter.validate_python({"kind": "kubernetes", "image": "img:1", "volume_claim": "pvc"})
    assert isinstance(k8s, la.KubernetesLauncher)
    schema = adapter.json_schema()
    assert schema["discriminator"]["propertyName"] == "kind"
    with pytest.raises(ValueError):
        adapter.validate_python({"kind": "ssh"})


def test_local_command_is_torchrun_standalone_with_the_trainer_module():
    cmd = la.local_command(RUN, la.LocalLauncher(nproc_per_node=8))
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert "--nproc-per-node=8" in cmd
    assert cmd[-4:] == ["-m", "model.trainer", "--config", "/mnt/pretrain/runs/Web_1B.v2/run.json"]
    assert la.local_env(la.LocalLauncher(device="cpu"))["CUDA_VISIBLE_DEVICES"] == ""


def sbatch_directives(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", script, flags=re.M))


def test_slurm_script_renders_resources_log_and_command(tmp_path):
    launcher = la.SlurmLauncher(
        nodes=4, gpus_per_node=8, partition="h100", account="lm", workdir="/shared/pf"
    )
    script = la.render_sbatch(RUN, launcher)
    directives = sbatch_directives(script)
    assert (
        directives["nodes"] == "4"
        and directives["gpus-per-node"] == "8"
        and directives["ntasks-per-node"] == "1"
    )
    assert directives["partition"] == "h100" and directives["account"] == "lm"
    assert directives["output"] == "/mnt/pretrain/runs/Web_1B.v2/train.log"
    assert directives["open-mode"] == "append"  # a requeued or retried run keeps one log
    assert "--nnodes=4" in script and "--nproc-per-node=8" in script and "--rdzv-backend=c10d" in script
    assert "-m model.trainer --config /mnt/pretrain/runs/Web_1B.v2/run.json" in script
    assert "cd /shared/pf\n" in script
    assert "partition" not in sbatch_directives(la.render_sbatch(RUN, la.SlurmLauncher()))
    path = tmp_path / "train.sbatch"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)  # the script is valid shell


def test_slurm_script_quotes_paths(tmp_path):
    odd = la.TrainJob(run_dir=RunDir(tmp_path / "with space" / "r1"), total_steps=1)
    script = la.render_sbatch(odd, la.SlurmLauncher(workdir="/a dir/pf"))
    assert "cd '/a dir/pf'" in script and f"--config '{tmp_path}/with space/r1/run.json'" in script


FAKE_SBATCH = r"""#!/bin/bash
# Stands in for sbatch: "runs" the job by appending trainer lines to its --output log.
script="${@: -1}"
log=$(sed -n 's/^#SBATCH --output=//p' "$script")
bin=$(dirname "$0")
echo RUNNING > "$bin/state"
(
  for step in 1 2 3; do echo "METRIC {\"step\": $step, \"loss\": 2.5}" >> "$log"; sleep 0.1; done
  echo "EVENT {\"event\": \"done\", \"step\": 3}" >> "$log"
  echo "$FINAL_STATE" > "$bin/state"
) > /dev/null 2>&1 &
echo "4242;cluster"
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "sbatch": FAKE_SBATCH,
        "sacct": '#!/bin/bash\ncat "$(dirname "$0")/state"\n',
        "scancel": '#!/bin/bash\necho "$@" >> "$(dirname "$0")/scancel.calls"\necho CANCELLED > "$(dirname "$0")/state"\n',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def test_slurm_launcher_follows_the_job_log_and_state(tmp_path, fake_slurm, monkeypatch):
    monkeypatch.setenv("FINAL_STATE", "COMPLETED")
    job = fake_job(tmp_path, "slurm-run", max_steps=3)
    job.run_dir.log_path.write_text('METRIC {"step": 99, "loss": 9.0}\n')  # an earlier attempt's lines
    log, lines = capture_log()
    result = tj.run_training(job, la.SlurmLauncher(poll_s=0.05), log)
    assert (result.first_step, result.last_step, result.done["step"]) == (1, 3, 3)
    assert "submitted slurm job 4242" in lines.lines[0]
    assert (job.run_dir.root / "train.sbatch").read_text() == la.render_sbatch(
        job, la.SlurmLauncher(poll_s=0.05)
    )

    monkeypatch.setenv("FINAL_STATE", "NODE_FAIL")
    with pytest.raises(tj.TrainingFailed, match="slurm job 4242"):
        tj.run_training(job, la.SlurmLauncher(poll_s=0.05), log)


def test_slurm_job_stop_signals_then_cancels(tmp_path, fake_slurm, monkeypatch):
    monkeypatch.setenv("FINAL_STATE", "RUNNING")  # never ends by itself
    job = fake_job(tmp_path, "slurm-stop", max_steps=3)
    running = la.submit_slurm(job, la.SlurmLauncher(poll_s=0.05))
    running.stop(grace_s=1)
    calls = (fake_slurm / "scancel.calls").read_text().splitlines()
    assert calls[0] == "--signal=TERM --full 4242" and calls[-1] == "4242"
    assert running.wait() == 1


K8S = la.KubernetesLauncher(image="registry.example/pf:1.0", volume_claim="pretrain-data", gpus_per_node=8)


def manifest_docs(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def container_of(doc: dict) -> dict:
    if doc["kind"] == "Job":
        return doc["spec"]["template"]["spec"]["containers"][0]
    return doc["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]


def test_k8s_single_node_is_a_job_with_gpus_volume_and_command():
    (doc,) = manifest_docs(la.render_k8s(RUN, K8S))
    assert doc["apiVersion"] == "batch/v1" and doc["kind"] == "Job"
    assert doc["metadata"]["name"] == "train-web-1b-v2"
    assert doc["spec"]["backoffLimit"] == 0
    pod = doc["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    container = container_of(doc)
    assert container["image"] == "registry.example/pf:1.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["command"][:5] == [
        "python",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=8",
    ]
    assert container["command"][-4:] == [
        "-m",
        "model.trainer",
        "--config",
        "/mnt/pretrain/runs/Web_1B.v2/run.json",
    ]
    assert {"name": "PRETRAIN_RUN_NAME", "value": "Web_1B.v2"} in container["env"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"data": "/mnt/pretrain", "shm": "/dev/shm"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "pretrain-data"
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory"


def test_k8s_multi_node_is_a_pytorchjob_with_master_and_workers():
    (doc,) = manifest_docs(la.render_k8s(RUN, K8S.model_copy(update={"nodes": 4})))
    assert doc["apiVersion"] == "kubeflow.org/v1" and doc["kind"] == "PyTorchJob"
    assert doc["spec"]["nprocPerNode"] == "8"
    replicas = doc["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 3
    for role in ("Master", "Worker"):
        container = replicas[role]["template"]["spec"]["containers"][0]
        assert container["command"] == [
            "python", "-m", "torch.distributed.run", "-m", "model.trainer", "--config",
            "/mnt/pretrain/runs/Web_1B.v2/run.json",
        ]  # fmt: skip
        assert container["resources"]["requests"]["nvidia.com/gpu"] == 8


def test_k8s_refuses_a_run_dir_the_pods_cannot_see(tmp_path):
    job = la.TrainJob(run_dir=RunDir(tmp_path / "r"), total_steps=1)
    with pytest.raises(ValueError, match="not under the volume mount"):
        la.render_k8s(job, K8S)


def _cluster_reachable() -> bool:
    if shutil.which("kubectl") is None:
        return False
    probe = subprocess.run(["kubectl", "version", "--request-timeout=3s"], capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(
    not _cluster_reachable(),
    reason="kubectl --dry-run=client needs a reachable API server for discovery; none is configured here",
)
def test_k8s_job_passes_kubectl_client_dry_run(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(la.render_k8s(RUN, K8S))
    subprocess.run(["kubectl", "apply", "--dry-run=client", "-f", str(path)], check=True)
