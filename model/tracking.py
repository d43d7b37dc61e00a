"""MLflow helpers shared by the trainer (``model/``, under torchrun) and the flows (``tasks/``).

One place for what MLflow constrains: metric names, the per-call limits of ``log_batch``, and
finding-or-creating a run by name; and ``BufferedClient``, whose writes outlive a tracking server
restart. Imports MLflow lazily: the trainer runs without a server.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
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


def _print_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class BufferedClient:
    """An ``MlflowClient`` whose writes never fail or hold up the caller, and survive the tracking
    server going away (killed, restarted, upgraded).

    Writes (``log_batch``, ``log_text``, ``update_run``, ``set_terminated``) go into an ordered buffer
    and return at once; a thread sends them in order. A write that fails because the server is
    unreachable or failing (no response, 5xx, 429) stays first in line and is tried again with
    exponential backoff, so once the server is back everything is sent, in order, with the
    timestamps it was logged with. A write the server rejects (another 4xx) is dropped and counted in
    ``rejected``. The buffer is bounded: past ``max_pending`` writes the oldest is dropped and counted
    in ``dropped`` (and said on stderr). ``log_text`` to the same file replaces a write of it still
    waiting (it rewrites the whole file). ``set_terminated`` is the run's last write: it waits until
    everything is sent, up to ``flush_timeout_s``. Everything else (reads, ``create_run``) goes
    straight to the client.

    MLflow's own HTTP retries (7, exponential: about 4 minutes per call, then 64 s and more between
    tries) are cut to ``http_retries`` quick ones for the whole process unless its environment sets
    them: this client retries by itself, and a long inner backoff would leave it waiting long after the
    server is back. Meant for a process whose MLflow client this is, the trainer's.
    """

    def __init__(
        self,
        client: Any,
        *,
        max_pending: int = 10_000,
        backoff_s: tuple[float, float] = (0.5, 10.0),
        flush_timeout_s: float = 120.0,
        http_retries: int = 2,
        say: Callable[[str], None] = _print_stderr,
    ) -> None:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(http_retries))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        self.client = client
        self.max_pending = max_pending
        self.backoff_s = backoff_s
        self.flush_timeout_s = flush_timeout_s
        self.say = say
        self.dropped = 0
        self.rejected = 0
        self._pending: deque[tuple[str, tuple[Any, ...], dict[str, Any]]] = deque()
        self._busy = False  # the sender holds a write it has not finished with
        self._changed = threading.Condition()
        threading.Thread(target=self._send_all, name="mlflow-writes", daemon=True).start()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def log_batch(self, run_id: str, **items: Any) -> None:
        self._write("log_batch", (run_id,), items)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        with self._changed:
            for i, (method, args, _) in enumerate(self._pending):
                if method == "log_text" and args[0] == run_id and args[2] == artifact_file:
                    del self._pending[i]
                    break
        self._write("log_text", (run_id, text, artifact_file), {})

    def update_run(self, run_id: str, **fields: Any) -> None:
        self._write("update_run", (run_id,), fields)

    def set_terminated(self, run_id: str, status: str | None = None) -> None:
        self._write("set_terminated", (run_id, status), {})
        if not self.flush(self.flush_timeout_s):
            self.say(
                f"mlflow: {self.pending()} writes not sent within {self.flush_timeout_s:.0f} s "
                "(tracking server away); they are lost when this process ends"
            )

    def pending(self) -> int:
        """Writes not sent yet (the one being sent included)."""
        with self._changed:
            return len(self._pending) + self._busy

    def flush(self, timeout: float) -> bool:
        """Wait until every write so far is sent, or ``timeout`` seconds; whether all were."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._pending and not self._busy, timeout)

    def _write(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        with self._changed:
            if len(self._pending) >= self.max_pending:
                self._pending.popleft()
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    self.say(
                        f"mlflow: write buffer full ({self.max_pending}); {self.dropped} oldest writes dropped"
                    )
            self._pending.append((method, args, kwargs))
            self._changed.notify_all()

    def _send_all(self) -> None:
        backoff, outage_since = self.backoff_s[0], None
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._pending))
                method, args, kwargs = self._pending[0]
                self._busy = True
            try:
                getattr(self.client, method)(*args, **kwargs)
                sent = True
            except Exception as exc:
                sent = not _retryable(exc)
                if sent:  # rejected for good: retrying would block every write behind it
                    self.rejected += 1
                    self.say(f"mlflow: {method} rejected, dropped: {exc!r}")
                elif outage_since is None:
                    outage_since = time.monotonic()
                    self.say(f"mlflow: tracking server unreachable, buffering writes: {exc!r}")
            with self._changed:
                if sent:
                    if self._pending and self._pending[0][1] is args:  # not dropped meanwhile
                        self._pending.popleft()
                    if outage_since is not None:
                        self.say(
                            f"mlflow: tracking server back after {time.monotonic() - outage_since:.0f} s; "
                            f"sending the {len(self._pending)} writes buffered meanwhile"
                        )
                        outage_since = None
                    backoff = self.backoff_s[0]
                self._busy = False
                self._changed.notify_all()
            if not sent:
                time.sleep(backoff)
                backoff = min(2 * backoff, self.backoff_s[1])


def _retryable(exc: Exception) -> bool:
    """Whether a failed MLflow call may succeed later: no response, a server error, rate limiting."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return status >= 500 or status == 429
    return True  # connection refused or reset, timeouts
