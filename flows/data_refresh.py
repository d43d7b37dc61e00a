"""The data refresh: crawl -> clean, language-labelled, deduplicated documents -> training data.

Thin orchestration only: every step is a cached task from ``tasks.prefect_tasks`` over datasets
on disk. Run it nightly: crawl files already processed hit the cache, dedup inserts only the new
snapshot into the persistent index, and only what changed is redone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field

from tasks import prefect_tasks as pt
from tasks.dedup import DedupConfig
from tasks.ingest import IngestConfig
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
        description="Crawl root holding `crawl-data/{SNAPSHOT}/warc.paths.gz` (local path, s3:// or "
        "https:// URL), or a single WARC/WET file, or a glob of them.",
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
    pii: PiiConfig = Field(default_factory=PiiConfig, description="Scrubbing emails, IP addresses, phones.")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Exact and MinHash near-dedup.")
    build_training_data: bool = Field(
        default=True, description="Also train the tokenizer and pack token shards for training."
    )
    tokenizer_dir: str | None = Field(
        default=None,
        description="Use this existing tokenizer dataset instead of training one (keeps token ids "
        "stable across nightly refreshes).",
    )
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="BPE tokenizer training.")
    pack: PackConfig = Field(default_factory=PackConfig, description="Tokenizing and packing into shards.")
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking server. Empty: $MLFLOW_TRACKING_URI, else SQLite in the workdir.",
    )
    mlflow_experiment: str = Field(default="data-refresh", description="MLflow experiment name.")


@flow(name="data-refresh", log_prints=True, task_runner=pt.default_task_runner())
def data_refresh(params: DataRefreshParams = DataRefreshParams()) -> dict:  # noqa: B008 (the UI form's defaults)
    """Ingest, label, filter, scrub and deduplicate each snapshot; then build training data."""
    logger = get_run_logger()
    workdir = Path(params.workdir).resolve()
    snapshots = params.snapshots or pt.discover_snapshots(params.crawl)
    logger.info("data refresh of %s: snapshots %s into %s", params.crawl, snapshots, workdir)

    report = pt.RefreshReport()
    clean = {}
    for snapshot in snapshots:
        files = pt.list_files(params.crawl, snapshot, params.kinds, params.max_files)
        previous = pt.run_ingest(files, workdir / snapshot / "ingest", params.ingest, snapshot, report)
        for stage in ("langid", "quality", "pii"):
            previous = pt.run_document_stage(
                stage, getattr(params, stage), previous, workdir / snapshot / stage, snapshot, report
            )
        clean[snapshot] = previous

    deduplicated = pt.run_dedup(clean, workdir / "dedup-index", params.dedup, workdir, report)
    outputs = {"documents": [str(d) for d in deduplicated]}
    if params.build_training_data and any(pt.dataset_rows(d) for d in deduplicated):
        tokenizer_dir = (
            Path(params.tokenizer_dir)
            if params.tokenizer_dir
            else pt.run_tokenizer(deduplicated, workdir / "tokenizer", params.tokenizer, report)
        )
        packed = pt.run_pack(deduplicated, tokenizer_dir, workdir / "packed", params.pack, report)
        outputs.update(tokenizer=str(tokenizer_dir), packed=str(packed))

    report.publish()
    mlflow_uri, mlflow_run = pt.log_refresh_to_mlflow(params, report, outputs)
    print(report.format_table())
    return {
        "outputs": outputs,
        "stats": report.rows,
        "mlflow_tracking_uri": mlflow_uri,
        "mlflow_run_id": mlflow_run,
    }
