"""Evaluate a checkpoint: validation loss and perplexity per slice of the packed validation split.

Runs in one CPU process with no process group: the model is built plain (no FSDP) from the run's
``run.json`` and the data's vocabulary, and its weights are read from the DCP checkpoint with
``torch.distributed.checkpoint`` directly (DCP reshards whatever world size wrote it).

The validation split is grouped by slice (language x source, see tasks/pack.py): each slice is one
token range of the split's stream, recorded in ``packing.json``. Every predicted token is credited to
the slice whose range holds it (a window across a boundary is split between its two slices).
Each slice contributes at most ``max_sequences_per_slice`` windows (its first ones), which bounds the
cost of an eval while every slice is still measured.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from model import data as packed
from model.checkpoint import COMPLETE
from model.config import TrainConfig, load_config
from model.model import Transformer
from tasks.train import RUN_CONFIG


class SliceMetrics(BaseModel):
    loss: float
    perplexity: float
    tokens: int = Field(description="Predicted tokens the numbers are over.")


class EvalResult(BaseModel):
    checkpoint: str
    step: int
    loss: float = Field(description="Over every evaluated token, all slices together.")
    perplexity: float
    tokens: int
    slices: dict[str, SliceMetrics]
    seconds: float


def checkpoint_step(checkpoint: str | Path) -> int:
    """The step of a complete checkpoint (its COMPLETE marker); a clear error for anything else."""
    marker = Path(checkpoint) / COMPLETE
    if not marker.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint: no {COMPLETE} marker")
    return int(json.loads(marker.read_text())["step"])


def run_config_for(checkpoint: str | Path) -> Path:
    """``<run>/run.json`` for ``<run>/checkpoints/step-N`` (the layout tasks/train.py makes)."""
    path = Path(checkpoint).resolve().parent.parent / RUN_CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"no {RUN_CONFIG} beside {Path(checkpoint).parent}; pass the run config explicitly"
        )
    return path


def load_model(checkpoint: str | Path, config: TrainConfig, vocab_size: int, seq_len: int) -> Transformer:
    """The checkpoint's weights in a plain fp32 Transformer on CPU, in eval mode."""
    model = Transformer(config.model_config_for(vocab_size=vocab_size, seq_len=seq_len))
    # The trainer saved get_state_dict(model, ...)["model"]; the same API here gives the same keys.
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=Path(checkpoint), no_dist=True)
    set_model_state_dict(model, state["model"])
    return model.eval()


def validation_windows(info: dict, max_sequences_per_slice: int) -> dict[str, range]:
    """Per slice, the window indices (into the validation stream) it is evaluated on."""
    window = info["window"]
    split = info["splits"]["validation"]
    total = split["sequences"]
    out: dict[str, range] = {}
    for name, entry in sorted(split.get("slices", {}).items()):
        first = entry["token_start"] // window
        last = min((entry["token_end"] - 1) // window, total - 1)
        if first <= last:  # else the slice fell wholly in the dropped tail
            out[name] = range(first, min(last + 1, first + max_sequences_per_slice))
    return out


def evaluate_checkpoint(
    checkpoint: str | Path,
    data_dir: str | Path | None = None,
    config_path: str | Path | None = None,
    max_sequences_per_slice: int = 64,
    batch_size: int = 8,
    threads: int | None = None,
) -> EvalResult:
    """Loss and perplexity per validation slice of ``checkpoint`` (data dir: the run's, unless given).

    ``threads`` caps torch's CPU threads for the eval (it often runs beside a training job).
    """
    with torch_threads(threads):
        return _evaluate(checkpoint, data_dir, config_path, max_sequences_per_slice, batch_size)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def _evaluate(
    checkpoint: str | Path,
    data_dir: str | Path | None,
    config_path: str | Path | None,
    max_sequences_per_slice: int,
    batch_size: int,
) -> EvalResult:
    started = time.perf_counter()
    checkpoint = Path(checkpoint)
    step = checkpoint_step(checkpoint)
    config = load_config(config_path or run_config_for(checkpoint))
    data_dir = Path(data_dir or config.data_dir)
    info = packed.read_packing_info(data_dir)
    if "validation" not in info["splits"] or not info["splits"]["validation"]["sequences"]:
        raise ValueError(f"{data_dir} has no validation sequences to evaluate on")
    model = load_model(checkpoint, config, info["vocab_size"], info["seq_len"])

    window, seq_len = info["window"], info["seq_len"]
    shards = packed.open_shards(data_dir, "validation", info)
    shard_starts = np.cumsum([0, *[len(s) for s in shards]])
    bounds = info["splits"]["validation"]["slices"]
    per_slice: dict[str, SliceMetrics] = {}
    loss_sum, token_count = 0.0, 0
    for name, windows in validation_windows(info, max_sequences_per_slice).items():
        slice_sum, slice_tokens = 0.0, 0
        for i in range(0, len(windows), batch_size):
            batch = np.array(windows[i : i + batch_size], dtype=np.int64)
            shard_of = np.searchsorted(shard_starts, batch, side="right") - 1
            rows = [shards[s][w - shard_starts[s]] for s, w in zip(shard_of, batch, strict=True)]
            tokens = torch.from_numpy(np.stack(rows).astype(np.int64))
            logits = model(tokens[:, :-1])
            nll = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
            # Stream position of each predicted token: its window's start + 1 + offset.
            positions = batch[:, None] * window + 1 + np.arange(seq_len)[None, :]
            inside = (positions >= bounds[name]["token_start"]) & (positions < bounds[name]["token_end"])
            slice_sum += float(nll.view(len(batch), seq_len).numpy()[inside].sum())
            slice_tokens += int(inside.sum())
        if slice_tokens:
            per_slice[name] = SliceMetrics(
                loss=slice_sum / slice_tokens,
                perplexity=math.exp(slice_sum / slice_tokens),
                tokens=slice_tokens,
            )
            loss_sum, token_count = loss_sum + slice_sum, token_count + slice_tokens
    if not token_count:
        raise ValueError(f"{data_dir}: no validation slice has a token to evaluate")
    loss = loss_sum / token_count
    return EvalResult(
        checkpoint=str(checkpoint),
        step=step,
        loss=loss,
        perplexity=math.exp(loss),
        tokens=token_count,
        slices=per_slice,
        seconds=time.perf_counter() - started,
    )


# ---------------------------------------------------------------------------------------------
# MLflow


def metric_key(*parts: str) -> str:
    """An MLflow metric name (letters, digits, _ - . / and spaces only)."""
    return re.sub(r"[^0-9A-Za-z_\-. /]", "_", "/".join(parts))


def eval_metrics(result: EvalResult) -> dict[str, float]:
    metrics = {
        "val/loss": result.loss,
        "val/perplexity": result.perplexity,
        "val/tokens": float(result.tokens),
    }
    for name, m in result.slices.items():
        metrics[metric_key("val", name, "loss")] = m.loss
        metrics[metric_key("val", name, "perplexity")] = m.perplexity
    return metrics


def log_eval(result: EvalResult, tracking_uri: str, run_id: str, end_run: bool = False) -> None:
    """Log an eval into an MLflow run at the checkpoint's step (a curve over checkpoints)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, result.step) for key, value in sorted(eval_metrics(result).items())]
    client = MlflowClient(tracking_uri=tracking_uri)
    for start in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[start : start + 500])
    if end_run:
        client.set_terminated(run_id, "FINISHED")


@task(name="evaluate-checkpoint", cache_policy=NO_CACHE)
def evaluate(
    checkpoint: str,
    data_dir: str | None = None,
    config_path: str | None = None,
    max_sequences_per_slice: int = 64,
    threads: int | None = None,
    tracking_uri: str | None = None,
    mlflow_run_id: str | None = None,
    end_mlflow_run: bool = False,
) -> EvalResult:
    """Evaluate one checkpoint on the validation split; log it to the MLflow run when given one."""
    result = evaluate_checkpoint(checkpoint, data_dir, config_path, max_sequences_per_slice, threads=threads)
    get_run_logger().info(
        "step %d: val loss %.4f (ppl %.2f) over %d tokens and %d slices in %.1fs",
        result.step, result.loss, result.perplexity, result.tokens, len(result.slices), result.seconds,
    )  # fmt: skip
    create_table_artifact(
        [{"slice": name, **m.model_dump()} for name, m in result.slices.items()],
        key=re.sub(
            r"[^a-z0-9-]+", "-", f"eval-{Path(checkpoint).resolve().parent.parent.name}".lower()
        ).strip("-"),
        description=f"Validation loss per slice at step {result.step} ({result.checkpoint})",
    )
    if tracking_uri and mlflow_run_id:
        log_eval(result, tracking_uri, mlflow_run_id, end_run=end_mlflow_run)
    return result
