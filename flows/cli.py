"""`pretrain`: the command line of pretrain-factory.

pretrain data-refresh --crawl PATH_OR_URL --snapshot ID --workdir DIR   run the data flow
pretrain stage NAME --input F --output F                                 one stage on one file
pretrain cache status / invalidate --stage X                            what a refresh would redo
pretrain trace --data DIR --shard N --seq M                              sequence -> source pages
pretrain pipeline --workdir DIR                                          data -> train -> eval
pretrain train / evaluate                                                the training flows
pretrain up / down / status                                              local servers
pretrain export --checkpoint DIR --out DIR                               Hugging Face folder
pretrain lineage CHECKPOINT_OR_RUN                                       crawl -> ... -> version
pretrain ablation --recipe NAME=overrides.yaml --recipe ...             proxy model per data recipe
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


def _refresh_params(args: argparse.Namespace) -> BaseModel:
    from flows.data_refresh import DataRefreshParams

    overrides = {
        "crawl": args.crawl,
        "snapshots": args.snapshot,
        "workdir": args.workdir,
        "max_files": args.max_files,
        "lock_wait_s": getattr(args, "lock_wait", None),
    }
    return load_params(DataRefreshParams, args.config, overrides)


def cmd_data_refresh(args: argparse.Namespace) -> int:
    from flows.data_refresh import crawl_files, data_refresh
    from tasks import storage, workdir_lock
    from tasks.dataset import resolve_version
    from tasks.prefect_tasks import dask_task_runner

    params = _refresh_params(args)
    crawl_files(params)  # bad input: one line naming the cause, before any server starts
    if storage.is_remote(params.workdir):
        storage.check_bucket(params.workdir)
    if params.tokenizer_dir:
        resolve_version(params.tokenizer_dir)
    flow_fn = data_refresh
    if args.dask or args.dask_address:
        flow_fn = data_refresh.with_options(task_runner=dask_task_runner(args.dask_address))
    # Taken before the server starts (a busy workdir: one line at once); the flow takes it again.
    with workdir_lock.hold(storage.local_workdir(params.workdir), params.lock_wait_s), prefect_api():
        result = flow_fn(params)
    print(f"outputs: {json.dumps(result['outputs'], indent=2)}")
    print(f"MLflow run: {result['mlflow_run_id']}")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from tasks import registry

    stage = registry.stage(args.name)
    overrides = {"annotate": True} if args.annotate else {}
    config = load_params(stage.config_model(), args.config, overrides)
    _print_json(stage.run_file(config, args.input, args.output))  # type: ignore[misc]
    return 0


def cmd_cache_status(args: argparse.Namespace) -> int:
    from flows.data_refresh import cache_status

    status = cache_status(_refresh_params(args))
    print(status.format_table())
    return 0


def cmd_cache_invalidate(args: argparse.Namespace) -> int:
    from flows.data_refresh import DataRefreshParams
    from tasks import prefect_tasks as pt
    from tasks import registry, workdir_lock

    workdir = Path(args.workdir or DataRefreshParams().workdir)
    with workdir_lock.hold(workdir):  # never under a running refresh
        removed = pt.invalidate(workdir, args.stage)
    stages = ", ".join(registry.stages_from(args.stage))
    print(f"forgot {len(removed)} done record(s) under {workdir}: the next refresh runs {stages} again")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from flows.pretrain import PretrainParams, pretrain
    from tasks.dataset import resolve_version

    params = load_params(PretrainParams, args.config, {"run_name": args.run_name, "data_dir": args.data})
    try:  # bad input: one line naming the cause, before any server starts
        resolve_version(params.data_dir)
    except FileNotFoundError as exc:
        print(f"pretrain train: {exc}", file=sys.stderr)
        return 2
    with prefect_api():
        result = pretrain(params)
    _print_json(result.model_dump(mode="json"))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from flows.evaluate import EvaluateParams, evaluate
    from model.evaluate import EvalInputError, resolve_inputs

    params = load_params(EvaluateParams, args.config, {"checkpoint": args.checkpoint, "data_dir": args.data})
    if args.device:
        params.eval.device = args.device
    try:  # bad input: one line naming the cause, before any server starts
        resolve_inputs(params.checkpoint, params.data_dir)
    except EvalInputError as exc:
        print(f"pretrain evaluate: {exc}", file=sys.stderr)
        return 2
    with prefect_api():
        result = evaluate(params)
    summary = result.model_copy(update={"table": [r for r in result.table if r.kind != "slice"]})
    print(summary.artifacts()[f"eval/step-{result.step}.md"], end="")
    print(f"per slice: the MLflow artifact eval/step-{result.step}.md")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    """The main job: data refresh, then a small model trained and evaluated. Against the local
    platform when it is up (`pretrain up`), else on embedded stores in the workdir."""
    import torch

    from flows.data_refresh import DataRefreshParams, data_refresh
    from flows.pretrain import PretrainParams, pretrain
    from infra import local
    from tasks import workdir_lock
    from tasks.launchers import LocalLauncher
    from tasks.tracking import tracking_uri

    platform = local.serving(Path(args.home) if args.home else None)
    if platform is not None:
        os.environ.update(platform.client_env())
        print(
            f"running against the local platform: Prefect {platform.prefect_ui_url}, MLflow {platform.mlflow_url}"
        )
    on_gpu = torch.cuda.is_available()
    overrides: dict[str, Any] = {"crawl": args.crawl, "workdir": args.workdir, "lock_wait_s": args.lock_wait}
    cpu_demo = not on_gpu and not args.config
    if cpu_demo:
        # Measured on 2 cores (issue 11 item 7): 256-token windows, a 4096-token vocabulary (the output
        # layer of 32k tokens cost 5x the tiny model itself), 2% held out (~56 pages: per-language
        # numbers and tasks worth reading) -> val BPB 3.9 -> 2.4 in 400 steps at lr 1e-2.
        overrides["pack"] = {"seq_len": 256, "validation_fraction": 0.02}
        overrides["tokenizer"] = {"vocab_size": 4096}
    data_params = load_params(DataRefreshParams, args.config, overrides)
    workdir = Path(data_params.workdir).resolve()
    # A busy workdir: one line now, not after a server start. The refresh flow holds it while it
    # runs; training reads published versions and runs beside later refreshes.
    workdir_lock.wait_free(workdir, data_params.lock_wait_s)
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
                "train": {
                    "model": args.model,
                    "max_steps": args.max_steps,
                    "checkpoint_interval": max(1, args.max_steps // 4),
                    "micro_batch_size": 8,
                    **({"optim": {"lr": 1e-2, "warmup_steps": 20}} if cpu_demo else {}),
                },
                **({"eval": {"threads": 1}} if cpu_demo else {}),  # beside 2 ranks on 2 cores
                "mlflow_tracking_uri": refreshed.get("mlflow_tracking_uri"),
                "launcher": LocalLauncher(
                    device="cuda" if on_gpu else "cpu",
                    nproc_per_node=torch.cuda.device_count() if on_gpu else 2,
                ).model_dump(),
            },
        )
        result = pretrain(train_params)
    for ev in result.evals:
        print(f"eval step {ev.step}: {json.dumps(ev.metrics)[:400]}")
    uri = tracking_uri(train_params.mlflow_tracking_uri, Path(train_params.runs_root).resolve())
    if platform is None and (command := local.serve_command(uri)):
        print(f"MLflow: no server is running; this serves the run's stores:\n  {command}\nthen open")
    print(f"MLflow run (charts: Model metrics; samples: Artifacts > samples/): {result.mlflow_url}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from infra import local

    platform = local.up(
        Path(args.home) if args.home else None,
        prefect_port=args.prefect_port,
        mlflow_port=args.mlflow_port,
        auth=args.auth or None,
        mlflow_backend_store=args.mlflow_backend_store,
        mlflow_artifacts=args.mlflow_artifacts,
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


def cmd_classifier_train(args: argparse.Namespace) -> int:
    from flows.train_classifier import TrainClassifierParams, train_classifier
    from tasks.train_classifier import TrainClassifierConfig

    overrides = {
        "positive": args.positive,
        "negative": args.negative,
        "output": args.output,
        "workdir": args.workdir,
    }
    params = load_params(TrainClassifierParams, args.config, overrides)
    given = {k: v for k, v in {"name": args.name, "seed": args.seed}.items() if v is not None}
    params.train = TrainClassifierConfig.model_validate({**params.train.model_dump(), **given})
    with prefect_api():
        result = train_classifier(params)
    _print_json({k: result["manifest"][k] for k in ("name", "model_sha256", "training_data", "heldout")})
    print(f"model: {result['model_dir']}\nMLflow run: {result['mlflow_run_id']}")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from tasks.pack import trace

    rows = trace(args.data, args.shard, args.seq)
    for row in rows:
        print(json.dumps(row, ensure_ascii=False))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from tasks.plan import make_plan, packed_data_info, parse_count, plan_text

    try:
        data_tokens, seq_len, vocab = packed_data_info(args.data) if args.data else (None, args.seq_len, None)
        if args.tokens is None and data_tokens is None:
            raise ValueError("give --data (a packed dataset) or --tokens (e.g. 300B)")
        tokens = parse_count(args.tokens) if args.tokens else round(data_tokens * args.epochs)
        plan = make_plan(
            args.model, gpus=args.gpus, gpu=args.gpu, tokens=tokens, precision=args.precision,
            micro_batch=args.batch, grad_accum=args.grad_accum, seq_len=seq_len, vocab_size=vocab,
            activation_checkpointing=args.ac, data_tokens=data_tokens,
        )  # fmt: skip
    except (OSError, ValueError, KeyError) as e:  # bad data dir, preset or count: one line
        print(f"pretrain plan: {e}", file=sys.stderr)
        return 2
    print(plan_text(plan))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from model.export import export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.out, data_dir=args.data, dtype=args.dtype)
    except (OSError, ValueError) as e:  # a bad checkpoint, data or --out: one line, no traceback
        print(f"export: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    if args.model_name:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        from tasks.export import attach_export
        from tasks.lineage import tracking_uri_of

        uri = args.tracking_uri or tracking_uri_of(args.checkpoint) or os.environ.get("MLFLOW_TRACKING_URI")
        try:
            where = attach_export(MlflowClient(uri), args.model_name, args.model_version, out)
        except (MlflowException, ValueError) as e:
            print(f"export: not attached to {args.model_name}/{args.model_version}: {e}", file=sys.stderr)
            return 2
        print(f"attached to models:/{args.model_name}/{args.model_version}: {where}")
    return 0


def cmd_thresholds_derive(args: argparse.Namespace) -> int:
    from tasks import thresholds as th
    from tasks.atomic import atomic_write_text
    from tasks.quality import QualityConfig

    config = load_params(QualityConfig, args.config, {})
    scores = [th.ScoreRule.parse(spec) for spec in args.score or []]
    derived = th.derive(args.dataset, config, args.reference, args.min_docs, scores, args.host, args.min_tail)
    run = th.dry_run(args.dataset, config, th.apply(config, derived.content))
    report = th.report_markdown(derived, run)
    if args.dry_run:
        print(report)
        return 0
    path = th.write_thresholds(derived, args.out)
    atomic_write_text(path.with_suffix(".report.md"), report)
    print(report)
    print(f"wrote {path} (set quality.thresholds_file to use it) and {path.with_suffix('.report.md')}")
    return 0


def cmd_ablation(args: argparse.Namespace) -> int:
    from flows.ablation import AblationParams, ablation
    from flows.data_refresh import crawl_files
    from tasks import workdir_lock
    from tasks.ablation import recipe_params

    overrides = {
        "name": args.name,
        "workdir": args.workdir,
        "tokens": args.tokens,
        "lock_wait_s": args.lock_wait,
    }
    params = load_params(AblationParams, args.config, overrides)
    if args.recipe:  # NAME or NAME=overrides.yaml; they replace the config's recipes
        recipes = []
        for spec in args.recipe:
            name, _, file = spec.partition("=")
            changes = (yaml.safe_load(Path(file).read_text()) or {}) if file else {}
            recipes.append({"name": name, "overrides": changes})
        params = AblationParams.model_validate({**params.model_dump(), "recipes": recipes})
    try:  # bad input: one line naming the cause, before any server starts
        for refresh in recipe_params(params.base, params.recipes, Path(params.workdir)).values():
            crawl_files(refresh)
    except ValueError as exc:
        print(f"pretrain ablation: {exc}", file=sys.stderr)
        return 2
    # A busy workdir: one line now, not after a server start; the flow holds it while it runs.
    with workdir_lock.hold(Path(params.workdir).resolve(), params.lock_wait_s), prefect_api():
        rows = ablation(params)
    for row in rows:
        print(f"{row['run']:<24} held-out bpb {row['eval_bpb']:.4f} ({row['delta_bpb']:+.4f} vs baseline)")
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from tasks.lineage import LineageError, format_lineage, lineage, tracking_uri_of

    uri = args.tracking_uri or tracking_uri_of(args.target) or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        print(
            "lineage: no MLflow tracking URI: pass --tracking-uri or set MLFLOW_TRACKING_URI", file=sys.stderr
        )
        return 2
    try:
        result = lineage(MlflowClient(uri), args.target)
    except LineageError as e:
        print(f"lineage: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_lineage(result))
    return 1 if result.mismatches else 0


LOCK_WAIT_HELP = "when another refresh writes the workdir, wait up to this many seconds (default: 0)"


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
    p.add_argument("--lock-wait", type=float, help=LOCK_WAIT_HELP)
    p.set_defaults(func=cmd_data_refresh)

    from tasks.registry import STAGES, file_stages

    p = sub.add_parser(
        "stage", help="run one stage on one file (JSONL/Parquet with a text column; crawl file for ingest)"
    )
    p.add_argument(
        "name", choices=file_stages(), help="; ".join(f"{n}: {STAGES[n].summary}" for n in file_stages())
    )
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--config", help="YAML file with the stage's config")
    p.add_argument("--annotate", action="store_true", help="dedup: keep all, add dup_cluster")
    p.set_defaults(func=cmd_stage)

    p = sub.add_parser("cache", help="which stages a data refresh would redo, and why; forget a stage's work")
    cache = p.add_subparsers(dest="cache_command", required=True)
    p = cache.add_parser(
        "status", help="for a config and the code as it is: which stages a run redoes and why"
    )
    p.add_argument("--crawl", help="crawl root, file, glob or URL (default: the sample crawl)")
    p.add_argument("--snapshot", action="append", help="snapshot id (repeatable; default: all)")
    p.add_argument("--workdir", help="output directory (default: workdir)")
    p.add_argument("--config", help="YAML file with DataRefreshParams")
    p.add_argument("--max-files", type=int, help="at most this many crawl files per snapshot")
    p.set_defaults(func=cmd_cache_status)
    p = cache.add_parser("invalidate", help="make the next refresh run STAGE and every later stage again")
    p.add_argument("--stage", required=True, choices=list(STAGES))
    p.add_argument("--workdir", help="output directory (default: workdir)")
    p.set_defaults(func=cmd_cache_invalidate)

    p = sub.add_parser("classifier", help="fastText classifiers for the classifier stage")
    classifier = p.add_subparsers(dest="classifier_command", required=True)
    p = classifier.add_parser("train", help="train one from positive and negative data; log it to MLflow")
    p.add_argument("--positive", help="dataset dir, Parquet or JSONL with a text column (curated pages)")
    p.add_argument("--negative", help="the same for negative examples (random crawl pages)")
    p.add_argument("--output", help="model directory (default: WORKDIR/classifiers/NAME)")
    p.add_argument("--workdir", help="default: workdir (models, embedded MLflow)")
    p.add_argument("--name", help="label name (default: quality): column NAME_score")
    p.add_argument("--seed", type=int)
    p.add_argument("--config", help="YAML file with TrainClassifierParams")
    p.set_defaults(func=cmd_classifier_train)

    p = sub.add_parser("trace", help="list the source documents of one packed training sequence")
    p.add_argument("--data", required=True, help="packed data directory")
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--seq", type=int, required=True)
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("plan", help="compute plan: tokens/parameter, steps, FLOPs, time, GPU-hours, memory")
    p.add_argument("--data", help="packed dataset (its train tokens; a published root: its LATEST)")
    p.add_argument("--tokens", help="tokens to train on (e.g. 300B, 2e12); default: --epochs x the data")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over --data when --tokens is not given")
    p.add_argument("--model", default="1B", help="model preset")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--gpu", default="H200", help="GPU kind (H200, H100, A100, ...)")
    p.add_argument("--precision", choices=["bf16", "float8"], default="bf16")
    p.add_argument("--batch", type=int, help="micro-batch per GPU (default: the fastest measured)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=2048, help="without --data")
    p.add_argument("--ac", type=int, help="activation checkpointing of every k-th block (0: none)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("pipeline", help="end to end on embedded defaults: data refresh, train, evaluate")
    p.add_argument("--crawl", help="crawl root (default: the sample crawl)")
    p.add_argument("--workdir", help="output directory (default: workdir)")
    p.add_argument("--config", help="YAML file with DataRefreshParams")
    p.add_argument("--train-config", help="YAML file with PretrainParams")
    p.add_argument("--run-name", default="pipeline")
    p.add_argument("--model", default="tiny", help="model preset")
    p.add_argument("--max-steps", type=int, default=400)
    p.add_argument("--home", help="local platform to run against when it is up (default: $PRETRAIN_HOME)")
    p.add_argument("--lock-wait", type=float, help=LOCK_WAIT_HELP)
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("train", help="run the pretrain flow (submit, follow, evaluate checkpoints)")
    p.add_argument("--config", help="YAML file with PretrainParams")
    p.add_argument("--run-name")
    p.add_argument("--data", help="packed data directory")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on the validation split")
    p.add_argument("--config", help="YAML file with EvaluateParams")
    p.add_argument("--checkpoint")
    p.add_argument("--data", help="packed data version directory (default: the one the run trained on)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: auto (the GPU if any)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face folder (LlamaForCausalLM)")
    p.add_argument("--checkpoint", required=True, help="a complete checkpoint: <run>/checkpoints/step-N")
    p.add_argument("--out", required=True, help="the folder to write (must not exist or be empty)")
    p.add_argument("--data", help="packed data directory (default: the one the run trained on)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--model-name", help="also attach the folder to this registered model's version")
    p.add_argument("--model-version", default="best", help="version number or alias (default: best)")
    p.add_argument("--tracking-uri", help="MLflow (default: the run's, then $MLFLOW_TRACKING_URI)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("ablation", help="train the same proxy on each data recipe, compare them in MLflow")
    p.add_argument("--config", help="YAML file with AblationParams (base, recipes, tokens, train, eval)")
    p.add_argument(
        "--recipe",
        action="append",
        metavar="NAME[=OVERRIDES.yaml]",
        help="a recipe: its data-refresh overrides (repeatable, 2+; the first is the baseline)",
    )
    p.add_argument("--name", help="parent MLflow run name (default: ablation)")
    p.add_argument("--workdir", help="default: workdir/ablation")
    p.add_argument("--tokens", type=int, help="training tokens per proxy")
    p.add_argument("--lock-wait", type=float, help=LOCK_WAIT_HELP)
    p.set_defaults(func=cmd_ablation)

    p = sub.add_parser("lineage", help="crawl files -> datasets -> training run -> checkpoint -> version")
    p.add_argument(
        "target", help="checkpoint or run directory, models:/NAME/VERSION, models:/NAME@ALIAS, run id"
    )
    p.add_argument("--tracking-uri", help="MLflow (default: the run's, then $MLFLOW_TRACKING_URI)")
    p.add_argument("--json", action="store_true", help="print the links as JSON")
    p.set_defaults(func=cmd_lineage)

    p = sub.add_parser("thresholds", help="per-language filter thresholds derived from data")
    thresholds = p.add_subparsers(dest="thresholds_command", required=True)
    p = thresholds.add_parser(
        "derive", help="match each language's filter statistics to the reference's (tasks/thresholds.py)"
    )
    p.add_argument("--dataset", action="append", required=True, help="langid output (with lang); repeatable")
    p.add_argument("--reference", default="en", help="the language whose thresholds are matched")
    p.add_argument("--out", required=True, help="JSON file for quality.thresholds_file (and .report.md)")
    p.add_argument("--config", help="YAML file with the current QualityConfig (default: the defaults)")
    p.add_argument("--min-docs", type=int, default=50, help="fewer documents: a language keeps its values")
    p.add_argument("--host", action="append", help="match on this host's documents only (repeatable)")
    p.add_argument("--min-tail", type=int, default=5, help="fewer documents beyond a cut: no derived value")
    p.add_argument("--score", action="append", help="score column COLUMN:THRESHOLD[:below|above], repeatable")
    p.add_argument("--dry-run", action="store_true", help="print what would be dropped; write nothing")
    p.set_defaults(func=cmd_thresholds_derive)

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
            p.add_argument(
                "--mlflow-backend-store",
                help="MLflow database URI (default: SQLite in home), e.g. a workdir's",
            )
            p.add_argument("--mlflow-artifacts", help="MLflow artifacts directory (default: in home)")
        p.set_defaults(func=func)
    return parser


def user_error(exc: Exception) -> str | None:
    """One line for an error the user can fix (bad --crawl, config, data path); None for a bug."""
    from pydantic import ValidationError

    from tasks.ingest import CrawlInputError
    from tasks.thresholds import DerivationError
    from tasks.workdir_lock import WorkdirBusy

    if isinstance(exc, ValidationError):
        return "invalid parameters: " + "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()
        )
    if isinstance(
        exc,
        CrawlInputError
        | DerivationError
        | WorkdirBusy
        | FileNotFoundError
        | ConnectionError
        | yaml.YAMLError,
    ):
        return " ".join(str(exc).split())
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:
        message = user_error(exc)
        if message is None:
            raise
        print(f"pretrain {args.command}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
