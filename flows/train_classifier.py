"""Training a classifier for the classifier stage: positive + negative reference data -> fastText model.

One task trains (``tasks.train_classifier.train``: content-keyed, reused when data, config and code
are unchanged), then the model, its training-data digests and its held-out precision/recall go to
MLflow (experiment ``classifier``). The model directory is what the data refresh's
``classifier.models[].path`` takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from pydantic import BaseModel, Field

from tasks import train_classifier as tc


class TrainClassifierParams(BaseModel):
    """Run form of classifier training."""

    positive: str = Field(
        description="Positive examples (e.g. curated pages): a dataset directory (manifest.json), or a "
        "Parquet/JSONL file, with a `text` column (`lang` optional: lid.176 labels rows without it)."
    )
    negative: str = Field(description="Negative examples (e.g. random crawl pages), in the same forms.")
    workdir: str = Field(default="workdir", description="Where models and the embedded MLflow store live.")
    output: str | None = Field(
        default=None,
        description="Model directory to write (model.bin + manifest.json). Empty: WORKDIR/classifiers/<name>.",
    )
    train: tc.TrainClassifierConfig = Field(
        default_factory=tc.TrainClassifierConfig, description="Label name, seed, split and fastText settings."
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking server. Empty: $MLFLOW_TRACKING_URI, else SQLite in the workdir.",
    )
    mlflow_experiment: str = Field(default="classifier", description="MLflow experiment name.")


@task(name="train-classifier", task_run_name="train-{config.name}")
def train_task(positive: str, negative: str, output: str, config: tc.TrainClassifierConfig) -> dict[str, Any]:
    return tc.train(positive, negative, output, config)


@flow(name="train-classifier", log_prints=True)
def train_classifier(params: TrainClassifierParams) -> dict[str, Any]:
    """Train the classifier, log it to MLflow; returns its manifest and the MLflow run."""
    from tasks import tracking

    output = params.output or str(Path(params.workdir) / "classifiers" / params.train.name)
    manifest = train_task(params.positive, params.negative, output, params.train)
    heldout = manifest["heldout"]
    get_run_logger().info(
        "classifier %s: held-out precision %.4f recall %.4f (threshold %s) -> %s",
        manifest["name"],
        heldout["precision"],
        heldout["recall"],
        heldout["threshold"],
        Path(output).resolve(),
    )
    uri = tracking.tracking_uri(params.mlflow_tracking_uri, Path(params.workdir).resolve())
    run_id = tc.log_to_mlflow(uri, params.mlflow_experiment, output, manifest)
    return {
        "manifest": manifest,
        "model_dir": str(Path(output).resolve()),
        "mlflow_tracking_uri": uri,
        "mlflow_run_id": run_id,
    }
