"""Pretraining: submit the trainer through a launcher, follow it, evaluate every new checkpoint.

Thin orchestration: the training task (tasks/train.py) holds the device slots, submits the job and
streams its log and progress; meanwhile this flow evaluates each new checkpoint (tasks/evaluate.py)
into the same MLflow run the trainer logs to. A retry of the training task, or a re-run of the flow
with the same run name, resumes from the run's last checkpoint. Cancelling (or killing) the flow run
stops the whole job: ``jobs_stopped_on_exit`` in this process, the hooks for an engine-owned cancel.
With Slurm or Kubernetes, ``runs_root`` must be storage both the job and this flow's machine see.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact
from pydantic import BaseModel, Field

from model.config import OptimConfig, TrainConfig
from model.parallelize import ReshardPolicy
from tasks import dataset as ds
from tasks import evaluate as ev
from tasks import train as tr
from tasks.tracking import flat_params, tracking_uri

ModelPreset = Literal["tiny", "125M", "350M", "1B", "7B"]  # model.model.PRESETS (a test keeps them equal)


class PretrainParams(BaseModel):
    """Run form of a pretraining run."""

    run_name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Names the run directory, its checkpoints and its MLflow run: the same name resumes.",
    )
    data_dir: str = Field(description="Packed training data (the pack stage's output, with manifest.json).")
    runs_root: str = Field(
        "workdir/runs", description="Where run directories live (shared storage on a cluster)."
    )
    model: ModelPreset = Field("tiny", description="Model size preset.")
    model_overrides: dict[str, Any] = Field(
        default_factory=dict, description="ModelConfig fields to replace."
    )
    max_steps: int = Field(1000, ge=1)
    micro_batch_size: int = Field(8, ge=1, description="Sequences per rank per micro-step.")
    grad_accum_steps: int = Field(1, ge=1)
    seed: int = 0
    optim: OptimConfig = Field(default_factory=OptimConfig, description="AdamW and the LR schedule.")
    log_interval: int = Field(10, ge=1, description="Steps between metric reports.")
    eval_interval: int = Field(
        500, ge=1, description="Steps between checkpoints; each new checkpoint is evaluated."
    )
    keep_checkpoints: int = Field(3, ge=1)
    eval_max_sequences_per_slice: int = Field(64, ge=1, description="Validation windows per slice and eval.")
    eval_threads: int = Field(
        4, ge=1, description="CPU threads of the eval (it runs beside the training job)."
    )
    checkpoint_poll_s: float = Field(
        5.0, gt=0, description="How often to look for a new checkpoint to evaluate."
    )
    compile: bool = False
    activation_checkpointing: bool = False
    mixed_precision: bool = Field(True, description="bf16 compute on GPU.")
    # The trainer's own fields: one default and one description, in TrainConfig.
    checkpoint_async: bool = TrainConfig.model_fields["checkpoint_async"]
    fsdp_reshard_after_forward: ReshardPolicy = TrainConfig.model_fields["fsdp_reshard_after_forward"]
    launcher: tr.Launcher = Field(default_factory=tr.LocalLauncher, description="Where the job runs.")
    retries: int = Field(2, ge=0, description="Training task retries; each resumes from the last checkpoint.")
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking server. Empty: $MLFLOW_TRACKING_URI, else SQLite in runs_root."
    )
    mlflow_experiment: str = "pretrain"
    mlflow_ui_url: str | None = Field(
        None, description="MLflow UI base URL for the run link; default: the tracking server if it is one."
    )


class PretrainResult(BaseModel):
    train: tr.TrainResult
    evals: list[ev.EvalResult]
    mlflow_run_id: str
    mlflow_url: str


def trainer_config(params: PretrainParams, job: tr.TrainJob, uri: str, mlflow_run_id: str) -> TrainConfig:
    return TrainConfig(
        model=params.model,
        model_overrides=params.model_overrides,
        data_dir=Path(params.data_dir).resolve(),
        checkpoint_dir=job.checkpoint_dir,
        micro_batch_size=params.micro_batch_size,
        grad_accum_steps=params.grad_accum_steps,
        max_steps=params.max_steps,
        seed=params.seed,
        optim=params.optim,
        log_interval=params.log_interval,
        checkpoint_interval=params.eval_interval,
        keep_checkpoints=params.keep_checkpoints,
        compile=params.compile,
        activation_checkpointing=params.activation_checkpointing,
        mixed_precision=params.mixed_precision,
        checkpoint_async=params.checkpoint_async,
        fsdp_reshard_after_forward=params.fsdp_reshard_after_forward,
        mlflow={"tracking_uri": uri, "experiment": params.mlflow_experiment, "run_id": mlflow_run_id},
    )


@flow(name="pretrain", on_cancellation=[tr.stop_running_jobs], on_crashed=[tr.stop_running_jobs])
def pretrain(params: PretrainParams) -> PretrainResult:
    logger = get_run_logger()
    ds.read_manifest(params.data_dir)  # a clear error now, not in the job, if the data is not there
    job = tr.TrainJob(
        run_name=params.run_name,
        run_dir=tr.run_dir_for(params.runs_root, params.run_name),
        total_steps=params.max_steps,
    )
    uri = tracking_uri(params.mlflow_tracking_uri, Path(params.runs_root).resolve())
    experiment_id, run_id = tr.mlflow_run_for(
        uri, params.mlflow_experiment, params.run_name, flat_params(params)
    )
    url = tr.mlflow_run_url(params.mlflow_ui_url, uri, experiment_id, run_id)
    create_link_artifact(
        url, link_text=f"MLflow run {params.run_name}", key=tr.artifact_key(params.run_name) + "-mlflow"
    )
    tr.write_run_config(job, trainer_config(params, job, uri, run_id).model_dump(mode="json"))

    with tr.jobs_stopped_on_exit():
        training = tr.train.with_options(retries=params.retries).submit(job, params.launcher)
        evals = []
        for checkpoint in tr.new_checkpoints(
            job.checkpoint_dir, lambda: training.state.is_final(), params.checkpoint_poll_s
        ):
            state = ev.evaluate(
                str(checkpoint),
                max_sequences_per_slice=params.eval_max_sequences_per_slice,
                threads=params.eval_threads,
                tracking_uri=uri,
                mlflow_run_id=run_id,
                return_state=True,
            )
            if state.is_completed():
                evals.append(state.result())
            else:  # e.g. the trainer rotated the checkpoint away mid-read; training goes on regardless
                logger.warning("eval of %s did not complete: %s", checkpoint, state.message)
    return PretrainResult(train=training.result(), evals=evals, mlflow_run_id=run_id, mlflow_url=url)
