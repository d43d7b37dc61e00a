"""Attach a Hugging Face export (model/export.py) to a registered model version in MLflow.

The folder goes into the artifacts of the version's LoggedModel (``step-<N>`` of the training run,
tasks/run_tracking.py) under ``hf/``, so ``mlflow.artifacts.download_artifacts("models:/NAME/VERSION")``
brings it back beside anything else the model holds, and transformers loads ``<download>/hf``. The
version and the LoggedModel are tagged ``hf_export`` with that path.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from model.export import EXPORT_INFO
from tasks.lineage import logged_model_id

ARTIFACT_PATH = "hf"
TAG_HF_EXPORT = "hf_export"


def model_version(client: MlflowClient, name: str, version_or_alias: str) -> ModelVersion:
    """A registered version by number, or by alias (``best``, ``final``)."""
    if version_or_alias.isdigit():
        return client.get_model_version(name, version_or_alias)
    return client.get_model_version_by_alias(name, version_or_alias)


def attach_export(client: MlflowClient, name: str, version_or_alias: str, export_dir: str | Path) -> str:
    """Log ``export_dir`` into the LoggedModel of version ``name``/``version_or_alias``; returns its
    artifact URI. Refuses an export of another step than the version's checkpoint."""
    version = model_version(client, name, str(version_or_alias))
    model_id = logged_model_id(client, version)
    if model_id is None:
        raise ValueError(f"model version {name}/{version.version} has no LoggedModel to attach to")
    exported = json.loads((Path(export_dir) / EXPORT_INFO).read_text(encoding="utf-8"))
    logged = client.get_logged_model(model_id)
    step = logged.params.get("step")
    if step is not None and int(step) != exported["step"]:
        raise ValueError(
            f"{export_dir} is an export of step {exported['step']}, but {name}/{version.version} "
            f"is step {step}"
        )
    client.log_model_artifacts(model_id, str(export_dir), artifact_path=ARTIFACT_PATH)
    client.set_logged_model_tags(model_id, {TAG_HF_EXPORT: ARTIFACT_PATH})
    client.set_model_version_tag(name, version.version, TAG_HF_EXPORT, ARTIFACT_PATH)
    return f"{logged.artifact_location.rstrip('/')}/{ARTIFACT_PATH}"
