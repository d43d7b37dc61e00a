"""The data refresh: crawl -> clean, language-labelled, deduplicated documents -> training data.

Thin orchestration only: ``plan`` says which stage reads what and where each dataset lives; every
step is a cached task from ``tasks.prefect_tasks`` over datasets on disk. Run it nightly: crawl
files already processed hit the cache, dedup inserts only the new snapshot into the persistent
index, and only what changed is redone. The tokenizer and the packed data are published as
immutable versions under ``workdir/tokenizer`` and ``workdir/packed``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field

from tasks import dataset as ds
from tasks import prefect_tasks as pt
from tasks import storage, workdir_lock
from tasks.audit import AuditConfig, publish_audits
from tasks.boilerplate import BoilerplateConfig
from tasks.classifier import ClassifierConfig
from tasks.dedup import DedupConfig
from tasks.ingest import IngestConfig, resolve_crawl
from tasks.langid import LangIdConfig
from tasks.pack import PackConfig
from tasks.pii import PiiConfig
from tasks.quality import QualityConfig
from tasks.tokenizer import TokenizerConfig

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CRAWL = REPO.parent / "shared" / "corpus" / "crawl"


class DataRefreshParams(BaseModel):
    """Run form of the data refresh. Every stage's settings are its own section."""

    crawl: str = Field(
        default=str(SAMPLE_CRAWL),
        description="Crawl root holding `crawl-data/{SNAPSHOT}/warc.paths.gz`, a `*.paths.gz` listing, "
        "a glob of WARC/WET files or a single one; a local path, s3:// or https:// URL.",
    )
    snapshots: list[str] = Field(
        default_factory=list,
        description="Snapshot ids to process, e.g. CC-MAIN-2026-40, oldest first. Empty: every "
        "snapshot found under the crawl root, in name order.",
    )
    kinds: list[Literal["warc", "wet"]] = Field(
        default=["warc", "wet"], description="Which file listings of each snapshot to read."
    )
    workdir: str = Field(default="workdir", description="Where datasets, the dedup index and caches live.")
    max_files: int | None = Field(
        default=None, ge=1, description="Process at most this many crawl files per snapshot (trial runs)."
    )
    ingest: IngestConfig = Field(
        default_factory=IngestConfig, description="Reading WARC/WET and extracting text."
    )
    langid: LangIdConfig = Field(
        default_factory=LangIdConfig, description="fastText language identification."
    )
    quality: QualityConfig = Field(default_factory=QualityConfig, description="Gopher, C4, FineWeb rules.")
    classifier: ClassifierConfig | None = Field(
        default=None,
        description="fastText classifiers after quality (e.g. `{models: [{path: workdir/classifiers/quality}]}`, "
        "a model from `pretrain classifier train`): a score column each, per-language thresholds. Empty: off.",
    )
    pii: PiiConfig = Field(default_factory=PiiConfig, description="Scrubbing emails, IP addresses, phones.")
    boilerplate: BoilerplateConfig | None = Field(
        default=None,
        description="Line-level boilerplate removal before dedup (lines repeated across a host's or the "
        "corpus's pages), with counts kept across refreshes. Empty: off.",
    )
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Exact and MinHash near-dedup.")
    audit: AuditConfig = Field(
        default_factory=AuditConfig,
        description="Samples of kept and dropped documents per rule and language of the filtering stages, "
        "for people to check (Prefect Markdown artifacts, MLflow `audit/`).",
    )
    build_training_data: bool = Field(
        default=True, description="Also train the tokenizer and pack token shards for training."
    )
    tokenizer_dir: str | None = Field(
        default=None,
        description="Use this existing tokenizer instead of training one (keeps token ids stable across "
        "nightly refreshes): a published root such as `workdir/tokenizer` (its LATEST version) or a "
        "version directory.",
    )
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="BPE tokenizer training.")
    pack: PackConfig = Field(default_factory=PackConfig, description="Tokenizing and packing into shards.")
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking server. Empty: $MLFLOW_TRACKING_URI, else SQLite in the workdir.",
    )
    mlflow_experiment: str = Field(default="data-refresh", description="MLflow experiment name.")
    lock_wait_s: float = Field(
        default=0,
        ge=0,
        description="One refresh writes a workdir at a time: when another holds it, wait up to this many "
        "seconds, then stop with a message naming the holder. 0: stop at once.",
    )


def chained_index_stage(
    runner: pt.Runner, stage: str, config: Any, datasets: dict[str, pt.Output], workdir: Path
) -> list[pt.Output]:
    """A stage with a persistent index (boilerplate counts, dedup), snapshot by snapshot, oldest
    first, each against the index of all before: a snapshot's key chains the previous one's, so
    redoing an older snapshot redoes the later ones."""
    outputs: list[pt.Output] = []
    previous = None
    for snapshot, dataset in datasets.items():
        previous = runner.dataset_stage(
            stage,
            config,
            [dataset],
            workdir / snapshot / stage,
            snapshot,
            after=previous,
            scratch={
                "index_dir": workdir / f"{stage}-index",
                "work_dir": workdir / f".{stage}-work" / snapshot,
            },
        )
        outputs.append(previous)
    return outputs


def plan(params: DataRefreshParams, crawl: dict[str, list[str]], runner: pt.Runner) -> dict[str, Any]:
    """Which stage reads what and where each dataset lives; ``runner`` runs it or only inspects it."""
    workdir = storage.local_workdir(params.workdir)  # on object storage: its local staging copy
    clean = {}
    for snapshot, files in crawl.items():
        previous = runner.shard_stage("ingest", params.ingest, files, workdir / snapshot / "ingest", snapshot)
        for stage in ("langid", "quality", "classifier", "pii"):
            if getattr(params, stage) is None:  # an opt-in stage left off
                continue
            previous = runner.shard_stage(
                stage, getattr(params, stage), previous, workdir / snapshot / stage, snapshot
            )
        clean[snapshot] = previous

    if params.boilerplate is not None:
        clean = dict(
            zip(
                clean,
                chained_index_stage(runner, "boilerplate", params.boilerplate, clean, workdir),
                strict=True,
            )
        )
    documents = chained_index_stage(runner, "dedup", params.dedup, clean, workdir)

    outputs: dict[str, Any] = {"documents": [str(d.path) for d in documents]}
    if params.build_training_data and any(runner.document_count(d) for d in documents):
        # Published as immutable versions: a refresh never rewrites data a training run reads.
        tokenizer = (
            pt.Output(ds.resolve_version(params.tokenizer_dir))
            if params.tokenizer_dir
            else runner.dataset_stage(
                "tokenizer",
                params.tokenizer,
                documents,
                workdir / "tokenizer",
                publish_to=workdir / "tokenizer",
            )
        )
        packed = runner.dataset_stage(
            "pack",
            params.pack,
            documents,
            workdir / "packed",
            reads={"tokenizer_dir": tokenizer},
            publish_to=workdir / "packed",
        )
        outputs.update(tokenizer=str(tokenizer.path), packed=str(packed.path))
    return outputs


def crawl_files(params: DataRefreshParams) -> dict[str, list[str]]:
    """Snapshot -> its crawl files, through the ingest stage's resolver (every documented form)."""
    return resolve_crawl(params.crawl, params.snapshots, params.kinds, params.max_files)


def cache_status(params: DataRefreshParams) -> pt.StatusRunner:
    """Which stages a refresh with ``params`` would redo, and why, without running anything."""
    status = pt.StatusRunner()
    storage.pulled_mirror(params.workdir)  # on object storage: read its committed state
    plan(params, crawl_files(params), status)
    return status


@flow(name="data-refresh", log_prints=True, task_runner=pt.default_task_runner())
def data_refresh(params: DataRefreshParams = DataRefreshParams()) -> dict:  # noqa: B008 (the UI form's defaults)
    """Ingest, label, filter, scrub and deduplicate each snapshot; then build training data."""
    from prefect.runtime import flow_run

    # Held by this process, the flow's; its tasks (process pool, Dask) never take it.
    with workdir_lock.hold(storage.local_workdir(params.workdir), params.lock_wait_s, flow_run=flow_run.id):
        return refresh(params)


def refresh(params: DataRefreshParams) -> dict:
    """The data refresh's steps, run by the flow while it holds the workdir."""
    crawl = crawl_files(params)
    get_run_logger().info(
        "data refresh of %s: snapshots %s into %s",
        params.crawl,
        list(crawl),
        params.workdir if storage.is_remote(params.workdir) else Path(params.workdir).resolve(),
    )
    report = pt.RefreshReport()
    # A workdir on object storage: pull its committed state, publish each stage as it completes.
    mirror = storage.pulled_mirror(params.workdir)
    outputs = plan(params, crawl, pt.PrefectRunner(report, mirror))
    report.publish()
    mlflow_uri, mlflow_run = pt.log_refresh_to_mlflow(params, report)
    publish_audits(report.datasets, params.audit, mlflow_uri, mlflow_run)
    print(report.format_table())
    return {
        "outputs": outputs,
        "datasets": report.datasets,
        "stats": report.rows,
        "mlflow_tracking_uri": mlflow_uri,
        "mlflow_run_id": mlflow_run,
    }
