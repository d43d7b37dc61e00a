"""The data refresh on a real Dask cluster: a `dask scheduler` and two `dask worker` processes on
loopback, each worker with its own HOME and PREFECT_HOME as if on another machine. The cluster's
datasets are byte for byte the process pool's, the tasks ran on both workers, their results went to
the flow's shared result storage, and a re-run on the cluster is all cache hits."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed import Client
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

from tasks import dataset as ds
from tests.conftest import free_port
from tests.test_data_refresh_flow import _task_run_states

pytestmark = pytest.mark.slow

DASK = [sys.executable, "-m", "dask"]


def _params(crawl: Path, workdir: Path):
    from flows.data_refresh import DataRefreshParams

    return DataRefreshParams.model_validate(
        {
            "crawl": str(crawl),
            "snapshots": ["CC-MAIN-2026-40"],
            "kinds": ["warc", "wet"],
            "workdir": str(workdir),
            "max_files": 2,  # two shards per stage: both workers get one
            "ingest": {"max_records_per_file": 60},
            "tokenizer": {"vocab_size": 512},
            "pack": {"seq_len": 64},
            "mlflow_tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}",
        }
    )


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(scheduler address, the nodes' folder): a scheduler and two single-threaded worker processes."""
    root = tmp_path_factory.mktemp("dask")
    address = f"tcp://127.0.0.1:{free_port()}"
    commands = [
        [*DASK, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--no-dashboard"]
    ]
    envs = [dict(os.environ)]
    for i in range(2):
        node = root / f"node{i}"
        commands.append(
            [*DASK, "worker", address, "--name", f"node{i}", "--nthreads", "1", "--host", "127.0.0.1",
             "--no-dashboard", "--local-directory", str(node / "dask")]
        )  # fmt: skip
        # Nothing of this machine's Prefect profile or storage: only what the flow run hands over.
        envs.append({**os.environ, "HOME": str(node), "PREFECT_HOME": str(node / ".prefect")})
    processes = []
    try:
        for i, (command, env) in enumerate(zip(commands, envs, strict=True)):
            log = open(root / f"process{i}.log", "w")  # noqa: SIM115 (closed with the process)
            processes.append((subprocess.Popen(command, env=env, stdout=log, stderr=log), log))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield address, root
    finally:
        for process, log in reversed(processes):
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


def _digests(datasets: dict[str, str]) -> dict[str, tuple[str, list[str]]]:
    """Each output dataset's content digest and its shards' sha256, by name."""
    return {
        name: (ds.dataset_digest(path), [s.sha256 for s in ds.read_manifest(path).shards])
        for name, path in datasets.items()
    }


def test_the_cluster_makes_the_pools_bytes_and_its_rerun_is_all_cached(
    prefect_harness, crawl: Path, dask_cluster, tmp_path: Path
) -> None:
    from flows.data_refresh import data_refresh
    from tasks.prefect_tasks import dask_task_runner

    address, nodes = dask_cluster
    pool = data_refresh(_params(crawl, tmp_path / "pool"))

    # The flow run's result storage is what every worker writes to and reads cache hits from: on a
    # real cluster, a path on the shared filesystem (or a remote storage block), not ~/.prefect.
    shared_results = tmp_path / "shared-results"
    on_cluster = data_refresh.with_options(task_runner=dask_task_runner(address))
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: shared_results}):
        first = on_cluster(_params(crawl, tmp_path / "cluster"), return_state=True)
        assert first.is_completed(), first
        second = on_cluster(_params(crawl, tmp_path / "cluster"), return_state=True)

    cluster = first.result()
    assert set(cluster["datasets"]) == set(pool["datasets"])
    assert {"CC-MAIN-2026-40/ingest", "CC-MAIN-2026-40/dedup", "packed"} <= set(cluster["datasets"])
    assert _digests(cluster["datasets"]) == _digests(pool["datasets"])

    with Client(address, timeout=30) as client:
        executed = client.run(lambda dask_worker: dask_worker.state.executed_count)
    assert len(executed) == 2 and all(n > 0 for n in executed.values()), executed
    assert any(shared_results.iterdir()), "the workers wrote no result to the flow's storage"
    assert not list(nodes.glob("node*/.prefect/storage/*")), "a worker wrote results to its own home"

    states = asyncio.run(_task_run_states(first.state_details.flow_run_id))
    assert states and all(s == "Completed" for s in states.values()), states
    assert second.is_completed(), second
    states = asyncio.run(_task_run_states(second.state_details.flow_run_id))
    assert states and all(s == "Cached" for s in states.values()), states
