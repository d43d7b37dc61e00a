"""The training job end to end: ``torchrun --nproc-per-node 2 -m model.trainer`` on CPU (gloo, tiny
preset) over real packed shards of the corpus (made by tasks.tokenizer and tasks.pack). Loss goes down;
kill -9 mid-step or mid-checkpoint-write, then resume, gives the bitwise same losses and final weights
and optimizer state; SIGTERM checkpoints and stops cleanly; an injected NaN batch is skipped; an
injected spike rolls back; metrics land in a real MLflow store. Spike recovery that needs a checkpoint
from before the spike: tests/test_spike_recovery.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from model.checkpoint import COMPLETE, complete_checkpoints, latest_checkpoint
from model.data import read_packing_info
from tasks import pack
from tasks import tokenizer as tk
from tests.test_tokenizer import SMALL, build_lid_dataset

REPO = Path(__file__).resolve().parents[1]
VOCAB, SEQ_LEN = 512, 64

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def packed(corpus: Path, tmp_path_factory) -> Path:
    return pack_corpus(corpus, tmp_path_factory)


def pack_corpus(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real packed shards: 600 passages of lid-dev.jsonl through the tokenizer and pack stages."""
    docs = build_lid_dataset(corpus, tmp_path_factory.mktemp("docs"), limit=600, shards=2)
    tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
    tk.train_tokenizer([docs], tokenizer_dir, SMALL)
    out = tmp_path_factory.mktemp("packed")
    pack.pack_datasets([docs], tokenizer_dir, out, pack.PackConfig(seq_len=SEQ_LEN, validation_fraction=0.05))
    info = read_packing_info(out)
    assert (info["seq_len"], info["vocab_size"]) == (SEQ_LEN, VOCAB)
    return out


def config(packed: Path, run_dir: Path, **overrides) -> dict:
    return {
        "model": "tiny",
        "data_dir": str(packed),
        "checkpoint_dir": str(run_dir / "checkpoints"),
        "micro_batch_size": 8,
        "grad_accum_steps": 2,
        "max_steps": 24,
        "log_interval": 1,
        "checkpoint_interval": 8,
        "keep_checkpoints": 2,
        "optim": {"lr": 3e-3, "warmup_steps": 4},
        **overrides,
    }


class Run:
    def __init__(self, returncode: int, lines: list[str]) -> None:
        self.returncode, self.lines = returncode, lines
        self.metrics = [json.loads(x.removeprefix("METRIC ")) for x in lines if x.startswith("METRIC ")]
        self.events = [json.loads(x.removeprefix("EVENT ")) for x in lines if x.startswith("EVENT ")]

    def losses(self) -> dict[int, float]:
        """Loss by step, the last report winning (a rollback re-reports replayed steps)."""
        return {m["step"]: m["loss"] for m in self.metrics}

    def named(self, event: str) -> list[dict]:
        return [e for e in self.events if e["event"] == event]


def descendants(pid: int) -> list[int]:
    """Child processes of ``pid``, recursively (torchrun may start its workers in their own sessions)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def stop(pid: int, sig: int) -> None:
    """SIGKILL: the launcher and every worker at once (a node dying); else the launcher only, which
    forwards the signal to its workers (what a scheduler's preemption does)."""
    for target in [pid, *descendants(pid)] if sig == signal.SIGKILL else [pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, sig)


def complete_marker(cfg: dict, step: int) -> Path:
    """The file whose appearance makes checkpoint ``step`` complete."""
    return Path(cfg["checkpoint_dir"]) / f"step-{step}" / COMPLETE


def train(
    cfg: dict,
    run_dir: Path,
    stop_when: Path | Callable[[], bool] | None = None,
    sig: int = signal.SIGKILL,
) -> Run:
    """torchrun 2 CPU ranks; with ``stop_when`` (a path, or a test of the disk), send ``sig`` to the
    job as soon as that path exists (watching the disk, not the log: log lines may lag the training)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps(cfg))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "model.trainer", "--config", str(run_dir / "run.json")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip("\n") for line in proc.stdout))
    reader.start()
    try:
        if stop_when is not None:
            reached = stop_when.exists if isinstance(stop_when, Path) else stop_when
            while proc.poll() is None and not reached():
                time.sleep(0.002)
            stop(proc.pid, sig)
        returncode = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            stop(proc.pid, signal.SIGKILL)
        reader.join()
    return Run(returncode, lines)


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor (weights, optimizer moments, step counts) of the run's last checkpoint, by name."""
    path = latest_checkpoint(run_dir / "checkpoints")
    flat = run_dir / f"{path.name}.pt"
    dcp_to_torch_save(path, flat)  # reads the DCP shards without a process group
    found: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}", inner)
        elif isinstance(value, torch.Tensor):
            found[prefix] = value

    walk(path.name, torch.load(flat, weights_only=False))
    return {name.split(".", 1)[1]: tensor for name, tensor in found.items()}


def assert_bitwise_equal(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert state.keys() == expected.keys() and len(state) > 10
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


@pytest.fixture(scope="module")
def reference(packed: Path, tmp_path_factory) -> tuple[Run, Path]:
    """One uninterrupted run, logging to a real MLflow store (sqlite)."""
    run_dir = tmp_path_factory.mktemp("reference")
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    mlflow = {"tracking_uri": uri, "run_name": "ref", "system_metrics_s": 0.5}
    run = train(config(packed, run_dir, mlflow=mlflow), run_dir)
    assert run.returncode == 0, "\n".join(run.lines[-40:])
    return run, run_dir


def test_training_reduces_the_loss(reference):
    run, run_dir = reference
    losses = run.losses()
    assert sorted(losses) == list(range(1, 25))
    first, last = losses[1], sum(losses[k] for k in range(21, 25)) / 4
    assert last < first - 0.5, losses
    done = run.named("done")[0]
    assert done["step"] == 24 and done["tokens_seen"] == 24 * 2 * 8 * 2 * SEQ_LEN
    assert done["skipped_updates"] == 0 and done["rollbacks"] == 0
    assert [s for s, _ in complete_checkpoints(run_dir / "checkpoints")] == [16, 24]  # keep the last 2
    m = run.metrics[-1]
    assert m["tokens_per_s"] > 0 and m["step_time_s"] > 0 and m["data_wait_s"] >= 0 and m["lr"] > 0


def test_metrics_reach_mlflow(reference):
    from mlflow.tracking import MlflowClient

    run, run_dir = reference
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = run.named("start")[0]["mlflow_run_id"]
    assert run_id and run.named("done")[0]["mlflow_run_id"] == run_id
    stored = client.get_run(run_id)
    assert stored.info.status == "FINISHED" and stored.info.run_name == "ref"
    assert stored.data.params["config.model"] == "tiny" and stored.data.params["model_shapes.dim"] == "64"
    history = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert history == pytest.approx(run.losses(), rel=1e-6)
    for key in ("lr", "grad_norm", "tokens_per_s", "step_time_s", "data_wait_s", "events/checkpoint"):
        assert key in stored.data.metrics, key
    # Events read as named metrics and tags, never as raw JSON; all of them in events.jsonl.
    assert [m.step for m in client.get_metric_history(run_id, "checkpoint/total_s")] == [8, 16, 24]
    assert (
        stored.data.tags["pretrain.world_size"] == "2" and stored.data.tags["pretrain.last_event"] == "done"
    )
    assert not any(value.startswith("{") for value in stored.data.tags.values())
    events = client.download_artifacts(run_id, "events.jsonl", str(run_dir / "downloaded"))
    logged = [json.loads(line) for line in Path(events).read_text().splitlines()]
    assert [e["event"] for e in logged] == [e["event"] for e in run.events]
    # MLflow's system metrics, logged for a run the trainer made with MlflowClient.
    assert any(key.startswith("system/cpu_utilization") for key in stored.data.metrics), stored.data.metrics


# Where SIGKILL hits the whole job (launcher and every rank at once, a node dying): inside a training
# step (just after the step-8 checkpoint is complete, the ranks are in step 9 or 10), and in the middle
# of writing the step-16 checkpoint (its temporary directory exists, it is not complete).
KILL_POINTS = {
    "mid-step": lambda cfg: complete_marker(cfg, 8),
    "mid-checkpoint-write": lambda cfg: Path(cfg["checkpoint_dir"]) / "step-16.tmp",
}


@pytest.mark.parametrize("kill_point", KILL_POINTS)
def test_kill_9_then_resume_gives_the_bitwise_same_run(packed, reference, tmp_path, kill_point):
    ref, ref_dir = reference
    cfg = config(packed, tmp_path)
    killed = train(cfg, tmp_path, stop_when=KILL_POINTS[kill_point](cfg))
    assert killed.returncode != 0 and not killed.named("done")
    ckpts = tmp_path / "checkpoints"
    saved = [s for s, _ in complete_checkpoints(ckpts)]
    assert saved and saved[-1] < 24
    if kill_point == "mid-checkpoint-write":
        assert (ckpts / "step-16.tmp").is_dir() and not (ckpts / "step-16").exists() and saved[-1] == 8
    # What a crash in the middle of a save leaves behind must be ignored, not resumed from.
    (ckpts / "step-20.tmp").mkdir(exist_ok=True)
    (ckpts / "step-22").mkdir()
    (ckpts / "step-22" / ".metadata").write_bytes(b"torn")

    resumed = train(cfg, tmp_path)
    assert resumed.returncode == 0, "\n".join(resumed.lines[-40:])
    start = resumed.named("resumed")[0]
    assert start["step"] == saved[-1] and start["checkpoint"].endswith(f"step-{saved[-1]}")
    assert [m["step"] for m in resumed.metrics] == list(range(saved[-1] + 1, 25))
    expected = ref.losses()
    for step, loss in killed.losses().items():
        assert loss == expected[step], step
    for step, loss in resumed.losses().items():
        assert loss == expected[step], step  # exact float equality: bitwise identical
    assert_bitwise_equal(final_state(tmp_path), final_state(ref_dir))
    assert not list(ckpts.glob("*.tmp"))
    assert all((p / COMPLETE).exists() for _, p in complete_checkpoints(ckpts))


def test_fsdp_reshard_and_prefetch_settings_leave_the_losses_bitwise_equal(packed, reference, tmp_path):
    """Keeping gathered weights and prefetching two blocks change memory and overlap, not the math."""
    ref, _ = reference
    cfg = config(packed, tmp_path, fsdp_reshard_after_forward="never", fsdp_prefetch=2)
    run = train(cfg, tmp_path)
    assert run.returncode == 0, "\n".join(run.lines[-40:])
    assert run.losses() == ref.losses()


@pytest.mark.parametrize("checkpoint_async", [True, False], ids=["async-save", "sync-save"])
def test_sigterm_checkpoints_and_stops_cleanly(packed, tmp_path, checkpoint_async):
    cfg = config(packed, tmp_path, checkpoint_async=checkpoint_async)
    run = train(cfg, tmp_path, stop_when=complete_marker(cfg, 8), sig=signal.SIGTERM)
    preempted = run.named("preempted")
    assert preempted, "\n".join(run.lines[-40:])
    step = preempted[0]["step"]
    assert 8 <= step < 24 and not run.named("done")
    assert complete_checkpoints(tmp_path / "checkpoints")[-1][0] == step


def test_injected_nan_is_skipped_and_injected_spike_rolls_back(packed, reference, tmp_path):
    ref, _ = reference
    health = {
        "debug_inject_nan_at_step": 5,
        "debug_inject_spike_at_step": 11,
        "spike_min_history": 4,
        "rollback_min_steps_before": 0,  # roll back to the newest checkpoint
    }
    run = train(config(packed, tmp_path, health=health), tmp_path)
    assert run.returncode == 0, "\n".join(run.lines[-40:])
    # NaN: reported, update skipped on device, training goes on.
    (nan_event,) = run.named("nonfinite_skipped")
    assert nan_event["step"] == 5
    nan_metric = next(m for m in run.metrics if m["step"] == 5)
    assert nan_metric["loss"] != nan_metric["loss"] and nan_metric["skipped_updates"] == 1
    # Before the NaN the run equals the reference; the skipped update changes what follows.
    assert all(run.metrics[i]["loss"] == ref.losses()[i + 1] for i in range(4))
    # Spike at step 11: rolled back to the step-8 checkpoint, the batches drawn since (9-11) skipped.
    (rollback,) = run.named("rollback")
    assert (rollback["step"], rollback["to_step"], rollback["spike_data_step"]) == (11, 8, 11)
    assert rollback["checkpoint"].endswith("step-8") and rollback["skipped_batches"] == 3
    assert (rollback["skip_first_data_step"], rollback["skip_last_data_step"]) == (9, 11)
    (skipped,) = run.named("batches_skipped")
    assert (skipped["step"], skipped["first_data_step"], skipped["last_data_step"]) == (8, 9, 11)
    steps = [m["step"] for m in run.metrics]
    assert steps == [*range(1, 12), *range(9, 25)]
    first_pass = {m["step"]: m["loss"] for m in run.metrics[:11]}
    assert first_pass[11] > 10 * first_pass[10]
    after = [m["loss"] for m in run.metrics[11:]]
    assert max(after) < 2 * first_pass[10]
    done = run.named("done")[0]
    assert done["skipped_updates"] == 1 and done["rollbacks"] == 1 and done["step"] == 24
