"""Pretraining: submit the trainer through a launcher, follow it, evaluate every new checkpoint.

Thin orchestration: the training task (tasks/training_job.py) holds the device slots, submits the job
(tasks/launchers.py) and streams its log and progress; meanwhile this flow evaluates each new
checkpoint (tasks/evaluate.py) into the same MLflow run the trainer logs to, and makes it a logged
model, registered when it is the best or the final one (tasks/run_tracking.py). A retry of the
training task, or a re-run of the flow with the same run name, resumes from the run's last checkpoint
on the data version the run started with. Cancelling (or killing) the flow run stops the whole job:
``jobs_stopped_on_exit`` in this process, the hooks for an engine-owned cancel. With Slurm or
Kubernetes, ``runs_root`` must be storage both the job and this flow's machine see.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from pydantic import BaseModel, Field

from model.config import MlflowConfig, TrainConfig, TrainSettings, load_config
from model.evaluate import EvalConfig, EvalResult
from model.run_dir import RunDir
from model.tracking import find_or_create_run
from tasks import dataset as ds
from tasks import evaluate as ev
from tasks import run_tracking as rt
from tasks import storage
from tasks.launchers import (
    Launcher,
    LocalLauncher,
    TrainJob,
    jobs_stopped_on_exit,
    stop_running_jobs,
    write_run_config,
)
from tasks.plan import plan_for_run, plan_markdown
from tasks.prefect_artifacts import artifact_key
from tasks.run_health import EvalRegressionWatch, RunHealthConfig, emit
from tasks.tracking import flat_params, tracking_uri
from tasks.training_job import TrainResult, new_checkpoints, train


class PretrainParams(BaseModel):
    """Run form of a pretraining run."""

    run_name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Names the run directory, its checkpoints and its MLflow run: the same name resumes.",
    )
    data_dir: str = Field(
        description="Packed training data: a published root (its LATEST version is pinned when the run "
        "first starts; a resumed run keeps its version), a version dir, or a plain packed dataset."
    )
    runs_root: str = Field(
        "workdir/runs", description="Where run directories live (shared storage on a cluster)."
    )
    train: TrainSettings = Field(
        default_factory=TrainSettings, description="The trainer's settings (model/config.py TrainSettings)."
    )
    eval: EvalConfig = Field(
        default_factory=lambda: EvalConfig(threads=4),
        description="Evaluation of each new checkpoint: on the training ranks between steps (GPU runs) "
        "or in a process beside the training job (on_training_ranks).",
    )
    checkpoint_poll_s: float = Field(
        5.0, gt=0, description="How often to look for a new checkpoint to evaluate."
    )
    launcher: Launcher = Field(default_factory=LocalLauncher, description="Where the job runs.")
    gpu_kind: str = Field(
        "H200", description="GPU kind for the compute plan shown when a GPU run starts (H200, H100, A100)."
    )
    retries: int = Field(2, ge=0, description="Training task retries; each resumes from the last checkpoint.")
    run_health: RunHealthConfig = Field(
        default_factory=RunHealthConfig,
        description="When the run-health Prefect events (stall, throughput drop, eval regression) fire.",
    )
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking server. Empty: $MLFLOW_TRACKING_URI, else SQLite in runs_root."
    )
    mlflow_experiment: str = "pretrain"
    mlflow_system_metrics_s: float | None = MlflowConfig.model_fields["system_metrics_s"]
    mlflow_ui_url: str | None = Field(
        None, description="MLflow UI base URL for the run link; default: the tracking server if it is one."
    )
    registered_model: str | None = Field(
        None,
        description="Model Registry name of the run's best and final checkpoints; default: the run name.",
    )


class PretrainResult(BaseModel):
    train: TrainResult
    evals: list[EvalResult]
    mlflow_run_id: str
    mlflow_url: str
    data_dir: str = Field(description="The packed data version the run trains on (pinned in run.json).")


def pinned_data_dir(run_dir: RunDir, requested: str | Path, log: logging.Logger) -> Path:
    """The data version the run trains on: the one in its run.json once it has started (LATEST may
    have moved since), else ``requested`` resolved to its current version. Data on object storage
    (``s3://``) is fetched into its local staging copy, which the trainer reads."""
    remote = storage.is_remote(str(requested))
    if run_dir.config_path.is_file():
        pinned = load_config(run_dir.config_path).data_dir
        current = None if remote else ds.resolve_version(requested)  # remote: no download to compare
        if current is not None and current != pinned:
            log.warning("run %s stays on its data version %s (%s now resolves to %s)",
                        run_dir.name, pinned, requested, current)  # fmt: skip
        return pinned
    return storage.fetch(str(requested)) if remote else ds.resolve_version(requested)


def logged_params(params: PretrainParams) -> dict[str, str]:
    """The form as MLflow params, the tracking URI without any credentials in it."""
    data = params.model_dump(mode="json")
    if data["mlflow_tracking_uri"]:
        data["mlflow_tracking_uri"] = rt.without_credentials(data["mlflow_tracking_uri"])
    return flat_params(data)


def launcher_gpus(launcher: Launcher) -> int:
    """GPUs the run occupies (0 for CPU ranks: the planner's throughput table is for GPUs)."""
    if launcher.kind == "local":
        return launcher.nproc_per_node if launcher.device == "cuda" else 0
    if getattr(launcher, "device", "cuda") != "cuda":
        return 0
    return launcher.nodes * launcher.gpus_per_node


@flow(name="pretrain", on_cancellation=[stop_running_jobs], on_crashed=[stop_running_jobs])
def pretrain(params: PretrainParams) -> PretrainResult:
    logger = get_run_logger()
    run_dir = RunDir.of(params.runs_root, params.run_name)
    data = rt.TrainingData.of(pinned_data_dir(run_dir, params.data_dir, logger))
    job = TrainJob(run_dir=run_dir, total_steps=params.train.max_steps)

    uri = tracking_uri(params.mlflow_tracking_uri, Path(params.runs_root).resolve())
    client = MlflowClient(tracking_uri=uri)
    experiment_id, run_id = find_or_create_run(
        client, params.mlflow_experiment, params.run_name, logged_params(params)
    )
    config = TrainConfig(
        **params.train.model_dump(),
        data_dir=data.packed_dir,
        checkpoint_dir=run_dir.checkpoint_dir,
        mlflow=MlflowConfig(
            tracking_uri=uri,
            experiment=params.mlflow_experiment,
            run_id=run_id,
            system_metrics_s=params.mlflow_system_metrics_s,
        ),
        eval=ev.training_eval_config(
            params.eval, run_dir, data.packed_dir, logger, launcher_gpus(params.launcher)
        ),
    )
    write_run_config(job, config.model_dump(mode="json"))
    what = f"the {params.train.model} model for {params.train.max_steps} steps"
    refresh_run = rt.describe_training_run(client, run_id, data, config.model_dump(mode="json"), what)
    url = rt.run_url(params.mlflow_ui_url, uri, experiment_id, run_id)
    create_link_artifact(
        url, link_text=f"MLflow run {params.run_name}", key=artifact_key("train", params.run_name, "mlflow")
    )
    if gpus := launcher_gpus(params.launcher):
        create_markdown_artifact(
            plan_markdown(plan_for_run(params.train, data.packed_dir, gpus, params.gpu_kind)),
            key=artifact_key("train", params.run_name, "plan"),
            description="Compute plan: tokens per parameter, FLOPs, predicted wall time and GPU-hours",
        )

    model_name = params.registered_model or params.run_name
    with jobs_stopped_on_exit():
        training = train.with_options(retries=params.retries).submit(job, params.launcher, params.run_health)
        evals = []
        regression = EvalRegressionWatch(params.run_health.regression_evals)
        for checkpoint in new_checkpoints(
            run_dir.checkpoint_dir, lambda: training.state.is_final(), params.checkpoint_poll_s
        ):
            state = ev.evaluate(
                str(checkpoint), params.eval, tracking_uri=uri, mlflow_run_id=run_id,
                from_training_ranks=config.eval is not None, return_state=True,
            )  # fmt: skip
            if not state.is_completed():  # e.g. the trainer rotated the checkpoint away mid-read
                logger.warning("eval of %s did not complete: %s", checkpoint, state.message)
                continue
            result = state.result()
            evals.append(result)
            if found := regression.observe(result.step, result.bpb):
                emit(found, params.run_name, logger)
            try:
                registered = rt.register_checkpoint(
                    client, run_id, result.step, checkpoint, result.metrics,
                    data=data, data_refresh_run_id=refresh_run, model_name=model_name,
                    final=result.step == params.train.max_steps,
                )  # fmt: skip
            except MlflowException as exc:  # the registry is an observer: training goes on
                logger.warning("step %d not registered in MLflow: %s", result.step, exc)
                continue
            if registered.version:
                logger.info("step %d: version %s of %s (%s)", result.step, registered.version,
                            model_name, ", ".join(registered.aliases))  # fmt: skip
    return PretrainResult(
        train=training.result(),
        evals=evals,
        mlflow_run_id=run_id,
        mlflow_url=url,
        data_dir=str(data.packed_dir),
    )
