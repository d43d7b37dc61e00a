"""A Dask cluster of Slurm jobs for the data refresh (dask-jobqueue), configured by infra/dask/slurm.yaml.

    python infra/dask/slurm_cluster.py --jobs 8             # scheduler here, 8 Slurm jobs of workers
    python infra/dask/slurm_cluster.py --print-job-script   # the sbatch script, submitting nothing
    pretrain data-refresh --dask-address tcp://<this host>:8786 --workdir /shared/... ...

The scheduler lives in this process (run it on the login node, or in a small Slurm job of its own) for
as long as refreshes use it; SIGINT or SIGTERM closes it and cancels the worker jobs. Settings come from
the YAML as defaults: DASK_JOBQUEUE__SLURM__* variables and the command-line options override them.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from typing import Any

import dask.config
import yaml

CONFIG = Path(__file__).with_name("slurm.yaml")


def make_cluster(config: Path = CONFIG, **overrides: Any):  # -> dask_jobqueue.SLURMCluster
    """A SLURMCluster from ``config`` (defaults under any DASK_* settings), with ``overrides`` on top."""
    import dask_jobqueue  # noqa: F401 (registers its own defaults first)
    from dask_jobqueue import SLURMCluster

    dask.config.update_defaults(yaml.safe_load(config.read_text()))
    return SLURMCluster(**overrides)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--jobs", type=int, default=1, help="Slurm jobs of workers to keep running")
    parser.add_argument("--queue", help="partition (overrides the config)")
    parser.add_argument("--account", help="account (overrides the config)")
    parser.add_argument("--print-job-script", action="store_true", help="print the sbatch script and exit")
    args = parser.parse_args(argv)

    overrides = {k: v for k, v in {"queue": args.queue, "account": args.account}.items() if v}
    with make_cluster(args.config, **overrides) as cluster:
        if args.print_job_script:
            print(cluster.job_script())
            return
        cluster.scale(jobs=args.jobs)
        print(f"scheduler: {cluster.scheduler_address}  dashboard: {cluster.dashboard_link}", flush=True)
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        stop.wait()
    print("closed: worker jobs cancelled")


if __name__ == "__main__":
    main()
