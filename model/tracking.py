"""MLflow helpers shared by the trainer (``model/``, under torchrun) and the flows (``tasks/``).

One place for what MLflow constrains: metric names, the per-call limits of ``log_batch``, and
finding-or-creating a run by name. Imports MLflow lazily: the trainer runs without a server.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# log_batch accepts at most this many of each per call (MLflow's server-side limits).
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100
# MLflow rejects param values longer than this; longer ones are cut with a marker.
PARAM_VALUE_LIMIT = 6000


def metric_name(*parts: str) -> str:
    """An MLflow metric name from parts joined by ``/`` (letters, digits, ``_ - . /`` and spaces)."""
    return re.sub(r"[^0-9A-Za-z_\-. /]", "_", "/".join(parts))


def param_value(value: str) -> str:
    return value if len(value) <= PARAM_VALUE_LIMIT else value[: PARAM_VALUE_LIMIT - 3] + "..."


def log_batch(
    client: Any,
    run_id: str,
    *,
    metrics: Mapping[str, float] | None = None,
    step: int = 0,
    params: Mapping[str, str] | None = None,
    tags: Mapping[str, str] | None = None,
) -> None:
    """Log metrics (at ``step``), params and tags in as many ``log_batch`` calls as MLflow needs."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    batches: list[tuple[str, Sequence[Any], int]] = [
        (
            "metrics",
            [Metric(k, float(v), now, step) for k, v in sorted((metrics or {}).items())],
            _MAX_METRICS,
        ),
        ("params", [Param(k, param_value(v)) for k, v in sorted((params or {}).items())], _MAX_PARAMS),
        ("tags", [RunTag(k, v) for k, v in sorted((tags or {}).items())], _MAX_TAGS),
    ]
    for kind, items, limit in batches:
        for start in range(0, len(items), limit):
            client.log_batch(run_id, **{kind: items[start : start + limit]})


# MLflow opens an experiment of this kind in its model-training view, not its GenAI one (the tag and
# value MLflow's UI reads; MLflow 3 infers a kind only for experiments created without one).
EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"


def ensure_experiment(client: Any, name: str) -> str:
    """The id of experiment ``name``, created as a model-training experiment when missing.

    With a local SQLite store its artifacts go beside the database (MLflow's default would be
    ``./mlruns`` in whatever directory the process runs in); a server keeps its own artifact root.
    """
    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    from mlflow.exceptions import MlflowException

    uri = str(client.tracking_uri)
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(
            name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}
        )
    except MlflowException:  # created meanwhile by another process
        return client.get_experiment_by_name(name).experiment_id


def find_or_create_run(
    client: Any, experiment: str, run_name: str, params: Mapping[str, str] | None = None
) -> tuple[str, str]:
    """(experiment id, run id) of the run named ``run_name`` in ``experiment``: the existing one (a
    re-run continues its MLflow run as it continues its checkpoints), or a new one holding ``params``."""
    experiment_id = ensure_experiment(client, experiment)
    quoted = run_name.replace("'", "\\'")
    runs = client.search_runs(
        [experiment_id], filter_string=f"attributes.run_name = '{quoted}'", max_results=1
    )
    if runs:
        return experiment_id, runs[0].info.run_id
    run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
    log_batch(client, run_id, params=params)
    return experiment_id, run_id
