"""The training run in MLflow: what it was trained on, with which code and config, and its evaluated
checkpoints as logged models and registered model versions.

Conventions shared with the data-refresh run (tasks/tracking.py), so that a walk from a registered
model back to the crawl needs MLflow alone: datasets carry ``tasks.dataset.mlflow_digest``; the
training run's inputs are the packed data ("packed", context "training") and its tokenizer
("tokenizer", context "tokenizer"); tag ``pretrain.data_refresh_run_id`` names the data-refresh run
that logged that packed data as an output. Every evaluated checkpoint is an MLflow 3 LoggedModel
``step-<N>``; the best one by ``val/bpb`` and the final one are versions of a registered model with
the aliases ``best`` and ``final``. (MLflow reserves the alias ``latest``: ``models:/<name>/latest``
already means the newest version, which is the final checkpoint, registered last.)
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mlflow.entities import DatasetInput, InputTag, LoggedModelOutput, LoggedModelStatus, Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service.utils import _use_tracking_uri
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_MODEL_VERSIONS, MLFLOW_RUN_NOTE

from tasks import dataset as ds
from tasks.tokenizer import STAGE as TOKENIZER_STAGE
from tasks.tracking import code_tags, dataset_input

DATA_REFRESH_EXPERIMENT = "data-refresh"
TAG_DATA_REFRESH_RUN = "pretrain.data_refresh_run_id"
TAG_DATA_VERSION = "pretrain.data_version"
BEST_METRIC = "val/bpb"  # lower is better
ALIAS_BEST, ALIAS_FINAL = "best", "final"


@dataclass(frozen=True)
class TrainingData:
    """The pinned packed data of a run and the tokenizer it was packed with, by MLflow digest."""

    packed_dir: Path
    packed_digest: str
    version: str
    tokenizer_dir: Path | None
    tokenizer_digest: str | None

    @classmethod
    def of(cls, packed_dir: str | Path) -> TrainingData:
        packed_dir = Path(packed_dir).resolve()
        tokenizer_dir = next(
            (
                Path(ref.path)
                for ref in ds.read_manifest(packed_dir).inputs
                if (Path(ref.path) / ds.MANIFEST).is_file()
                and ds.read_manifest(ref.path).stage == TOKENIZER_STAGE
            ),
            None,
        )
        return cls(
            packed_dir=packed_dir,
            packed_digest=ds.mlflow_digest(packed_dir),
            version=ds.dataset_digest(packed_dir)[: ds.VERSION_CHARS],
            tokenizer_dir=tokenizer_dir,
            tokenizer_digest=ds.mlflow_digest(tokenizer_dir) if tokenizer_dir else None,
        )


def without_credentials(uri: str) -> str:
    """``uri`` with any ``user:password@`` removed: what may be shown or logged."""
    parts = urlsplit(uri)
    if not parts.username and not parts.password:
        return uri
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host))


def data_refresh_run_for(client: MlflowClient, packed_digest: str) -> str | None:
    """The newest data-refresh run that logged a dataset with ``packed_digest`` as an output."""
    experiment = client.get_experiment_by_name(DATA_REFRESH_EXPERIMENT)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"dataset.digest = '{packed_digest}'",
        order_by=["attributes.start_time DESC"],
    )
    for run in runs:
        for entry in run.inputs.dataset_inputs:
            contexts = {tag.value for tag in entry.tags if tag.key == MLFLOW_DATASET_CONTEXT}
            if entry.dataset.digest == packed_digest and "output" in contexts:
                return run.info.run_id
    return None


def describe_training_run(
    client: MlflowClient,
    run_id: str,
    data: TrainingData,
    run_config: dict[str, Any],
    what: str,
) -> str | None:
    """Log what the run trains on, its config (``config/run.json``, the tracking URI without
    credentials) and code; returns the data-refresh run id (or None).

    ``what`` says what is trained (e.g. "the tiny preset for 1000 steps"); it opens the run's
    description. Logging it again (a resumed run) changes nothing but the description's wording.
    """
    inputs = [(data.packed_dir, "packed", "training")]
    if data.tokenizer_dir is not None:
        inputs.append((data.tokenizer_dir, "tokenizer", "tokenizer"))
    client.log_inputs(
        run_id,
        datasets=[
            DatasetInput(
                dataset_input(path, name)._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, ctx)]
            )
            for path, name, ctx in inputs
        ],
    )
    refresh_run = data_refresh_run_for(client, data.packed_digest)
    made_by = f"made by data-refresh run `{refresh_run}`" if refresh_run else "from no known data-refresh run"
    tokenizer = f"tokenizer `{data.tokenizer_digest}`" if data.tokenizer_digest else "its tokenizer"
    note = (
        f"Trains {what} on packed data version `{data.version}` (digest `{data.packed_digest}`, "
        f"{tokenizer}), {made_by}. Data: `{data.packed_dir}`. Checkpoints are logged models "
        f"`step-<N>`; evals are the `val/*` charts."
    )
    tags = {**code_tags(), TAG_DATA_VERSION: data.version, MLFLOW_RUN_NOTE: note}
    if refresh_run:
        tags[TAG_DATA_REFRESH_RUN] = refresh_run
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    mlflow_config = run_config.get("mlflow") or {}
    if mlflow_config.get("tracking_uri"):
        mlflow_config = {**mlflow_config, "tracking_uri": without_credentials(mlflow_config["tracking_uri"])}
    client.log_dict(run_id, {**run_config, "mlflow": mlflow_config}, "config/run.json")
    return refresh_run


def run_url(ui_url: str | None, tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page: on ``ui_url``, else on the tracking server, else on a local ``mlflow ui``."""
    base = ui_url or (
        tracking_uri if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    )
    return f"{without_credentials(base).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


# ---------------------------------------------------------------------------------------------
# Checkpoints: logged models and registered versions


@dataclass(frozen=True)
class RegisteredCheckpoint:
    model_id: str
    version: str | None = None
    aliases: tuple[str, ...] = ()


def register_checkpoint(
    client: MlflowClient,
    run_id: str,
    step: int,
    checkpoint: str | Path,
    metrics: dict[str, float],
    *,
    data: TrainingData,
    data_refresh_run_id: str | None,
    model_name: str,
    final: bool,
) -> RegisteredCheckpoint:
    """Make the evaluated ``checkpoint`` the LoggedModel ``step-<step>`` of the run, linked to its eval
    ``metrics``; register it as a version of ``model_name`` when it is the best by ``val/bpb`` so far
    (alias ``best``) or the run's ``final`` checkpoint (alias ``final``, and the newest version). Calling it again for the
    same step (a re-run) reuses the model and version it made."""
    run = client.get_run(run_id)
    model = _logged_model(client, run.info.experiment_id, run_id, step, str(Path(checkpoint).resolve()))
    _link_metrics(client, run_id, model.model_id, step, metrics)

    aliases = []
    if BEST_METRIC in metrics and _beats_best(client, model_name, metrics[BEST_METRIC]):
        aliases.append(ALIAS_BEST)
    if final:
        aliases.append(ALIAS_FINAL)
    if not aliases:
        return RegisteredCheckpoint(model.model_id)
    tags = {
        "step": str(step),
        "checkpoint": str(Path(checkpoint).resolve()),
        "packed_digest": data.packed_digest,
        "tokenizer_digest": data.tokenizer_digest or "",
        "data_refresh_run_id": data_refresh_run_id or "",
    }
    if BEST_METRIC in metrics:
        tags[BEST_METRIC] = repr(metrics[BEST_METRIC])
    version = _model_version(client, model_name, run_id, model, tags)
    for alias in aliases:
        client.set_registered_model_alias(model_name, alias, version)
    return RegisteredCheckpoint(model.model_id, version, tuple(aliases))


def _logged_model(client: MlflowClient, experiment_id: str, run_id: str, step: int, checkpoint: str) -> Any:
    name = f"step-{step}"
    found = client.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"name = '{name}' AND source_run_id = '{run_id}'",
        max_results=1,
    )
    if found:
        return found[0]
    model = client.create_logged_model(
        experiment_id,
        name=name,
        source_run_id=run_id,
        params={"step": str(step), "checkpoint": checkpoint},
        model_type="pretrain-checkpoint",
    )
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
    return client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)


def _link_metrics(
    client: MlflowClient, run_id: str, model_id: str, step: int, metrics: dict[str, float]
) -> None:
    """Attach the run's eval metrics of ``step`` to the model. A metric the eval already logged is
    logged again with its own timestamp and value: the run's history keeps one point (MLflow stores a
    metric once per key, timestamp, step and value) and the model gains it."""
    now = int(time.time() * 1000)
    for key, value in sorted(metrics.items()):
        logged = [m for m in client.get_metric_history(run_id, key) if m.step == step]
        timestamp = logged[-1].timestamp if logged else now
        value = logged[-1].value if logged else float(value)
        client.log_batch(run_id, metrics=[Metric(key, value, timestamp, step, model_id=model_id)])


def _beats_best(client: MlflowClient, model_name: str, value: float) -> bool:
    try:
        best = client.get_model_version_by_alias(model_name, ALIAS_BEST)
    except MlflowException:  # no registered model yet, or no best yet
        return True
    recorded = best.tags.get(BEST_METRIC)
    return recorded is None or value < float(recorded)


def _model_version(client: MlflowClient, name: str, run_id: str, model: Any, tags: dict[str, str]) -> str:
    with contextlib.suppress(MlflowException):  # exists already
        client.create_registered_model(name)
    for version in client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'"):
        if version.tags.get("step") == tags["step"]:
            return version.version
    # The model's own location, not "models:/<id>": a SQLite registry would look that up through
    # the process's global tracking URI instead of this client's.
    # create_model_version resolves ``model_id`` through the process's global tracking URI: point it
    # at this client's server for the call (it is ./mlruns unless MLFLOW_TRACKING_URI happens to match).
    with _use_tracking_uri(client.tracking_uri):
        version = client.create_model_version(
            name, source=model.artifact_location, run_id=run_id, tags=tags, model_id=model.model_id
        ).version
    # The logged model's link to its versions, as mlflow.register_model records it (the UI shows it).
    linked = json.loads(model.tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    client.set_logged_model_tags(
        model.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*linked, {"name": name, "version": version}])}
    )
    return version
