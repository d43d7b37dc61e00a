"""MLflow logging of the data refresh: what it read, what it made, with which config and code.

One MLflow run per refresh (experiment ``data-refresh``): the crawl files of each snapshot as
dataset inputs (context "crawl", name ``crawl/<snapshot>``, the files and their fingerprints in the
profile), every stage's output dataset (context "output", ``<snapshot>/<stage>``, ``tokenizer``,
``packed``) with ``tasks.dataset.mlflow_digest`` (the digests the manifests give, so a lineage walk
can cross-check), the stage configs as params, the code version as tags, and the stage-count table
and each stage's own tables as artifacts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import warnings
from pathlib import Path
from typing import Any

from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset, DatasetInput, InputTag, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from pydantic import BaseModel

from model.tracking import ensure_experiment, log_batch, metric_name, param_value
from tasks import dataset as ds

REPO = Path(__file__).resolve().parents[1]
TAG_CODE_COMMIT = "pretrain.code_commit"
TAG_CODE_DIRTY = "pretrain.code_dirty"
# MLflow keeps a dataset profile up to 16 MB: this many file fingerprints stay well below.
_PROFILE_FILES = 10_000
_SECRET_NAME = re.compile(r"(password|secret|token|api_key|auth)", re.IGNORECASE)


def tracking_uri(configured: str | None, workdir: Path) -> str:
    """The configured server, else $MLFLOW_TRACKING_URI, else an embedded SQLite store in ``workdir``."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    workdir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{workdir / 'mlflow.db'}"


def flat_params(config: BaseModel | dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> dotted MLflow params; secret-looking fields are never logged."""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if _SECRET_NAME.search(key):
            continue
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = param_value(
                value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            )
    return out


def code_tags(repo: Path = REPO) -> dict[str, str]:
    """Tags naming the code: the git commit and whether the working tree differed from it
    ("unknown" where there is no git or no repository)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(repo), *args], capture_output=True, text=True, check=False
            )
        except OSError:  # no git installed
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        TAG_CODE_COMMIT: commit or "unknown",
        TAG_CODE_DIRTY: "unknown" if status is None else str(bool(status)).lower(),
    }


def dataset_input(dataset_dir: str | Path, name: str) -> MetaDataset:
    """An MLflow dataset for one of our datasets: digest = ``tasks.dataset.mlflow_digest``."""
    path = Path(dataset_dir).resolve()
    with warnings.catch_warnings():  # two equivalent local-file sources are registered; either is right
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(path))
    return MetaDataset(source=source, name=name, digest=ds.mlflow_digest(path))


def crawl_digest(files: list[ds.InputRef]) -> str:
    """Identity of a snapshot's crawl input, as MLflow keeps it (32 hex): its files and fingerprints,
    the ``inputs`` of the snapshot's ingest manifest."""
    listing = [[ref.path, ref.fingerprint or ""] for ref in files]
    return hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()[:32]


def crawl_dataset(snapshot: str, files: list[ds.InputRef]) -> Dataset:
    """The crawl files of one snapshot as an MLflow dataset: source = their common directory or
    URL prefix, profile = every file with its fingerprint (the first ``_PROFILE_FILES`` of a whole
    snapshot's 90,000; the artifact ``crawl/<snapshot>.json`` lists them all)."""
    # character-wise, then cut at a "/": works for URLs, which commonpath does not take
    prefix = os.path.commonprefix([ref.path for ref in files]).rpartition("/")[0] or "/"  # noqa: RUF071
    scheme = prefix.split("://")[0] if "://" in prefix else "local"
    return Dataset(
        name=f"crawl/{snapshot}",
        digest=crawl_digest(files),
        source_type={"https": "http"}.get(scheme, scheme),
        source=json.dumps({"uri": prefix}),
        profile=json.dumps(
            {"files": len(files), "fingerprints": {r.path: r.fingerprint for r in files[:_PROFILE_FILES]}}
        ),
    )


def _input(dataset: Dataset, context: str) -> DatasetInput:
    return DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)])


def stage_counts_markdown(rows: list[dict[str, Any]]) -> str:
    """The stage-count table with the drop and quarantine reasons, as a Markdown table."""
    columns = ["snapshot", "stage", "in", "kept", "dropped", "quarantined", "by_rule", "quarantine_reasons"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def log_data_refresh(
    uri: str,
    experiment: str,
    run_name: str,
    params: BaseModel,
    stage_rows: list[dict[str, Any]],
    tables: dict[str, list[dict[str, Any]]],
    datasets: dict[str, str],
    crawl: dict[str, list[ds.InputRef]],
) -> str:
    """One MLflow run per data refresh; returns its run id.

    ``stage_rows``: the stage-count table; ``tables``: each stage's own tables by key; ``datasets``:
    MLflow name -> directory of every dataset made; ``crawl``: snapshot -> the crawl files read.
    """
    client = MlflowClient(uri)
    run_id = client.create_run(
        ensure_experiment(client, experiment), run_name=run_name, tags=code_tags()
    ).info.run_id
    try:
        metrics = {
            metric_name(f"{row['snapshot']}.{row['stage']}.{field}"): float(row[field])
            for row in stage_rows
            for field in ("in", "kept", "dropped", "quarantined")
        }
        log_batch(client, run_id, metrics=metrics, params=flat_params(params))
        client.log_inputs(
            run_id,
            datasets=[_input(crawl_dataset(snapshot, files), "crawl") for snapshot, files in crawl.items()]
            + [
                _input(dataset_input(path, name)._to_mlflow_entity(), "output")
                for name, path in datasets.items()
            ],
        )
        for snapshot, files in crawl.items():
            client.log_dict(run_id, [r.model_dump() for r in files], f"crawl/{snapshot}.json")
        client.log_dict(run_id, {"stages": stage_rows, "datasets": datasets}, "stage_counts.json")
        client.log_text(run_id, stage_counts_markdown(stage_rows), "stage_counts.md")
        for key, rows in tables.items():
            client.log_dict(run_id, rows, f"tables/{key}.json")
    except BaseException:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(run_id)
    return run_id
