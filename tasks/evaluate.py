"""The Prefect task over ``model/evaluate.py``: evaluate a checkpoint and log it where a user looks.

Into the MLflow run (the training run) at the checkpoint's step: the metrics (``val/loss``, ``val/bpb``,
``val/bpb/<lang>``, ``val/bpb/source/<source>``, ``val/accuracy``, ``task/<name>/acc[_norm]``) and the
artifacts ``eval/step-<N>.json``, ``eval/step-<N>.md`` (the readable table) and
``samples/step-<N>.md``. Into Prefect: the eval table of the latest checkpoint as a table artifact.

When the run's config has an ``eval`` (``training_eval_config``) the trainer evaluates each checkpoint itself, between steps
(model/evaluate.py ``TrainingEval``), and this task only reads and logs its result.

The capability tasks and sample prompts come from ``EvalConfig.tasks_dir``; without one, from a folder
built once per run and data version (``<run>/eval-tasks/<version>/``, tasks/build_eval_tasks.py) out of
the data's validation documents, so every checkpoint of a run is scored on the same items.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from model import evaluate as me
from model.run_dir import RunDir
from model.tracking import log_batch
from tasks import build_eval_tasks
from tasks import dataset as ds
from tasks.prefect_artifacts import artifact_key

EVAL_TASKS = "eval-tasks"  # in the run directory: <run>/eval-tasks/<data version>/
# How long a flow waits for the training ranks' eval of a checkpoint it sees (the final checkpoint is
# complete before its eval starts; a trainer that dies in between leaves none).
TRAINING_EVAL_WAIT_S = 600.0


def run_task_folder(run: RunDir, data_dir: Path, log: logging.Logger) -> Path | None:
    """The run's capability tasks and prompts for ``data_dir``, built on first use; None (and a
    warning) when the validation documents' text cannot be read any more."""
    folder = run.root / EVAL_TASKS / data_dir.name
    if (folder / "build.json").is_file():  # written last: the folder is complete
        return folder
    try:
        documents = build_eval_tasks.read_validation_documents(data_dir)
        source = {"packed": str(data_dir), "packed_digest": ds.dataset_digest(data_dir)}
        build_eval_tasks.write_task_folder(documents, folder, source=source)
    except (FileNotFoundError, ValueError) as exc:
        log.warning("no capability tasks and samples for %s: %s", data_dir, exc)
        return None
    return folder


def training_eval_config(
    config: me.EvalConfig, run: RunDir, data_dir: Path, log: logging.Logger, gpus: int
) -> me.EvalConfig | None:
    """The ``eval`` of the trainer's config: ``config`` with the run's task folder when the checkpoints
    are evaluated on the training ranks (``on_training_ranks``; empty: when ``gpus``), else None."""
    if not (config.on_training_ranks or (config.on_training_ranks is None and gpus)):
        return None
    if config.tasks_and_samples and config.tasks_dir is None:
        folder = run_task_folder(run, data_dir, log)
        config = config.model_copy(update={"tasks_dir": folder, "tasks_and_samples": folder is not None})
    return config


def log_eval(result: me.EvalResult, tracking_uri: str, run_id: str) -> None:
    """Metrics at the checkpoint's step and the eval's artifacts, into one MLflow run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    log_batch(client, run_id, metrics=result.metrics, step=result.step)
    for path, text in result.artifacts().items():
        client.log_text(run_id, text, path)


@task(name="evaluate-checkpoint", cache_policy=NO_CACHE)
def evaluate(
    checkpoint: str,
    config: me.EvalConfig | None = None,
    data_dir: str | None = None,
    tracking_uri: str | None = None,
    mlflow_run_id: str | None = None,
    from_training_ranks: bool = False,
) -> me.EvalResult:
    """Evaluate one checkpoint on its run's pinned data (or ``data_dir``); log to the MLflow run if given.
    ``from_training_ranks``: the trainer evaluates it (its config's ``eval``): read and log its result."""
    logger = get_run_logger()
    config = config or me.EvalConfig()
    if from_training_ranks:
        result = me.read_training_eval(checkpoint, TRAINING_EVAL_WAIT_S)
    else:
        if config.tasks_and_samples and config.tasks_dir is None:
            inputs = me.resolve_inputs(checkpoint, data_dir)
            folder = run_task_folder(RunDir.of_checkpoint(checkpoint), inputs.data_dir, logger)
            config = config.model_copy(update={"tasks_dir": folder, "tasks_and_samples": folder is not None})
        result = me.evaluate_checkpoint(checkpoint, config, data_dir)
    logger.info(
        "step %d: val loss %.4f, bpb %.4f, accuracy %.3f over %d tokens (%d windows) in %.1fs on %s",
        result.step, result.loss, result.bpb, result.accuracy, result.tokens, result.windows,
        result.seconds, result.device,
    )  # fmt: skip
    create_table_artifact(
        [row.model_dump() for row in result.table],
        key=artifact_key("eval", RunDir.of_checkpoint(checkpoint).name),
        description=f"Validation loss, bits per byte and accuracy at step {result.step} ({result.checkpoint})",
    )
    if tracking_uri and mlflow_run_id:
        log_eval(result, tracking_uri, mlflow_run_id)
    return result
