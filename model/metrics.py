"""Metrics and events from rank 0, written by a background thread so they never stall a step.

The trainer hands over plain Python values (already on the host: it syncs once every
``log_interval`` steps) and returns at once; the thread prints one JSON object per line,
``METRIC {...}`` and ``EVENT {...}`` (the job's progress protocol, parsed by the Prefect task that
follows the job), and sends them to MLflow in batches (``MlflowClient.log_batch``) when a tracking
URI is configured. MLflow trouble is reported and switches MLflow off; it never stops training.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from typing import Any

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


class MetricsLogger:
    """Asynchronous METRIC/EVENT lines (+ MLflow). On ranks other than 0 every call is a no-op."""

    def __init__(
        self,
        enabled: bool,
        tracking_uri: str | None = None,
        experiment: str = "pretrain",
        run_name: str | None = None,
        run_id: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self.run_id: str | None = None
        self._client = None
        self._queue: queue.Queue = queue.Queue()
        if not enabled:
            return
        if tracking_uri:
            self._start_mlflow(tracking_uri, experiment, run_name, run_id, params or {})
        self._thread = threading.Thread(target=self._drain, name="metrics", daemon=True)
        self._thread.start()

    def _start_mlflow(
        self, uri: str, experiment: str, run_name: str | None, run_id: str | None, params: dict[str, Any]
    ) -> None:
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=uri)
            if run_id is None:
                exp = client.get_experiment_by_name(experiment)
                exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
                run_id = client.create_run(exp_id, run_name=run_name).info.run_id
                flat: dict[str, str] = {}
                _flatten("", params, flat)
                items = [Param(k, v[:6000]) for k, v in sorted(flat.items())]
                for start in range(0, len(items), 100):
                    client.log_batch(run_id, params=items[start : start + 100])
            self._client, self.run_id = client, run_id
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
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        if kind == "METRIC":
            metrics = [
                Metric(key, float(value), now, step)
                for key, value in payload.items()
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)
            ]
            self._client.log_batch(self.run_id, metrics=metrics)
        else:
            name = payload["event"]
            self._client.log_batch(
                self.run_id,
                metrics=[Metric(f"event.{name}", 1.0, now, step)],
                tags=[RunTag(f"event.{name}.last", json.dumps(payload)[:5000])],
            )
            if name == "done":
                self._client.set_terminated(self.run_id, "FINISHED")
            elif name == "failed":
                self._client.set_terminated(self.run_id, "FAILED")
