"""The thin Prefect layer over the stages: one generic, cached, retried task runs any stage.

A stage that works shard by shard (``tasks.registry``: scope "shard") is one task per shard, then
one task writing its manifest; a stage over whole datasets (dedup, tokenizer, pack) is one task.
Cache keys come from the work itself (stage name + config + the source of every project module the
stage imports + what identifies its inputs), never from the flow run, so a nightly run redoes only
what changed. Each task leaves a small ``.done`` record naming its key, the parts of that key and
where its output is: the flow asks Prefect to refresh a cache entry whose output on disk is missing
or was since overwritten by other work, and ``pretrain cache status`` reads the parts to say why a
key changed.

The flow says which stage reads what and where each dataset lives; it runs through a ``Runner``:
``PrefectRunner`` submits the tasks, ``StatusRunner`` only says which a run would redo and why.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import fsspec
from prefect import get_run_logger, task
from prefect.tasks import exponential_backoff
from pydantic import BaseModel

from tasks import dataset as ds
from tasks import registry, storage
from tasks.atomic import atomic_write_text, remove_stale_temp_files
from tasks.prefect_artifacts import artifact_key
from tasks.stage import CacheKey, ShardResult, code_version_of, config_json, finalize_dataset, shard_name

DONE_DIR = ".done"
BUILD_DIR = ".build.tmp"  # where a published dataset is built; a TEMP_GLOB name: litter if left


# ---------------------------------------------------------------------------------------------
# Work, its cache key, and the done record that says which key made the output on disk


class Work(BaseModel):
    """One task's worth of a stage: the keyword arguments of the stage's ``run``, its key, and the
    done record (``record``) that will name the output (``output``, unless it is published)."""

    key: CacheKey
    label: str
    call: dict[str, Any]
    record: str
    output: str
    publish_to: str | None = None  # a published dataset's root: the output is the version dir


class Built(BaseModel):
    """What a whole-dataset task returns: where the dataset is and its manifest."""

    path: str
    manifest: ds.Manifest


def record_path(output: str | Path) -> Path:
    output = Path(output)
    return output.parent / DONE_DIR / f"{output.name}.json"


def mark_done(record: str | Path, key: CacheKey, output: str | Path, result: BaseModel) -> None:
    record = Path(record)
    payload = {
        "key": key.value,
        "parts": key.model_dump(mode="json"),
        "output": os.path.relpath(output, record.parent),
        "result": result.model_dump(mode="json"),
    }
    atomic_write_text(record, json.dumps(payload, sort_keys=True))


def read_record(record: str | Path) -> dict[str, Any] | None:
    record = Path(record)
    return json.loads(record.read_text()) if record.is_file() else None


def _output_of(record: Path, data: dict[str, Any]) -> Path:
    return record.parent / data["output"]


def is_done(work: Work) -> bool:
    """True when the work's done record names its key and the output it names exists."""
    return not why_redo(work)


def why_redo(work: Work) -> list[str]:
    """Why ``work`` would run again: nothing when its output on disk was made by this very work."""
    record = Path(work.record)
    data = read_record(record)
    if data is None:
        return ["not run yet, or invalidated"]
    if data["key"] == work.key.value:
        return [] if _output_of(record, data).exists() else ["output missing"]
    before = CacheKey.model_validate(data["parts"])
    reasons = []
    if config_json(before.config) != config_json(work.key.config):
        changed = _changed_leaves(before.config, work.key.config)
        reasons.append(f"config: {', '.join(changed)}")
    changed_modules = sorted(
        m
        for m in before.modules.keys() | work.key.modules.keys()
        if before.modules.get(m) != work.key.modules.get(m)
    )
    if changed_modules:
        reasons.append(f"code: {', '.join(changed_modules)}")
    if before.inputs != work.key.inputs:
        reasons.append("input changed")
    return reasons or ["key changed"]


def _changed_leaves(before: Any, after: Any, prefix: str = "") -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        out: list[str] = []
        for k in sorted(before.keys() | after.keys()):
            out += _changed_leaves(before.get(k), after.get(k), f"{prefix}{k}.")
        return out
    return [] if before == after else [prefix.rstrip(".")]


def invalidate(workdir: str | Path, stage: str) -> list[Path]:
    """Forget the work of ``stage`` and of every later stage under ``workdir``: their done records
    go, so the next refresh runs them again whatever Prefect's cache holds. Returns the records removed."""
    stages = set(registry.stages_from(stage))
    removed = []
    for record in sorted(Path(workdir).rglob(f"{DONE_DIR}/*.json")):
        data = read_record(record)
        if data and data.get("parts", {}).get("stage") in stages:
            record.unlink()
            removed.append(record)
    return removed


# ---------------------------------------------------------------------------------------------
# The generic tasks


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


TASK_OPTIONS: dict[str, Any] = {
    "cache_key_fn": _key_from_parameters,
    "persist_result": True,
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": _is_transient,
}


@task(name="stage", task_run_name="{label}", **TASK_OPTIONS)
def stage_task(label: str, work: Work, key: str) -> ShardResult | Built:
    """Run one unit of any stage; a whole-dataset output is published when the work says so."""
    spec = registry.stage(work.key.stage)
    if work.publish_to:
        shutil.rmtree(work.call["output_dir"], ignore_errors=True)  # a killed build's leftovers
    result = spec.run(spec.config(work.key.config), **work.call)
    if isinstance(result, ShardResult):
        mark_done(work.record, work.key, work.output, result)
        return result
    path = Path(work.output).parent
    if work.publish_to:
        path = ds.publish_version(path, work.publish_to)
    built = Built(path=str(path), manifest=result)
    mark_done(work.record, work.key, ds.manifest_path(path), built)
    return built


@task(name="finalize-dataset", task_run_name="finalize-{label}", **TASK_OPTIONS)
def finalize_task(
    label: str, work: Work, results: list[ShardResult], inputs: list[ds.InputRef], key: str
) -> ds.Manifest:
    """Write a per-shard stage's manifest over its shards (last: the dataset exists only when whole)."""
    import pyarrow.parquet as pq

    output_dir = Path(work.output).parent
    schema = pq.read_schema(output_dir / results[0].shard.path) if results else ds.DOCUMENT_SCHEMA
    config = registry.stage(work.key.stage).config(work.key.config)
    code = code_version_of(work.key.modules)
    manifest = finalize_dataset(output_dir, work.key.stage, results, schema, config, code, inputs)
    mark_done(work.record, work.key, work.output, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
# Planning a stage's work: the same for a run and for `pretrain cache status`


@dataclass
class Sources:
    """What a per-shard stage reads: one path per shard, what identifies each, the manifest's inputs."""

    paths: list[str]
    identities: list[list[str]]
    refs: list[ds.InputRef]


def file_fingerprint(url: str) -> str:
    """Cheap identity of a crawl file for cache keys: size plus mtime or ETag, not a full read."""
    fs, path = fsspec.core.url_to_fs(url)
    info = fs.info(path)
    parts = {k: str(info[k]) for k in ("size", "mtime", "ETag", "LastModified", "etag") if k in info}
    return json.dumps(parts, sort_keys=True)


def crawl_sources(files: list[str]) -> Sources:
    fingerprints = [file_fingerprint(f) for f in files]
    return Sources(
        paths=list(files),
        identities=[[f, fp] for f, fp in zip(files, fingerprints, strict=True)],
        refs=[ds.InputRef(path=f, fingerprint=fp) for f, fp in zip(files, fingerprints, strict=True)],
    )


def dataset_sources(dataset_dir: Path) -> Sources:
    manifest = ds.read_manifest(dataset_dir)
    return Sources(
        paths=[str(dataset_dir / s.path) for s in manifest.shards],
        identities=[[s.sha256] for s in manifest.shards],
        refs=[ds.input_ref(dataset_dir)],
    )


def _key(
    stage: str, config: BaseModel, modules: dict[str, str], inputs: list[str], step: str = "run"
) -> CacheKey:
    return CacheKey(
        stage=stage, step=step, config=config.model_dump(mode="json"), modules=modules, inputs=inputs
    )


def shard_works(
    stage: str, config: BaseModel, sources: Sources, output_dir: Path, snapshot: str
) -> list[Work]:
    modules = registry.stage(stage).module_hashes()
    works = []
    for i, (path, identity) in enumerate(zip(sources.paths, sources.identities, strict=True)):
        output = output_dir / shard_name(i)
        works.append(
            Work(
                key=_key(stage, config, modules, identity),
                label=f"{stage}-{snapshot}-{i:05d}",
                call={"source": path, "output_dir": str(output_dir), "index": i, "snapshot": snapshot},
                record=str(record_path(output)),
                output=str(output),
            )
        )
    return works


def finalize_work(
    stage: str,
    config: BaseModel,
    output_dir: Path,
    results: list[ShardResult],
    sources: Sources,
    snapshot: str,
) -> Work:
    identities = [
        *(r.shard.sha256 for r in results),
        *(r.rejects.sha256 for r in results),
        # a dataset counts by its digest, wherever it is (another workdir, a staging copy)
        *(ref.model_dump_json(exclude={"path"} if ref.digest else set()) for ref in sources.refs),
    ]
    manifest = ds.manifest_path(output_dir)
    return Work(
        key=_key(stage, config, registry.stage(stage).module_hashes(), identities, step="finalize"),
        label=f"{stage}-{snapshot}",
        call={},
        record=str(record_path(manifest)),
        output=str(manifest),
    )


def dataset_work(
    stage: str,
    config: BaseModel,
    inputs: list[Path],
    output_dir: Path,
    label: str,
    *,
    reads: dict[str, Path] | None = None,
    scratch: dict[str, Path] | None = None,
    after: str = "",
    publish_to: Path | None = None,
) -> Work:
    """A whole-dataset stage's one task. ``reads``: other datasets it reads (part of the key);
    ``scratch``: its working directories (not); ``after``: the key of work it must follow;
    ``publish_to``: build in a scratch dir under that root and publish as a version there."""
    reads, scratch = reads or {}, scratch or {}
    identities = [ds.dataset_digest(d) for d in [*inputs, *reads.values()]] + ([after] if after else [])
    build_dir = publish_to / BUILD_DIR if publish_to else output_dir
    manifest = ds.manifest_path(build_dir)
    return Work(
        key=_key(stage, config, registry.stage(stage).module_hashes(), identities),
        label=label,
        call={
            "inputs": [str(d) for d in inputs],
            "output_dir": str(build_dir),
            **{k: str(v) for k, v in {**reads, **scratch}.items()},
        },
        record=str((publish_to or output_dir) / DONE_DIR / f"{stage}.json"),
        output=str(manifest),
        publish_to=str(publish_to) if publish_to else None,
    )


def done_output(work: Work) -> Path:
    """Where the output of finished ``work`` is (for a published dataset: its version dir)."""
    record = Path(work.record)
    data = read_record(record)
    assert data is not None, work.record
    output = _output_of(record, data).resolve()
    return output.parent if output.name == ds.MANIFEST else output


# ---------------------------------------------------------------------------------------------
# Runners: how the flow's plan is carried out


@dataclass
class Output:
    """A stage's dataset as the flow sees it: where it is, and the key of the work that made it."""

    path: Path
    key: str = ""


class RefreshReport:
    """Per-stage counts of a refresh, and each stage's own tables (from its manifest, through the
    registry): a Prefect table artifact, MLflow metrics and artifacts, the CLI's table."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.tables: dict[str, list[dict[str, Any]]] = {}
        self.datasets: dict[str, str] = {}
        self.crawl: dict[str, list[ds.InputRef]] = {}  # snapshot -> the crawl files it read
        self._progress: dict[str, Any] = {}

    def add(self, snapshot: str, manifest: ds.Manifest, dataset_dir: Path, name: str) -> None:
        """Count one stage's dataset; ``name`` is how MLflow lists it (``<snapshot>/<stage>``, ...)."""
        stats = manifest.stats
        dropped = stats.get("dropped", {})
        quarantined = stats.get("quarantined", {})
        docs_in = stats.get("docs_in", 0)
        self.rows.append(
            {
                "snapshot": snapshot,
                "stage": manifest.stage,
                "in": docs_in,
                # a stage that passes every document on (the tokenizer) reports no "kept"
                "kept": stats.get("kept", docs_in - sum(dropped.values()) - sum(quarantined.values())),
                "dropped": sum(dropped.values()),
                "quarantined": sum(quarantined.values()),
                "by_rule": ", ".join(f"{k}={v}" for k, v in sorted(dropped.items(), key=lambda kv: -kv[1])),
                "quarantine_reasons": ", ".join(f"{k}={v}" for k, v in sorted(quarantined.items())),
            }
        )
        spec = registry.stage(manifest.stage)
        for key, rows in (spec.tables(manifest) if spec.tables else {}).items():
            self.tables.setdefault(key, []).extend({"snapshot": snapshot, **r} for r in rows)
        self.datasets[name] = str(dataset_dir)

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
        for key, rows in self.tables.items():
            create_table_artifact(key=artifact_key(key), table=rows, description=f"{key}, per snapshot.")

    def format_table(self) -> str:
        return format_stage_table(self.rows)


def format_stage_table(rows: list[dict[str, Any]]) -> str:
    header = f"{'snapshot':<18} {'stage':<10} {'in':>8} {'kept':>8} {'dropped':>8} {'quarant.':>8}  top rules"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['snapshot']:<18} {r['stage']:<10} {r['in']:>8} {r['kept']:>8} {r['dropped']:>8} "
            f"{r['quarantined']:>8}  {r['by_rule'][:80]}"
        )
    return "\n".join(lines)


def _dataset_name(stage: str, snapshot: str | None) -> str:
    return f"{snapshot}/{stage}" if snapshot else {"pack": "packed"}.get(stage, stage)


class PrefectRunner:
    """Runs the flow's plan as Prefect tasks and reports every stage's counts. With a ``mirror`` (a
    workdir on object storage) each stage's output is published to the store once it is whole."""

    def __init__(self, report: RefreshReport, mirror: storage.Mirror | None = None):
        self.report = report
        self.mirror = mirror

    def _publish(self) -> None:
        if self.mirror is not None:
            self.mirror.push()

    def shard_stage(
        self, stage: str, config: BaseModel, source: list[str] | Output, output_dir: Path, snapshot: str
    ) -> Output:
        """Run a per-shard stage over crawl files (a list) or the shards of a dataset."""
        from prefect.futures import as_completed

        remove_stale_temp_files(output_dir)
        sources = crawl_sources(source) if isinstance(source, list) else dataset_sources(source.path)
        if isinstance(source, list):
            self.report.crawl[snapshot] = sources.refs
        works = shard_works(stage, config, sources, output_dir, snapshot)
        futures = [
            stage_task.with_options(refresh_cache=not is_done(w)).submit(w.label, w, key=w.key.value)
            for w in works
        ]
        label = f"{snapshot} {stage}"
        self.report.progress(label, 0, len(futures))
        for done, _ in enumerate(as_completed(futures), 1):
            self.report.progress(label, done, len(futures))
        results = [f.result() for f in futures]
        final = finalize_work(stage, config, output_dir, results, sources, snapshot)
        manifest = finalize_task.with_options(refresh_cache=not is_done(final))(
            final.label, final, results, sources.refs, key=final.key.value
        )
        self.report.add(snapshot, manifest, output_dir, _dataset_name(stage, snapshot))
        self._publish()
        return Output(output_dir, final.key.value)

    def dataset_stage(
        self,
        stage: str,
        config: BaseModel,
        inputs: list[Output],
        output_dir: Path,
        snapshot: str | None = None,
        *,
        reads: dict[str, Output] | None = None,
        after: Output | None = None,
        scratch: dict[str, Path] | None = None,
        publish_to: Path | None = None,
    ) -> Output:
        """Run a whole-dataset stage into ``output_dir``, or as a version under ``publish_to``.
        ``reads``, ``after``, ``scratch``: see ``dataset_work``."""
        work = dataset_work(
            stage,
            config,
            [i.path for i in inputs],
            output_dir,
            _label(stage, snapshot),
            reads={k: v.path for k, v in (reads or {}).items()},
            scratch=scratch,
            after=after.key if after else "",
            publish_to=publish_to,
        )
        for directory in (output_dir, *(scratch or {}).values()):
            remove_stale_temp_files(directory)
        built = stage_task.with_options(refresh_cache=not is_done(work))(work.label, work, key=work.key.value)
        path = done_output(work)  # here, not where a cached result was first made (another staging copy)
        self.report.add(snapshot or "*", built.manifest, path, _dataset_name(stage, snapshot))
        self._publish()
        return Output(path, work.key.value)

    def document_count(self, dataset: Output) -> int:
        return ds.read_manifest(dataset.path).rows


def _label(stage: str, snapshot: str | None) -> str:
    return f"{stage}-{snapshot}" if snapshot else stage


@dataclass
class StatusRow:
    snapshot: str
    stage: str
    action: Literal["cached", "redo", "maybe"]  # maybe: only if what it reads comes out different
    reasons: list[str]


@dataclass
class StatusRunner:
    """Walks the flow's plan without running anything: which stage a run would redo, and why."""

    stages: list[StatusRow] = field(default_factory=list)
    _redone: dict[Path, str] = field(default_factory=dict)  # output -> "redo" | "maybe"

    def _row(self, stage: str, snapshot: str | None, output: Path, action: str, reasons: list[str]) -> Output:
        self.stages.append(StatusRow(snapshot or "*", stage, action, reasons))  # type: ignore[arg-type]
        if action != "cached":
            self._redone[output] = action
        return Output(output)

    def _upstream(self, inputs: list[Output]) -> list[str]:
        return [
            f"input: {i.path.parent.name}/{i.path.name} is redone, and may come out different"
            for i in inputs
            if i.path in self._redone
        ]

    def shard_stage(
        self, stage: str, config: BaseModel, source: list[str] | Output, output_dir: Path, snapshot: str
    ) -> Output:
        if isinstance(source, Output) and (upstream := self._upstream([source])):
            return self._row(stage, snapshot, output_dir, "maybe", upstream)
        sources = crawl_sources(source) if isinstance(source, list) else dataset_sources(source.path)
        works = shard_works(stage, config, sources, output_dir, snapshot)
        counts = Counter(reason for w in works for reason in why_redo(w))
        if counts:
            reasons = [f"{r} ({n}/{len(works)} shards)" for r, n in sorted(counts.items())]
            return self._row(stage, snapshot, output_dir, "redo", reasons)
        results = [ShardResult.model_validate(read_record(w.record)["result"]) for w in works]  # type: ignore[index]
        final = finalize_work(stage, config, output_dir, results, sources, snapshot)
        reasons = why_redo(final)
        self._row(stage, snapshot, output_dir, "redo" if reasons else "cached", reasons)
        return Output(output_dir, final.key.value)

    def dataset_stage(
        self,
        stage: str,
        config: BaseModel,
        inputs: list[Output],
        output_dir: Path,
        snapshot: str | None = None,
        *,
        reads: dict[str, Output] | None = None,
        after: Output | None = None,
        scratch: dict[str, Path] | None = None,
        publish_to: Path | None = None,
    ) -> Output:
        reads = reads or {}
        target = publish_to or output_dir
        if after and after.path in self._redone:  # its key chains that work's key
            reason = f"the {stage} it follows ({after.path.parent.name}) is redone"
            return self._row(stage, snapshot, target, self._redone[after.path], [reason])
        if upstream := self._upstream([*inputs, *reads.values()]):
            return self._row(stage, snapshot, target, "maybe", upstream)
        work = dataset_work(
            stage,
            config,
            [i.path for i in inputs],
            output_dir,
            _label(stage, snapshot),
            reads={k: v.path for k, v in reads.items()},
            scratch=scratch,
            after=after.key if after else "",
            publish_to=publish_to,
        )
        if reasons := why_redo(work):
            return self._row(stage, snapshot, target, "redo", reasons)
        self._row(stage, snapshot, target, "cached", [])
        return Output(done_output(work), work.key.value)

    def document_count(self, dataset: Output) -> int:
        return 1 if dataset.path in self._redone else ds.read_manifest(dataset.path).rows

    def format_table(self) -> str:
        lines = [f"{'snapshot':<18} {'stage':<10} {'action':<7} why"]
        for r in self.stages:
            why = "; ".join(r.reasons) or "its output was made by this config, code and input"
            lines.append(f"{r.snapshot:<18} {r.stage:<10} {r.action:<7} {why}")
        return "\n".join(lines)


Runner = PrefectRunner | StatusRunner


# ---------------------------------------------------------------------------------------------
# Task runners and MLflow


def default_task_runner() -> Any:
    """One process per core on one machine (the stages are CPU-bound Python)."""
    from prefect.task_runners import ProcessPoolTaskRunner

    return ProcessPoolTaskRunner(max_workers=max(1, os.cpu_count() or 1))


def dask_task_runner(address: str | None) -> Any:
    """At scale: the same tasks on a Dask cluster (an existing scheduler address, or a local one).

    An address is checked first: an unreachable scheduler is one clear error in seconds, not a
    traceback after distributed's own 30 s connect timeout."""
    from prefect_dask import DaskTaskRunner

    if not address:
        return DaskTaskRunner()
    from distributed import Client

    try:
        Client(address, timeout=10).close()
    except OSError as exc:
        raise ConnectionError(f"cannot reach the Dask scheduler at {address} within 10 s") from exc
    return DaskTaskRunner(address=address)


def log_refresh_to_mlflow(params: BaseModel, report: RefreshReport) -> tuple[str, str]:
    """Log the refresh as an MLflow run; returns (tracking URI, run id)."""
    from prefect.context import get_run_context

    from tasks import tracking

    context = get_run_context()
    run_name = getattr(getattr(context, "flow_run", None), "name", None) or "data-refresh"
    workdir = storage.local_workdir(params.workdir)  # an embedded SQLite store stays local
    uri = tracking.tracking_uri(params.mlflow_tracking_uri, workdir)
    run_id = tracking.log_data_refresh(
        uri,
        params.mlflow_experiment,
        run_name,
        params,
        report.rows,
        report.tables,
        report.datasets,
        report.crawl,
    )
    return uri, run_id
