"""The servers a training run talks to, killed (SIGKILL) and restarted while it trains (tiny model, one
CPU rank): a real ``mlflow server`` (no metric lost: model/tracking.py BufferedClient buffers and
retries), and a real Prefect server (the job carries on; the flow run ends Completed with its logs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

from model.config import MlflowConfig, TrainConfig
from model.run_dir import RunDir
from model.tracking import BufferedClient, log_batch
from tasks.launchers import TrainJob, local_env, write_run_config
from tests.conftest import free_port, migrated_prefect_db
from tests.test_run_health import tiny_packed

REPO = Path(__file__).resolve().parents[1]
STEPS = 60


@pytest.fixture(scope="module")
def packed(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_packed(corpus, tmp_path_factory.mktemp("faults-data"))


class FlakyClient:
    """Stands in for MlflowClient: down (a 500 after MLflow's own retries) while ``down`` is set;
    rejects metrics named ``bad`` with a 400."""

    def __init__(self) -> None:
        self.down = threading.Event()
        self.calls: list[tuple] = []

    def log_batch(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

        if self.down.is_set():
            raise MlflowException("connection refused", error_code=INTERNAL_ERROR)
        if any(m.key == "bad" for m in metrics):
            raise MlflowException("bad metric", error_code=INVALID_PARAMETER_VALUE)
        self.calls.append(("log_batch", [(m.key, m.step) for m in metrics]))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.calls.append(("log_text", text))

    def get_run(self, run_id: str) -> str:
        return f"run {run_id}"


def test_buffered_client_keeps_order_through_an_outage() -> None:
    flaky, said = FlakyClient(), []
    client = BufferedClient(flaky, max_pending=5, backoff_s=(0.01, 0.05), say=said.append)
    assert client.get_run("r") == "run r"  # reads go straight through
    log_batch(client, "r", metrics={"loss": 1.0}, step=1)
    assert client.flush(5)
    flaky.down.set()
    log_batch(client, "r", metrics={"loss": 0.9}, step=2)
    client.log_text("r", "a", "events.jsonl")
    log_batch(client, "r", metrics={"bad": 1.0}, step=3)
    client.log_text("r", "a\nb", "events.jsonl")  # replaces the waiting write of the same file
    log_batch(client, "r", metrics={"loss": 0.8}, step=4)
    assert not client.flush(0.2) and client.pending() >= 3  # nothing is lost, nothing blocks
    flaky.down.clear()
    assert client.flush(5)
    assert flaky.calls == [
        ("log_batch", [("loss", 1)]),
        ("log_batch", [("loss", 2)]),
        ("log_text", "a\nb"),
        ("log_batch", [("loss", 4)]),
    ]
    assert client.rejected == 1 and client.dropped == 0
    assert any("unreachable" in line for line in said) and any("back after" in line for line in said)
    # Bounded: past max_pending writes the oldest go.
    flaky.down.set()
    for step in range(5, 13):
        log_batch(client, "r", metrics={"loss": 0.1}, step=step)
    flaky.down.clear()
    assert client.flush(5)
    assert client.dropped >= 2 and [c[1][0][1] for c in flaky.calls[4:]][-5:] == list(range(8, 13))


class Server:
    """A server process group on loopback that can be SIGKILLed and started again on its port."""

    def __init__(self, argv: list[str], env: dict[str, str], health_url: str, log: Path) -> None:
        self.argv, self.env, self.health_url, self.log = argv, env, health_url, log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 240) -> float:
        """Start and wait until healthy; seconds it took."""
        t0 = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.log.parent, start_new_session=True,
            )  # fmt: skip
        while time.monotonic() - t0 < timeout:
            assert self.proc.poll() is None, f"server exited: {self.log.read_text()[-3000:]}"
            try:
                if httpx.get(self.health_url, timeout=5).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"not healthy in {timeout} s: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the whole group (the server and its workers), as a crash or OOM kill would."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[tuple[Server, str]]:
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    argv = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--artifacts-destination", str(tmp_path / "mlartifacts")]  # fmt: skip
    server = Server(argv, env, f"http://127.0.0.1:{port}/health", tmp_path / "mlflow-server.log")
    server.start()
    yield server, f"http://127.0.0.1:{port}"
    server.stop()


class Lines:
    """A process's output lines as they come, with when each came."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.lines = proc, []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait_for(self, found: Callable[[str], bool], timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not any(found(line) for _, line in self.lines):
            assert self.proc.poll() is None and time.monotonic() < deadline, "\n".join(self.text()[-40:])
            time.sleep(0.05)

    def text(self) -> list[str]:
        return [line for _, line in self.lines]

    def metric_steps(self, since: float = 0.0, until: float = float("inf")) -> list[int]:
        return [
            json.loads(line.split("METRIC ", 1)[1])["step"]
            for at, line in self.lines
            if "METRIC {" in line and since <= at <= until
        ]


def step_reached(step: int) -> Callable[[str], bool]:
    return lambda line: "METRIC {" in line and json.loads(line.split("METRIC ", 1)[1])["step"] >= step


def restart_at_step_5(server: Server, out: Lines) -> tuple[float, float]:
    """Kill the server once training reached step 5, start it again 3 s later: (killed, back) times."""
    out.wait_for(step_reached(5))
    server.kill()
    killed_at = time.monotonic()
    time.sleep(3)
    server.start()
    return killed_at, time.monotonic()


def tiny_run(packed: Path, root: Path, name: str, mlflow: MlflowConfig | None = None) -> TrainJob:
    job = TrainJob(run_dir=RunDir.of(root / "runs", name), total_steps=STEPS)
    config = TrainConfig(
        model="tiny",
        data_dir=packed,
        checkpoint_dir=job.run_dir.checkpoint_dir,
        micro_batch_size=4,
        max_steps=STEPS,
        log_interval=1,
        checkpoint_interval=20,
        optim={"warmup_steps": 2},
        mlflow=mlflow or MlflowConfig(),
    )
    write_run_config(job, config.model_dump(mode="json"))
    return job


def test_mlflow_server_killed_and_restarted_loses_no_metric(
    packed: Path, tmp_path: Path, mlflow_server: tuple[Server, str]
) -> None:
    server, uri = mlflow_server
    mlflow = MlflowConfig(tracking_uri=uri, run_name="faulty-mlflow", system_metrics_s=None)
    job = tiny_run(packed, tmp_path, "faulty-mlflow", mlflow)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "model.trainer", "--config", str(job.run_dir.config_path)]  # fmt: skip
    env = {**local_env_cpu(), "PYTHONUNBUFFERED": "1"}
    trainer = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = Lines(trainer)
    try:
        killed_at, back_at = restart_at_step_5(server, out)
        assert trainer.wait(timeout=300) == 0, "\n".join(out.text()[-40:])
    finally:
        if trainer.poll() is None:
            trainer.kill()
    out.thread.join(timeout=10)
    # Training went on while the server was away: its progress records kept coming.
    steps_away = out.metric_steps(killed_at, back_at)
    print(f"mlflow server away {back_at - killed_at:.1f} s; steps trained meanwhile: {len(steps_away)}")
    assert len(steps_away) >= 3, (killed_at, back_at, out.lines[-80:])
    text = "\n".join(out.text())
    assert "tracking server unreachable, buffering writes" in text
    assert "tracking server back after" in text
    assert "mlflow disabled" not in text

    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("pretrain").experiment_id])
    assert run.info.status == "FINISHED"
    for metric in ("loss", "tokens_per_s", "lr"):
        history = client.get_metric_history(run.info.run_id, metric)
        assert sorted(m.step for m in history) == list(range(1, STEPS + 1)), metric
    events_file = client.download_artifacts(run.info.run_id, "events.jsonl", str(tmp_path))
    events = [json.loads(line)["event"] for line in Path(events_file).read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "done"
    assert events.count("checkpoint") == STEPS // 20


def local_env_cpu() -> dict[str, str]:
    from tasks.launchers import LocalLauncher

    return local_env(LocalLauncher(nproc_per_node=1, device="cpu"))


FLOW_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    from prefect import flow

    from model.run_dir import RunDir
    from tasks.launchers import LocalLauncher, TrainJob
    from tasks.training_job import train


    @flow(name="server-fault-training")
    def training(run_dir: str, steps: int) -> int:
        job = TrainJob(run_dir=RunDir(Path(run_dir)), total_steps=steps)
        return train(job, LocalLauncher(nproc_per_node=1, device="cpu")).last_step


    print("last step", training(sys.argv[1], int(sys.argv[2])), flush=True)
    """
)


def api(url: str, path: str, body: dict) -> list:
    response = httpx.post(f"{url}/{path}", json=body, timeout=60)
    response.raise_for_status()
    return response.json()


def test_prefect_server_killed_and_restarted_the_run_completes(packed: Path, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    base = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
    }
    server_env = {
        **base,
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
        "PREFECT_UI_ENABLED": "false",
        # Leases of held concurrency slots on disk, not in memory: a restart keeps them, so the run's
        # `cpu` slot is released at its end instead of leaking.
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
    }
    argv = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server = Server(argv, server_env, f"{url}/health", tmp_path / "prefect-server.log")
    migrated_prefect_db(tmp_path / "prefect.db")  # start-up without a fresh database's migrations
    job = tiny_run(packed, tmp_path, "faulty-prefect")
    (tmp_path / "flow.py").write_text(FLOW_SCRIPT)
    # The client's retries span a slow restart (2 + 4 + ... + 256 s; default 5 retries: about 1 min).
    env = {**local_env_cpu(), **base, "PREFECT_API_URL": url, "PREFECT_CLIENT_MAX_RETRIES": "8"}
    try:
        server.start()
        runner = subprocess.Popen(
            [sys.executable, str(tmp_path / "flow.py"), str(job.run_dir.root), str(STEPS)],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        out = Lines(runner)
        try:
            killed_at, back_at = restart_at_step_5(server, out)
            assert runner.wait(timeout=300) == 0, "\n".join(out.text()[-60:])
        finally:
            if runner.poll() is None:
                runner.kill()
        out.thread.join(timeout=10)
        assert f"last step {STEPS}" in out.text()
        steps_away = out.metric_steps(killed_at, back_at)
        print(f"prefect server away {back_at - killed_at:.1f} s; steps trained meanwhile: {len(steps_away)}")

        [flow_run] = api(url, "flow_runs/filter", {"flows": {"name": {"any_": ["server-fault-training"]}}})
        assert flow_run["state"]["type"] == "COMPLETED", flow_run["state"]
        task_runs = api(url, "task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run["id"]]}}})
        assert [(t["name"].split("-")[0], t["state"]["type"]) for t in task_runs] == [("train", "COMPLETED")]
        logs = api(url, "logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run["id"]]}}, "limit": 200})
        messages = [log["message"] for log in logs]
        logged_steps = {
            json.loads(m.split("METRIC ", 1)[1])["step"] for m in messages if m.startswith("METRIC {")
        }
        assert logged_steps == set(range(1, STEPS + 1)), sorted(set(range(1, STEPS + 1)) - logged_steps)
        assert any(m.startswith('EVENT {"event": "done"') for m in messages)
    finally:
        server.stop()
