"""Metrics and events from rank 0, written by a background thread so they never stall a step.

The trainer hands over plain Python values (already on the host: it syncs once every
``log_interval`` steps) and returns at once; the thread prints one JSON object per line,
``METRIC {...}`` and ``EVENT {...}`` (the job's progress protocol, parsed by the Prefect task that
follows the job), and sends them to MLflow (``model.tracking.log_batch``) when a tracking URI is
configured. MLflow trouble is reported and switches MLflow off; it never stops training.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
from typing import Any

from model.tracking import BufferedClient, ensure_experiment, find_or_create_run, log_batch

# Dense (no sparsity) bf16 tensor-core peak per GPU, by device-name fragment; first match wins,
# so more specific names come first.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("GH200", 989e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("H20", 148e12),
    ("B200", 2250e12),
    ("B100", 1750e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L4", 121e12),
    ("MI300X", 1307e12),
]


def peak_bf16_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of one such device, or None when unknown (CPU, unlisted GPU)."""
    for fragment, peak in PEAK_BF16_FLOPS:
        if fragment in device_name:
            return peak
    return None


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out[prefix] = str(value)


EVENTS_ARTIFACT = "events.jsonl"
# Fields of the start/resumed event that describe the run, and the tags that show them.
_RUN_TAGS = {
    "world_size": "pretrain.world_size",
    "device": "pretrain.device",
    "params": "pretrain.model_params",
    "tokens_per_step": "pretrain.tokens_per_step",
    "flops_per_token": "pretrain.flops_per_token",
}


def event_to_mlflow(payload: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, tags) that show an EVENT record in MLflow readably: a mark ``events/<name>`` on the
    charts at its step, the checkpoint timings, what the run is (at start) and its state."""
    name = payload["event"]
    metrics: dict[str, float] = {f"events/{name}": 1.0}
    tags = {"pretrain.last_event": name}
    if name == "checkpoint":
        metrics["checkpoint/blocked_s"] = float(payload["blocked_s"])
        metrics["checkpoint/total_s"] = float(payload["total_s"])
    elif name == "rollback":
        metrics["health/rollback_to_step"] = float(payload["to_step"])
    elif name in ("start", "resumed"):
        tags |= {tag: str(payload[key]) for key, tag in _RUN_TAGS.items() if key in payload}
    elif name == "failed":
        tags["pretrain.error"] = str(payload.get("error", ""))[:1000]
    return metrics, tags


class MetricsLogger:
    """Asynchronous METRIC/EVENT lines (+ MLflow). On ranks other than 0 every call is a no-op.

    In MLflow: METRIC values as metrics; each event as a few named metrics and tags
    (``event_to_mlflow``) and a line of the artifact ``events.jsonl`` (every event of the run, resumed
    attempts included); the machine's CPU, memory and (with pynvml) GPU use as MLflow system metrics
    every ``system_metrics_s`` seconds.
    """

    def __init__(
        self,
        enabled: bool,
        tracking_uri: str | None = None,
        experiment: str = "pretrain",
        run_name: str | None = None,
        run_id: str | None = None,
        params: dict[str, Any] | None = None,
        system_metrics_s: float | None = None,
    ) -> None:
        self.enabled = enabled
        self.run_id: str | None = None
        self._client = None
        self._system_metrics = None
        self._events: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        if not enabled:
            return
        if tracking_uri:
            self._start_mlflow(tracking_uri, experiment, run_name, run_id, params or {}, system_metrics_s)
        self._thread = threading.Thread(target=self._drain, name="metrics", daemon=True)
        self._thread.start()

    def _start_mlflow(
        self,
        uri: str,
        experiment: str,
        run_name: str | None,
        run_id: str | None,
        params: dict[str, Any],
        system_metrics_s: float | None,
    ) -> None:
        try:
            from mlflow.tracking import MlflowClient

            # Buffered: a tracking server that restarts mid-run loses no metric and stalls no step.
            client = BufferedClient(MlflowClient(tracking_uri=uri))
            resumed = run_id is not None
            if run_id is None:
                flat: dict[str, str] = {}
                _flatten("", params, flat)
                if run_name:
                    _, run_id = find_or_create_run(client, experiment, run_name, flat)
                else:
                    run_id = client.create_run(ensure_experiment(client, experiment)).info.run_id
                    log_batch(client, run_id, params=flat)
            if resumed:  # events of the earlier attempts, if it logged any; the run is running again
                self._events = _logged_events(client, run_id)
                client.update_run(run_id, status="RUNNING")
            self._client, self.run_id = client, run_id
            if system_metrics_s:
                self._system_metrics = _start_system_metrics(run_id, uri, system_metrics_s, resumed)
        except Exception as exc:  # MLflow is an observer: its failure must not stop training
            print(f"mlflow disabled: {exc!r}", file=sys.stderr, flush=True)

    def metric(self, step: int, values: dict[str, float | int | None]) -> None:
        if self.enabled:
            self._queue.put(("METRIC", step, {"step": step, **values}))

    def event(self, event: str, step: int, **fields: Any) -> None:
        if self.enabled:
            self._queue.put(("EVENT", step, {"event": event, "step": step, **fields}))

    def close(self) -> None:
        """Flush everything queued and stop the thread (the MLflow run is ended by the final event)."""
        if self.enabled:
            self._queue.put(None)
            self._thread.join()
            if self._system_metrics is not None:
                self._system_metrics.finish()

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            kind, step, payload = item
            print(f"{kind} {json.dumps(payload)}", flush=True)
            if self._client is not None:
                try:
                    self._to_mlflow(kind, step, payload)
                except Exception as exc:
                    print(f"mlflow disabled: {exc!r}", file=sys.stderr, flush=True)
                    self._client = None

    def _to_mlflow(self, kind: str, step: int, payload: dict[str, Any]) -> None:
        if kind == "METRIC":
            metrics = {
                key: value
                for key, value in payload.items()
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)
            }
            log_batch(self._client, self.run_id, metrics=metrics, step=step)
            return
        metrics, tags = event_to_mlflow(payload)
        log_batch(self._client, self.run_id, metrics=metrics, step=step, tags=tags)
        self._events.append(json.dumps(payload))
        self._client.log_text(self.run_id, "\n".join(self._events) + "\n", EVENTS_ARTIFACT)
        if payload["event"] == "done":
            self._client.set_terminated(self.run_id, "FINISHED")
        elif payload["event"] == "failed":
            self._client.set_terminated(self.run_id, "FAILED")


def _logged_events(client: Any, run_id: str) -> list[str]:
    """The lines of the run's ``events.jsonl`` artifact, or none when it has none yet."""
    import tempfile

    if not any(f.path == EVENTS_ARTIFACT for f in client.list_artifacts(run_id)):
        return []
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, EVENTS_ARTIFACT, tmp)
        with open(path, encoding="utf-8") as f:
            return [line for line in f.read().splitlines() if line]


def _start_system_metrics(run_id: str, uri: str, every_s: float, resumed: bool) -> Any:
    """MLflow's system metrics monitor (CPU, memory, disk, network; GPUs when pynvml is installed)
    logging into the run: the same monitor ``mlflow.start_run(log_system_metrics=True)`` starts, here
    for a run made by ``MlflowClient``."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=every_s, resume_logging=resumed, tracking_uri=uri
    )
    monitor.start()
    return monitor
