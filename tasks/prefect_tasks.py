"""The thin Prefect layer over the stages: one cached, retried task per (stage, shard).

Cache keys come from the work itself (stage name + config + code version + the input's content
hash), never from the flow run, so a nightly run redoes only what changed. Each task also leaves a
small ``.done`` record beside its output naming the key that produced it: the flow asks Prefect to
refresh a cache entry whose output on disk is missing or was since overwritten by other work,
so a cache hit always points at the bytes it describes.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.parquet as pq
from prefect import get_run_logger, task
from prefect.tasks import exponential_backoff
from pydantic import BaseModel

from tasks import dataset as ds
from tasks.stage import (
    DocumentStage,
    ShardResult,
    cache_key,
    code_version,
    finalize_dataset,
    run_stage_on_shard,
    shard_name,
)

# name -> (module, stage class, config class). Import lazily: a stage's heavy dependencies load
# only where that stage runs.
DOCUMENT_STAGES: dict[str, tuple[str, str, str]] = {
    "langid": ("tasks.langid", "LangIdStage", "LangIdConfig"),
    "quality": ("tasks.quality", "QualityStage", "QualityConfig"),
    "pii": ("tasks.pii", "PiiStage", "PiiConfig"),
}

_stage_cache: dict[tuple[str, str], DocumentStage] = {}


def stage_config_class(name: str) -> type[BaseModel]:
    module, _, config_cls = DOCUMENT_STAGES[name]
    return getattr(importlib.import_module(module), config_cls)


def document_stage(name: str, config: BaseModel | dict[str, Any]) -> DocumentStage:
    """The stage object for ``name``, built once per process and config (models load once)."""
    module, stage_cls, _ = DOCUMENT_STAGES[name]
    config = stage_config_class(name).model_validate(config)
    key = (name, config.model_dump_json())
    if key not in _stage_cache:
        _stage_cache[key] = getattr(importlib.import_module(module), stage_cls)(config)
    return _stage_cache[key]


# ---------------------------------------------------------------------------------------------
# Done records: which cache key produced the output currently on disk


def done_path(output: str | Path) -> Path:
    output = Path(output)
    return output.parent / ".done" / f"{output.name}.json"


def mark_done(output: str | Path, key: str, result: BaseModel | dict[str, Any]) -> None:
    payload = result.model_dump(mode="json") if isinstance(result, BaseModel) else result
    ds.atomic_write_text(done_path(output), json.dumps({"key": key, "result": payload}, sort_keys=True))


def is_done(output: str | Path, key: str) -> bool:
    """True when ``output`` exists and was produced by the work identified by ``key``."""
    record = done_path(output)
    if not Path(output).exists() or not record.exists():
        return False
    return json.loads(record.read_text())["key"] == key


def _key_from_parameters(_context: Any, parameters: dict[str, Any]) -> str:
    return parameters["key"]


def _is_transient(_task: Any, _task_run: Any, state: Any) -> bool:
    """Retry I/O hiccups (network, object storage, a busy disk), not bugs or bad data."""
    try:
        state.result()
    except (ConnectionError, TimeoutError) as e:
        return bool(e)
    except OSError as e:
        return not isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError)
    except Exception:
        return False
    return False


SHARD_TASK_OPTIONS: dict[str, Any] = {
    "cache_key_fn": _key_from_parameters,
    "persist_result": True,
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": _is_transient,
}


@task(name="ingest", task_run_name="ingest-{index:05d}", **SHARD_TASK_OPTIONS)
def ingest_shard(
    source: str, output_dir: str, index: int, config: dict[str, Any], snapshot: str | None, key: str
) -> ShardResult:
    from tasks import ingest

    result = ingest.ingest_file(
        source, output_dir, index, ingest.IngestConfig.model_validate(config), snapshot
    )
    mark_done(Path(output_dir) / result.shard.path, key, result)
    return result


@task(name="stage-shard", task_run_name="{stage}-{index:05d}", **SHARD_TASK_OPTIONS)
def stage_shard(
    stage: str, config: dict[str, Any], input_shard: str, output_dir: str, index: int, key: str
) -> ShardResult:
    result = run_stage_on_shard(document_stage(stage, config), input_shard, output_dir, index)
    mark_done(Path(output_dir) / result.shard.path, key, result)
    return result


@task(name="finalize-dataset", task_run_name="finalize-{stage}", **SHARD_TASK_OPTIONS)
def finalize_stage(
    output_dir: str,
    stage: str,
    results: list[ShardResult],
    config: dict[str, Any],
    code: str,
    inputs: list[ds.InputRef],
    key: str,
) -> ds.Manifest:
    """Write the stage's manifest over its shards (last, so the dataset exists only when whole)."""
    schema = pq.read_schema(Path(output_dir) / results[0].shard.path) if results else ds.DOCUMENT_SCHEMA
    manifest = finalize_dataset(output_dir, stage, results, schema, config, code, inputs)
    mark_done(ds.manifest_path(output_dir), key, {"rows": manifest.rows})
    return manifest


# ---------------------------------------------------------------------------------------------
# Orchestration helpers the flows call: submit a stage's tasks, wait, finalize, report.


def default_task_runner() -> Any:
    """One process per core on one machine (the stages are CPU-bound Python)."""
    from prefect.task_runners import ProcessPoolTaskRunner

    return ProcessPoolTaskRunner(max_workers=max(1, os.cpu_count() or 1))


def dask_task_runner(address: str | None) -> Any:
    """At scale: the same tasks on a Dask cluster (an existing scheduler address, or a local one)."""
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(address=address) if address else DaskTaskRunner()


def discover_snapshots(crawl: str) -> list[str]:
    fs, root = fsspec.core.url_to_fs(crawl.rstrip("/") + "/crawl-data")
    return sorted(Path(p).name for p in fs.ls(root, detail=False) if fs.isdir(p))


def list_files(crawl: str, snapshot: str, kinds: list[str], max_files: int | None) -> list[str]:
    from tasks.ingest import list_crawl_files

    files = list_crawl_files(crawl, snapshot, kinds=tuple(kinds))
    return files[:max_files] if max_files else files


def file_fingerprint(url: str) -> str:
    """Cheap identity of a crawl file for cache keys: size plus mtime or ETag, not a full read."""
    fs, path = fsspec.core.url_to_fs(url)
    info = fs.info(path)
    parts = {k: str(info[k]) for k in ("size", "mtime", "ETag", "LastModified", "etag") if k in info}
    return json.dumps(parts, sort_keys=True)


def dataset_rows(dataset_dir: Path) -> int:
    return ds.read_manifest(dataset_dir).rows


class RefreshReport:
    """Per-stage counts of a refresh: a Prefect table artifact, MLflow metrics, the CLI's table."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.extras: dict[str, Any] = {}
        self._progress: dict[str, Any] = {}

    def add(self, snapshot: str, manifest: ds.Manifest) -> None:
        stats = manifest.stats
        dropped = stats.get("dropped", {})
        quarantined = stats.get("quarantined", {})
        self.rows.append(
            {
                "snapshot": snapshot,
                "stage": manifest.stage,
                "in": stats.get("docs_in", 0),
                "kept": stats.get("kept", 0),
                "dropped": sum(dropped.values()),
                "quarantined": sum(quarantined.values()),
                "by_rule": ", ".join(f"{k}={v}" for k, v in sorted(dropped.items(), key=lambda kv: -kv[1])),
                "quarantine_reasons": ", ".join(f"{k}={v}" for k, v in sorted(quarantined.items())),
            }
        )

    def progress(self, label: str, done: int, total: int) -> None:
        """A progress artifact per long stage, updated as its shards finish."""
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        percent = 100.0 * done / max(total, 1)
        description = f"{label}: {done}/{total} shards"
        get_run_logger().info(description)
        if label not in self._progress:
            self._progress[label] = create_progress_artifact(progress=percent, description=description)
        else:
            update_progress_artifact(self._progress[label], progress=percent, description=description)

    def publish(self) -> None:
        from prefect.artifacts import create_table_artifact

        create_table_artifact(
            key="data-refresh-stage-counts",
            table=self.rows,
            description="Documents in, kept, dropped by rule and quarantined, per snapshot and stage.",
        )
        if "dedup" in self.extras:
            create_table_artifact(
                key="dedup-clusters",
                table=self.extras["dedup"],
                description="Duplicate clusters found per snapshot: sizes and removals.",
            )
        if "tokenizer" in self.extras:
            create_table_artifact(
                key="tokenizer-fertility",
                table=self.extras["tokenizer"],
                description="Bytes per token and tokens per word on held-out documents, per language.",
            )

    def format_table(self) -> str:
        header = (
            f"{'snapshot':<18} {'stage':<10} {'in':>8} {'kept':>8} {'dropped':>8} {'quarant.':>8}  top rules"
        )
        lines = [header, "-" * len(header)]
        for r in self.rows:
            lines.append(
                f"{r['snapshot']:<18} {r['stage']:<10} {r['in']:>8} {r['kept']:>8} {r['dropped']:>8} "
                f"{r['quarantined']:>8}  {r['by_rule'][:80]}"
            )
        return "\n".join(lines)


def _submit_and_wait(
    calls: list[tuple[Any, dict[str, Any], Path, str]], label: str, report: RefreshReport
) -> list:
    """Submit (task, kwargs, output, key) calls; refresh cache entries whose output is stale."""
    from prefect.futures import as_completed

    futures = [
        task_fn.with_options(refresh_cache=not is_done(output, key)).submit(**kwargs, key=key)
        for task_fn, kwargs, output, key in calls
    ]
    done = 0
    report.progress(label, done, len(futures))
    for _ in as_completed(futures):
        done += 1
        report.progress(label, done, len(futures))
    return [f.result() for f in futures]


def _finalize(
    output_dir: Path,
    stage: str,
    results: list[ShardResult],
    config: BaseModel,
    code: str,
    inputs: list[ds.InputRef],
) -> ds.Manifest:
    key = cache_key(
        f"{stage}-finalize",
        config,
        code,
        *(r.shard.sha256 for r in results),
        *(r.rejects.sha256 for r in results),
    )
    return finalize_stage.with_options(refresh_cache=not is_done(ds.manifest_path(output_dir), key))(
        str(output_dir), stage, results, config.model_dump(mode="json"), code, inputs, key=key
    )


def run_ingest(
    files: list[str], output_dir: Path, config: BaseModel, snapshot: str, report: RefreshReport
) -> Path:
    from tasks import ingest

    code = code_version(ingest, sys.modules.get("tasks.extract") or importlib.import_module("tasks.extract"))
    fingerprints = [file_fingerprint(f) for f in files]
    calls = [
        (
            ingest_shard,
            {
                "source": f,
                "output_dir": str(output_dir),
                "index": i,
                "config": config.model_dump(mode="json"),
                "snapshot": snapshot,
            },
            output_dir / shard_name(i),
            cache_key("ingest", config, code, f, fp),
        )
        for i, (f, fp) in enumerate(zip(files, fingerprints, strict=True))
    ]
    results = _submit_and_wait(calls, f"{snapshot} ingest", report)
    inputs = [ds.InputRef(path=f, fingerprint=fp) for f, fp in zip(files, fingerprints, strict=True)]
    report.add(snapshot, _finalize(output_dir, "ingest", results, config, code, inputs))
    return output_dir


def run_document_stage(
    stage: str, config: BaseModel, input_dir: Path, output_dir: Path, snapshot: str, report: RefreshReport
) -> Path:
    module = importlib.import_module(DOCUMENT_STAGES[stage][0])
    code = code_version(module)
    manifest = ds.read_manifest(input_dir)
    calls = [
        (
            stage_shard,
            {
                "stage": stage,
                "config": config.model_dump(mode="json"),
                "input_shard": str(input_dir / shard.path),
                "output_dir": str(output_dir),
                "index": i,
            },
            output_dir / shard_name(i),
            cache_key(stage, config, code, shard.sha256),
        )
        for i, shard in enumerate(manifest.shards)
    ]
    results = _submit_and_wait(calls, f"{snapshot} {stage}", report)
    report.add(snapshot, _finalize(output_dir, stage, results, config, code, [ds.input_ref(input_dir)]))
    return output_dir


@task(name="dedup", task_run_name="dedup-{label}", **SHARD_TASK_OPTIONS)
def dedup_task(
    input_dir: str,
    output_dir: str,
    index_dir: str,
    config: dict[str, Any],
    work_dir: str,
    label: str,
    key: str,
) -> ds.Manifest:
    from tasks import dedup

    manifest = dedup.dedup_datasets(
        [input_dir], output_dir, index_dir, dedup.DedupConfig.model_validate(config), work_dir
    )
    mark_done(ds.manifest_path(output_dir), key, {"rows": manifest.rows})
    return manifest


def run_dedup(
    clean: dict[str, Path], index_dir: Path, config: BaseModel, workdir: Path, report: RefreshReport
) -> list[Path]:
    """Deduplicate snapshot by snapshot, oldest first, each against the index of all kept before.

    A snapshot's key chains the previous one's, so redoing an older snapshot redoes the later ones.
    """
    from tasks import dedup

    code = code_version(dedup)
    outputs, previous_key, cluster_rows = [], "", []
    for snapshot, input_dir in clean.items():
        output_dir = input_dir.parent / "dedup"
        key = cache_key("dedup", config, code, ds.manifest_sha256(input_dir), previous_key)
        manifest = dedup_task.with_options(refresh_cache=not is_done(ds.manifest_path(output_dir), key))(
            str(input_dir),
            str(output_dir),
            str(index_dir),
            config.model_dump(mode="json"),
            str(workdir / ".dedup-work" / snapshot),
            snapshot,
            key=key,
        )
        report.add(snapshot, manifest)
        cluster_rows.append({"snapshot": snapshot, **_flat_scalars(manifest.extra.get("dedup", {}))})
        outputs.append(output_dir)
        previous_key = key
    report.extras["dedup"] = cluster_rows
    return outputs


def _flat_scalars(data: dict[str, Any]) -> dict[str, Any]:
    """Scalars of a report for one table row; nested parts as compact JSON."""
    return {k: v if isinstance(v, int | float | str) else json.dumps(v)[:300] for k, v in data.items()}


@task(name="train-tokenizer", **SHARD_TASK_OPTIONS)
def tokenizer_task(input_dirs: list[str], output_dir: str, config: dict[str, Any], key: str) -> ds.Manifest:
    from tasks import tokenizer

    manifest = tokenizer.train_tokenizer(
        input_dirs, output_dir, tokenizer.TokenizerConfig.model_validate(config)
    )
    mark_done(ds.manifest_path(output_dir), key, {"rows": manifest.rows})
    return manifest


def run_tokenizer(inputs: list[Path], output_dir: Path, config: BaseModel, report: RefreshReport) -> Path:
    from tasks import tokenizer

    key = cache_key("tokenizer", config, code_version(tokenizer), *(ds.manifest_sha256(d) for d in inputs))
    manifest = tokenizer_task.with_options(refresh_cache=not is_done(ds.manifest_path(output_dir), key))(
        [str(d) for d in inputs], str(output_dir), config.model_dump(mode="json"), key=key
    )
    report.extras["tokenizer"] = tokenizer.fertility_rows(manifest)
    return output_dir


@task(name="pack", **SHARD_TASK_OPTIONS)
def pack_task(
    input_dirs: list[str], tokenizer_dir: str, output_dir: str, config: dict[str, Any], key: str
) -> ds.Manifest:
    from tasks import pack

    manifest = pack.pack_datasets(
        input_dirs, tokenizer_dir, output_dir, pack.PackConfig.model_validate(config)
    )
    mark_done(ds.manifest_path(output_dir), key, {"rows": manifest.rows})
    return manifest


def run_pack(
    inputs: list[Path], tokenizer_dir: Path, output_dir: Path, config: BaseModel, report: RefreshReport
) -> Path:
    from tasks import pack

    fingerprints = [ds.manifest_sha256(d) for d in [*inputs, tokenizer_dir]]
    key = cache_key("pack", config, code_version(pack), *fingerprints)
    manifest = pack_task.with_options(refresh_cache=not is_done(ds.manifest_path(output_dir), key))(
        [str(d) for d in inputs], str(tokenizer_dir), str(output_dir), config.model_dump(mode="json"), key=key
    )
    report.extras["pack"] = manifest.stats
    return output_dir


def log_refresh_to_mlflow(
    params: BaseModel, report: RefreshReport, outputs: dict[str, Any]
) -> tuple[str, str]:
    """Log the refresh as an MLflow run; returns (tracking URI, run id)."""
    from prefect.context import get_run_context

    from tasks import tracking

    context = get_run_context()
    run_name = getattr(getattr(context, "flow_run", None), "name", None) or "data-refresh"
    workdir = Path(params.workdir).resolve()
    uri = tracking.tracking_uri(params.mlflow_tracking_uri, workdir)
    return uri, tracking.log_data_refresh(
        uri, params.mlflow_experiment, run_name, params, report.rows, outputs
    )
