"""`pretrain`: the command line of pretrain-factory.

pretrain data-refresh --crawl PATH_OR_URL --snapshot ID --workdir DIR   run the data flow
pretrain stage NAME --input F --output F                                 one stage on one file
pretrain trace --data DIR --shard N --seq M                              sequence -> source pages
pretrain pipeline --workdir DIR                                          data -> train -> eval
pretrain train / evaluate                                                the training flows
pretrain up / down / status                                              local servers
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel


def load_params(model: type[BaseModel], config_file: str | None, overrides: dict[str, Any]) -> BaseModel:
    """Parameters from a YAML file (optional), then command-line overrides that were given."""
    data: dict[str, Any] = {}
    if config_file:
        data = yaml.safe_load(Path(config_file).read_text()) or {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return model.model_validate(data)


@contextlib.contextmanager
def prefect_api() -> Iterator[None]:
    """Use the configured Prefect API; without one, start one embedded local server for this command.

    Prefect would otherwise start a temporary server in every worker process of the process pool,
    and their task runs would land in servers nobody looks at.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline; no telemetry writes

    server = SubprocessASGIServer()
    server.start(timeout=int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")))
    os.environ["PREFECT_API_URL"] = server.api_url  # inherited by worker processes
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield
    finally:
        from prefect.logging.handlers import APILogHandler

        for name in ("prefect.flow_runs", "prefect.task_runs"):  # last log lines reach the server first
            for handler in logging.getLogger(name).handlers:
                if isinstance(handler, APILogHandler):
                    handler.flush()
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def cmd_data_refresh(args: argparse.Namespace) -> int:
    from flows.data_refresh import DataRefreshParams, data_refresh
    from tasks.prefect_tasks import dask_task_runner

    params = load_params(
        DataRefreshParams,
        args.config,
        {
            "crawl": args.crawl,
            "snapshots": args.snapshot,
            "workdir": args.workdir,
            "max_files": args.max_files,
        },
    )
    flow_fn = data_refresh
    if args.dask or args.dask_address:
        flow_fn = data_refresh.with_options(task_runner=dask_task_runner(args.dask_address))
    with prefect_api():
        result = flow_fn(params)
    print(f"outputs: {json.dumps(result['outputs'], indent=2)}")
    print(f"MLflow run: {result['mlflow_run_id']}")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from tasks import dataset as ds
    from tasks.stage import StageStats, run_stage

    if args.name == "dedup":
        from tasks.dedup import DedupConfig, dedup_file

        stats = dedup_file(args.input, args.output, load_params(DedupConfig, args.config, {}), args.annotate)
        _print_json(stats if isinstance(stats, dict) else stats.to_dict())
        return 0
    if args.name == "ingest":
        from tasks.ingest import IngestConfig, iter_documents

        config = load_params(IngestConfig, args.config, {})
        stats = StageStats("ingest")
        ds.write_file_rows(iter_documents(args.input, config, stats), args.output)
    else:
        from tasks.prefect_tasks import DOCUMENT_STAGES, document_stage, stage_config_class

        if args.name not in DOCUMENT_STAGES:
            print(
                f"unknown stage {args.name!r}; one of: ingest, dedup, {', '.join(DOCUMENT_STAGES)}",
                file=sys.stderr,
            )
            return 2
        stage = document_stage(args.name, load_params(stage_config_class(args.name), args.config, {}))
        stats = StageStats(stage.name)
        rows = (
            {**row, "doc_id": str(row.get("doc_id") or row.get("id") or f"line-{i}")}
            for i, row in enumerate(ds.iter_file_rows(args.input), 1)
        )
        ds.write_file_rows(run_stage(stage, rows, stats), args.output)
    stats.check_accounting()
    rejects = Path(args.output).with_suffix(".rejects.jsonl")
    ds.write_file_rows(stats.rejects, rejects)
    _print_json({**stats.to_dict(), "rejects_file": str(rejects)})
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from flows.pretrain import PretrainParams, pretrain

    params = load_params(PretrainParams, args.config, {"run_name": args.run_name, "data_dir": args.data})
    with prefect_api():
        result = pretrain(params)
    _print_json(result.model_dump(mode="json"))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from flows.evaluate import EvaluateParams, evaluate

    params = load_params(EvaluateParams, args.config, {"checkpoint": args.checkpoint, "data_dir": args.data})
    with prefect_api():
        result = evaluate(params)
    _print_json(result.model_dump(mode="json"))
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    """The main job on embedded defaults: data refresh, then a small model trained and evaluated."""
    import torch

    from flows.data_refresh import DataRefreshParams, data_refresh
    from flows.pretrain import PretrainParams, pretrain
    from tasks.train import LocalLauncher

    on_gpu = torch.cuda.is_available()
    overrides: dict[str, Any] = {"crawl": args.crawl, "workdir": args.workdir}
    if not on_gpu and not args.config:
        overrides["pack"] = {"seq_len": 256}  # CPU demo: short windows keep a training step well under 1 s
    data_params = load_params(DataRefreshParams, args.config, overrides)
    workdir = Path(data_params.workdir).resolve()
    with prefect_api():
        refreshed = data_refresh(data_params)
        print(f"data: {json.dumps(refreshed['outputs'], indent=2)}")
        train_params = load_params(
            PretrainParams,
            args.train_config,
            {
                "run_name": args.run_name,
                "data_dir": refreshed["outputs"]["packed"],
                "runs_root": str(workdir / "runs"),
                "model": args.model,
                "max_steps": args.max_steps,
                "eval_interval": max(1, args.max_steps // 2),
                "micro_batch_size": 8,
                "mlflow_tracking_uri": refreshed.get("mlflow_tracking_uri"),
                "launcher": LocalLauncher(
                    device="cuda" if on_gpu else "cpu",
                    nproc_per_node=torch.cuda.device_count() if on_gpu else 2,
                ).model_dump(),
            },
        )
        result = pretrain(train_params)
    for ev in result.evals:
        print(f"eval: {json.dumps(ev.model_dump(mode='json'))[:400]}")
    print(f"MLflow: {result.mlflow_url}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from infra import local

    platform = local.up(
        Path(args.home) if args.home else None,
        prefect_port=args.prefect_port,
        mlflow_port=args.mlflow_port,
        auth=args.auth or None,
    )
    print(f"Prefect UI: {platform.prefect_ui_url}\nMLflow UI:  {platform.mlflow_url}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from infra import local

    stopped = local.down(Path(args.home) if args.home else None)
    print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from infra import local

    services = local.status(Path(args.home) if args.home else None)
    for name, service in services.items():
        print(f"{name:<16} pid={service.pid} healthy={service.healthy} log={service.log}")
    return 0 if all(s.healthy for s in services.values()) else 1


def cmd_trace(args: argparse.Namespace) -> int:
    from tasks.pack import trace

    rows = trace(args.data, args.shard, args.seq)
    for row in rows:
        print(json.dumps(row, ensure_ascii=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain", description="pretrain-factory: crawl to base model.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "data-refresh", help="run the data flow: ingest, langid, filters, dedup, tokenizer, pack"
    )
    p.add_argument("--crawl", help="crawl root, file, glob or URL (default: the sample crawl)")
    p.add_argument("--snapshot", action="append", help="snapshot id (repeatable; default: all)")
    p.add_argument("--workdir", help="output directory (default: workdir)")
    p.add_argument("--config", help="YAML file with DataRefreshParams")
    p.add_argument("--max-files", type=int, help="at most this many crawl files per snapshot")
    p.add_argument("--dask", action="store_true", help="run tasks on a local Dask cluster")
    p.add_argument("--dask-address", help="run tasks on this Dask scheduler (tcp://host:8786)")
    p.set_defaults(func=cmd_data_refresh)

    p = sub.add_parser("stage", help="run one stage on a JSONL/Parquet file with a text column")
    p.add_argument("name", help="ingest | langid | quality | pii | dedup")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--config", help="YAML file with the stage's config")
    p.add_argument("--annotate", action="store_true", help="dedup: keep all, add dup_cluster")
    p.set_defaults(func=cmd_stage)

    p = sub.add_parser("trace", help="list the source documents of one packed training sequence")
    p.add_argument("--data", required=True, help="packed data directory")
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--seq", type=int, required=True)
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("pipeline", help="end to end on embedded defaults: data refresh, train, evaluate")
    p.add_argument("--crawl", help="crawl root (default: the sample crawl)")
    p.add_argument("--workdir", help="output directory (default: workdir)")
    p.add_argument("--config", help="YAML file with DataRefreshParams")
    p.add_argument("--train-config", help="YAML file with PretrainParams")
    p.add_argument("--run-name", default="pipeline")
    p.add_argument("--model", default="tiny", help="model preset")
    p.add_argument("--max-steps", type=int, default=200)
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("train", help="run the pretrain flow (submit, follow, evaluate checkpoints)")
    p.add_argument("--config", help="YAML file with PretrainParams")
    p.add_argument("--run-name")
    p.add_argument("--data", help="packed data directory")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on the validation split")
    p.add_argument("--config", help="YAML file with EvaluateParams")
    p.add_argument("--checkpoint")
    p.add_argument("--data", help="packed data directory (default: the run's)")
    p.set_defaults(func=cmd_evaluate)

    for name, func, text in (
        ("up", cmd_up, "start Prefect server, worker and MLflow on loopback; apply deployments"),
        ("down", cmd_down, "stop exactly what `up` started"),
        ("status", cmd_status, "health of the local services"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--home", help="state, logs and databases (default: $PRETRAIN_HOME or .pretrain-home)")
        if name == "up":
            p.add_argument("--prefect-port", type=int)
            p.add_argument("--mlflow-port", type=int)
            p.add_argument("--auth", action="store_true", help="require API auth on both servers")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
