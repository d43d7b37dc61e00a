"""Evaluate any checkpoint: validation loss and perplexity per slice, logged to MLflow.

Thin orchestration over tasks/evaluate.py. With no MLflow run given, the eval gets its own run in
the experiment, named after the run and step it evaluates.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from pydantic import BaseModel, Field

from tasks import evaluate as ev
from tasks import train as tr
from tasks.tracking import flat_params, tracking_uri


class EvaluateParams(BaseModel):
    """Run form of a checkpoint evaluation."""

    checkpoint: str = Field(description="A complete checkpoint directory (…/checkpoints/step-N).")
    data_dir: str | None = Field(None, description="Packed data to evaluate on; default: the run's own data.")
    config_path: str | None = Field(
        None, description="The run's run.json; default: the one beside checkpoints/."
    )
    max_sequences_per_slice: int = Field(64, ge=1, description="Validation windows evaluated per slice.")
    threads: int | None = Field(None, ge=1, description="CPU threads; default: torch's.")
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking server. Empty: $MLFLOW_TRACKING_URI, else SQLite in workdir."
    )
    mlflow_experiment: str = "evaluate"
    mlflow_run_id: str | None = Field(None, description="Log into this run (e.g. the training run's).")
    workdir: str = "workdir"


@flow(name="evaluate")
def evaluate(params: EvaluateParams) -> ev.EvalResult:
    uri = tracking_uri(params.mlflow_tracking_uri, Path(params.workdir).resolve())
    run_id, own_run = params.mlflow_run_id, params.mlflow_run_id is None
    if own_run:
        checkpoint = Path(params.checkpoint).resolve()
        name = f"eval-{checkpoint.parent.parent.name}-{checkpoint.name}"
        _, run_id = tr.mlflow_run_for(uri, params.mlflow_experiment, name, flat_params(params))
    return ev.evaluate(
        params.checkpoint,
        data_dir=params.data_dir,
        config_path=params.config_path,
        max_sequences_per_slice=params.max_sequences_per_slice,
        threads=params.threads,
        tracking_uri=uri,
        mlflow_run_id=run_id,
        end_mlflow_run=own_run,
    )
