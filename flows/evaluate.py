"""Evaluate any saved checkpoint: validation loss, bits per byte, accuracy, per language and source.

Thin orchestration over tasks/evaluate.py. By default the eval goes into the training run it belongs
to (``run.json`` records its MLflow server and run), at the checkpoint's step, beside the evals made
while it trained; a checkpoint of a run with no MLflow run gets its own run in ``mlflow_experiment``.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import flow
from pydantic import BaseModel, Field

from model import evaluate as me
from model.tracking import find_or_create_run
from tasks import evaluate as ev
from tasks.tracking import flat_params, tracking_uri


class EvaluateParams(BaseModel):
    """Run form of a checkpoint evaluation."""

    checkpoint: str = Field(description="A complete checkpoint directory (<run>/checkpoints/step-N).")
    data_dir: str | None = Field(
        None, description="Packed data to evaluate on; default: the data version the run trained on."
    )
    eval: me.EvalConfig = Field(default_factory=me.EvalConfig, description="Sample size, device, threads.")
    mlflow_tracking_uri: str | None = Field(
        None,
        description="MLflow tracking server. Empty: the training run's, else $MLFLOW_TRACKING_URI, "
        "else SQLite in workdir.",
    )
    mlflow_run_id: str | None = Field(
        None, description="Log into this run; default: the training run's (run.json), else a new run."
    )
    mlflow_experiment: str = Field("evaluate", description="Experiment of a new run.")
    workdir: str = "workdir"


@flow(name="evaluate")
def evaluate(params: EvaluateParams) -> me.EvalResult:
    trained = me.run_config(params.checkpoint).mlflow
    uri = params.mlflow_tracking_uri or trained.tracking_uri
    uri = tracking_uri(uri, Path(params.workdir).resolve())
    run_id = params.mlflow_run_id or (trained.run_id if uri == trained.tracking_uri else None)
    own_run = run_id is None
    if own_run:
        checkpoint = Path(params.checkpoint).resolve()
        name = f"eval-{checkpoint.parent.parent.name}-{checkpoint.name}"
        _, run_id = find_or_create_run(
            MlflowClient(tracking_uri=uri), params.mlflow_experiment, name, flat_params(params)
        )
    result = ev.evaluate(
        params.checkpoint, params.eval, data_dir=params.data_dir, tracking_uri=uri, mlflow_run_id=run_id
    )
    if own_run:
        MlflowClient(tracking_uri=uri).set_terminated(run_id, "FINISHED")
    return result
