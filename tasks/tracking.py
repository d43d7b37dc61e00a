"""MLflow logging of data runs: params, per-stage counts as metrics, datasets as inputs/outputs.

Datasets are logged as MLflow dataset inputs (name, digest = manifest hash, source = location),
so the MLflow UI shows which data a run read and produced, and the digests tie it to the lineage
chain in the manifests.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from pydantic import BaseModel

from tasks import dataset as ds

# MLflow rejects param values over this length; longer values are cut with a marker.
_PARAM_VALUE_LIMIT = 6000
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
            text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
            out[name] = text if len(text) <= _PARAM_VALUE_LIMIT else text[: _PARAM_VALUE_LIMIT - 3] + "..."
    return out


def dataset_input(dataset_dir: str | Path, name: str) -> MetaDataset:
    """An MLflow dataset for one of our datasets: digest = manifest sha256 (first 16 hex)."""
    path = Path(dataset_dir).resolve()
    with warnings.catch_warnings():  # two equivalent local-file sources are registered; either is right
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(path))
    return MetaDataset(source=source, name=name, digest=ds.manifest_sha256(path)[:16])


def _metric_name(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z_\-. /]", "_", text)


def log_data_refresh(
    uri: str,
    experiment: str,
    run_name: str,
    params: BaseModel,
    stage_rows: list[dict[str, Any]],
    outputs: dict[str, Any],
) -> str:
    """One MLflow run per data refresh; returns its run id."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params(flat_params(params))
        metrics: dict[str, float] = {}
        for row in stage_rows:
            prefix = _metric_name(f"{row['snapshot']}.{row['stage']}")
            for field in ("in", "kept", "dropped", "quarantined"):
                metrics[f"{prefix}.{field}"] = float(row[field])
        mlflow.log_metrics(metrics)
        for path in outputs.get("documents", []):
            mlflow.log_input(dataset_input(path, f"documents/{Path(path).parent.name}"), context="output")
        for name in ("tokenizer", "packed"):
            if name in outputs:
                mlflow.log_input(dataset_input(outputs[name], name), context="output")
        mlflow.log_dict({"stages": stage_rows, "outputs": outputs}, "data_refresh_report.json")
        return run.info.run_id
