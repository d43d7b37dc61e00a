"""Dask scaling benchmark: the data refresh (crawl -> ingest, langid, quality, pii, dedup) through
Prefect on a real Dask cluster of 1 and 2 worker processes on loopback, against the process pool.

For each configuration: a fresh workdir, a `dask scheduler` and N `dask worker` processes (one
thread each: the stages are CPU-bound Python), the flow run, then the cluster stopped. Reported:
documents read by ingest, wall seconds of the flow run, docs/s, and CPU seconds of the cluster's
processes and of the flow's own process. On a machine shared with other jobs the wall clock moves
with their load; CPU seconds do not, and docs per CPU second shows the distributed overhead.

    .venv/bin/python benchmarks/bench_dask.py [--workers 1 2] [--max-files 2] [--records 400]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flows.data_refresh import DataRefreshParams, data_refresh  # noqa: E402
from tasks.prefect_tasks import dask_task_runner  # noqa: E402

CRAWL = REPO.parent / "shared" / "corpus" / "crawl"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def dask_cluster(workers: int, root: Path) -> Iterator[str]:
    """A scheduler and ``workers`` single-threaded worker processes on loopback; its address."""
    from distributed import Client

    address = f"tcp://127.0.0.1:{free_port()}"
    dask = [sys.executable, "-m", "dask"]
    commands = [
        [*dask, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--no-dashboard"]
    ]
    commands += [
        [*dask, "worker", address, "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard",
         "--local-directory", str(root / f"worker{i}")]
        for i in range(workers)
    ]  # fmt: skip
    processes = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in commands]
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(workers, timeout=120)
        yield address
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)  # reaped: its CPU time (and its children's) is counted


def params(workdir: Path, max_files: int, records: int) -> DataRefreshParams:
    return DataRefreshParams.model_validate(
        {
            "crawl": str(CRAWL),
            "snapshots": ["CC-MAIN-2026-40"],
            "workdir": str(workdir),
            "max_files": max_files,
            "ingest": {"max_records_per_file": records},
            "build_training_data": False,
            "mlflow_tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}",
        }
    )


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def measure(label: str, run, root: Path) -> dict:
    """Run one configuration; its wall time, documents read and CPU seconds (children, self)."""
    children, own, started = (
        cpu_seconds(resource.RUSAGE_CHILDREN),
        cpu_seconds(resource.RUSAGE_SELF),
        time.perf_counter(),
    )
    docs, wall = run(root)
    return {
        "config": label,
        "docs": docs,
        "wall_s": wall,
        "total_s": time.perf_counter() - started,
        "cluster_cpu_s": cpu_seconds(resource.RUSAGE_CHILDREN) - children,
        "flow_cpu_s": cpu_seconds(resource.RUSAGE_SELF) - own,
    }


def refresh(flow_fn, workdir: Path, args: argparse.Namespace) -> tuple[int, float]:
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    # The flow's result storage is the workers' too (tests/test_dask.py): a fresh one per configuration.
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: workdir / "prefect-results"}):
        started = time.perf_counter()
        result = flow_fn(params(workdir, args.max_files, args.records))
        wall = time.perf_counter() - started
    docs = sum(row["in"] for row in result["stats"] if row["stage"] == "ingest")
    return docs, wall


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-files", type=int, default=2, help="crawl files per kind (warc, wet)")
    parser.add_argument("--records", type=int, default=400, help="records read per crawl file")
    parser.add_argument("--no-pool", action="store_true", help="skip the process-pool baseline")
    args = parser.parse_args()

    from prefect.testing.utilities import prefect_test_harness

    rows = []
    with prefect_test_harness(server_startup_timeout=300), tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # Warm-up: imports, the fastText model in the page cache, the server's first queries.
        refresh(data_refresh, root / "warmup", argparse.Namespace(max_files=1, records=20))
        if not args.no_pool:
            pool = os.cpu_count() or 1
            rows.append(
                measure(
                    f"process pool ({pool} processes)",
                    lambda r: refresh(data_refresh, r / "pool", args),
                    root,
                )
            )
        for n in args.workers:

            def on_cluster(r: Path, n: int = n) -> tuple[int, float]:
                with dask_cluster(n, r / f"dask{n}") as address:
                    flow_fn = data_refresh.with_options(task_runner=dask_task_runner(address))
                    return refresh(flow_fn, r / f"workdir{n}", args)

            rows.append(measure(f"dask, {n} worker{'s' if n > 1 else ''} x 1 thread", on_cluster, root))

    print(f"machine: {platform.node()}, nproc {os.cpu_count()}, {platform.processor() or platform.machine()}")
    print("| configuration | docs | flow wall s | docs/s | workers CPU s | flow CPU s | docs / CPU s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cpu = r["cluster_cpu_s"] + r["flow_cpu_s"]
        print(
            f"| {r['config']} | {r['docs']} | {r['wall_s']:.1f} | {r['docs'] / r['wall_s']:.1f} | "
            f"{r['cluster_cpu_s']:.1f} | {r['flow_cpu_s']:.1f} | {r['docs'] / cpu:.1f} |"
        )


if __name__ == "__main__":
    main()
