"""The training job: ``torchrun --nproc-per-node N -m model.trainer --config run.json`` (or .yaml).

One code path for CPU and GPU: gloo + fp32 on CPU, NCCL + bf16 mixed precision on GPU; FSDP2 over
all ranks either way. Each step: gradient-accumulated forward/backward, global grad-norm clipping
folded into the fused AdamW kernel, whose update is skipped *on the device* when the loss or
gradient is not finite (its ``found_inf`` flag: no host sync), linear warmup + cosine decay to a floor.

The host syncs only at "sync points" (every ``log_interval`` steps, at checkpoints, at the end):
there the per-step losses come over in one transfer, metrics are handed to a background thread,
non-finite steps are reported, the loss-spike detector runs (a spike rolls back to a checkpoint from
before it and skips the batches since: ``model/health.py``), a checkpoint whose background write has finished on
every rank is made complete, and a SIGTERM seen by any rank becomes a checkpoint and a clean exit on
all ranks.

Progress protocol on rank 0's stdout, one JSON object per line: ``METRIC {...}`` per sync point,
``EVENT {...}`` for start, resume, skips, rollbacks, checkpoints, preemption and ``done``/``failed``.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from model.checkpoint import Checkpointer, Saved, complete_checkpoints, latest_checkpoint
from model.config import OptimConfig, TrainConfig, load_config
from model.health import Recovery, SpikeDetector, plan_recovery, recoveries_near, rollback_step
from model.metrics import MetricsLogger, peak_bf16_flops
from model.model import ModelConfig, Transformer
from model.parallelize import parallelize, prefer_attention_kernel


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for the update that makes step ``step + 1``: linear warmup, cosine to a floor."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """Fused AdamW (CPU and CUDA); weight decay on matrices only, not on norms (or any vector)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)


def build_model(
    cfg: ModelConfig,
    mesh: DeviceMesh,
    device: torch.device,
    *,
    seed: int,
    **parallel: Any,
) -> Transformer:
    """Build on the meta device, shard, then materialise and initialise only each rank's shard.

    ``parallel``: the keyword arguments of ``model.parallelize.parallelize`` (mixed precision, ...).
    """
    with torch.device("meta"):
        model = Transformer(cfg)
    parallelize(model, mesh, **parallel)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model


def grad_norm(model: torch.nn.Module) -> torch.Tensor:
    """The global L2 norm of the gradients (a device scalar, no sync)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()  # sharded grads: the partial norms are summed across ranks here
    return total


def train_step(
    model: Transformer,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    grad_clip: float,
    loss_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step over ``micro_batches``; returns (this rank's mean loss, grad norm, finite flag).

    Nothing here waits for the device. A non-finite loss makes the gradients non-finite on every
    rank (the reduce-scatter spreads them), so the global grad norm alone decides, identically on
    all ranks, whether the fused AdamW kernel applies the update.
    """
    n = len(micro_batches)
    loss_sum = torch.zeros((), device=micro_batches[0][0].device)
    # Gradients are reduce-scattered after every micro-batch and summed into the fp32 sharded grads
    # (skipping the sync would accumulate the unsharded grads in bf16).
    for inputs, targets in micro_batches:
        loss = model(inputs, targets)
        if loss_scale is not None:  # debug hook: injected NaN or spike
            loss = loss * loss_scale
        (loss / n).backward()
        loss_sum += loss.detach()
    norm = grad_norm(model)
    finite = torch.isfinite(norm)
    # Both read by the fused AdamW kernel (the hooks torch's GradScaler uses): it divides every
    # gradient by grad_scale, which clips to the global norm without a pass of its own over the
    # gradients, and skips the update (keeping the state) when found_inf is set.
    optimizer.grad_scale = (norm / grad_clip).clamp(min=1.0)
    optimizer.found_inf = (~finite).float()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / n, norm, finite


def init_distributed() -> tuple[int, int, torch.device, DeviceMesh]:
    """Join the torchrun job (or make a one-rank job when started directly)."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world, device, init_device_mesh(device.type, (world,))


@dataclass
class _Pending:
    """One step not yet seen by the host."""

    step: int
    data_step: int
    lr: float
    loss: torch.Tensor
    grad_norm: torch.Tensor
    finite: torch.Tensor


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resume needs (saved per rank)."""

    step: int = 0  # training steps done
    data_step: int = 0  # step-sized batches drawn, skipped ones included
    tokens_seen: int = 0
    skipped_updates: int = 0  # non-finite steps whose update was skipped
    recoveries: list[Recovery] = field(default_factory=list)  # every spike recovery, in order
    mlflow_run_id: str | None = None

    def __post_init__(self) -> None:
        # A checkpoint holds them as dicts (``asdict``).
        self.recoveries = [r if isinstance(r, Recovery) else Recovery(**r) for r in self.recoveries]

    @classmethod
    def from_saved(cls, saved: dict) -> TrainState:
        """The state a checkpoint holds. Checkpoints of the trainer before spike recoveries hold
        ``skip_data_steps`` and ``rollbacks`` instead: each batch skipped then stays skipped."""
        saved = dict(saved)
        saved.pop("rollbacks", None)
        skipped = saved.pop("skip_data_steps", [])
        nan = float("nan")
        old = [Recovery(d, d, nan, nan, d, "", d, d, 1.0, d) for d in skipped]
        return cls(**{**saved, "recoveries": [*saved.get("recoveries", []), *old]})


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        from model.data import PackedLoader  # the data side; imported here so --help works without it

        self.cfg = cfg
        self.rank, self.world, self.device, self.mesh = init_distributed()
        self.is_cuda = self.device.type == "cuda"
        if self.is_cuda:
            prefer_attention_kernel(cfg.attention_kernel)
        self.loader = PackedLoader(
            cfg.data_dir,
            "train",
            batch_size=cfg.micro_batch_size,
            rank=self.rank,
            world_size=self.world,
            seed=cfg.seed,
            loop=True,
        )
        self.seq_len = self.loader.seq_len
        self.model_cfg = cfg.model_config_for(vocab_size=self.loader.vocab_size, seq_len=self.seq_len)
        self.model = build_model(
            self.model_cfg,
            self.mesh,
            self.device,
            seed=cfg.seed,
            mixed_precision=cfg.mixed_precision and self.is_cuda,
            activation_checkpointing=cfg.activation_checkpointing,
            compile=cfg.compile,
            reshard_after_forward=cfg.fsdp_reshard_after_forward,
            prefetch=cfg.fsdp_prefetch,
            float8=cfg.float8,
        )
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.checkpointer = Checkpointer(
            cfg.checkpoint_dir,
            cfg.keep_checkpoints,
            self.rank,
            self.world,
            asynchronous=cfg.checkpoint_async,
            keep_steps_before=cfg.health.rollback_min_steps_before,
        )
        self.detector = SpikeDetector(
            cfg.health.spike_window, cfg.health.spike_min_history, cfg.health.spike_zscore
        )
        self.state = TrainState()
        self.tokens_per_step = cfg.micro_batch_size * cfg.grad_accum_steps * self.seq_len * self.world
        self.flops_per_token = self.model.flops_per_token(self.seq_len)
        peak = peak_bf16_flops(torch.cuda.get_device_name(self.device)) if self.is_cuda else None
        self.peak_flops = peak * self.world if peak else None
        self.stop_requested = False
        signal.signal(signal.SIGTERM, self._on_sigterm)

        resumed_from = latest_checkpoint(cfg.checkpoint_dir)
        if resumed_from is not None:
            self._load(resumed_from)
        self.metrics = MetricsLogger(
            enabled=self.rank == 0,
            tracking_uri=cfg.mlflow.tracking_uri,
            experiment=cfg.mlflow.experiment,
            run_name=cfg.mlflow.run_name,
            run_id=cfg.mlflow.run_id or self.state.mlflow_run_id,
            params={"config": cfg.model_dump(mode="json"), "model_shapes": asdict(self.model_cfg)},
            system_metrics_s=cfg.mlflow.system_metrics_s,
        )
        self.state.mlflow_run_id = self.metrics.run_id
        self.metrics.event(
            "resumed" if resumed_from else "start",
            self.state.step,
            checkpoint=str(resumed_from) if resumed_from else None,
            max_steps=cfg.max_steps,
            world_size=self.world,
            device=str(self.device),
            params=self.model.num_params(),
            flops_per_token=self.flops_per_token,
            tokens_per_step=self.tokens_per_step,
            mlflow_run_id=self.metrics.run_id,
        )

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.stop_requested = True

    # -- checkpoints ---------------------------------------------------------------------------

    def _save(self, *, wait: bool) -> None:
        """Checkpoint now; asynchronous saves complete later, in ``_finish_save``."""
        self._finish_save()
        extra = {
            "state": asdict(self.state),
            "detector": self.detector.state_dict(),
            "loader": self.loader.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.is_cuda else None,
        }
        self._report_saved(
            self.checkpointer.save(self.state.step, self.model, self.optimizer, extra, wait=wait)
        )

    def _finish_save(self) -> None:
        """Complete the save in flight, if any (waits for its writes)."""
        self._report_saved(self.checkpointer.finish())

    def _report_saved(self, saved: Saved | None) -> None:
        if saved is not None:
            self.metrics.event(
                "checkpoint",
                saved.step,
                path=str(saved.path),
                blocked_s=saved.blocked_s,
                total_s=saved.total_s,
            )

    def _load(self, path: Path) -> None:
        extra = self.checkpointer.load(path, self.model, self.optimizer)
        self.state = TrainState.from_saved(extra["state"])
        self.detector.load_state_dict(extra["detector"])
        self.loader.load_state_dict(extra["loader"])
        torch.set_rng_state(extra["rng_cpu"])
        if self.is_cuda and extra["rng_cuda"] is not None:
            torch.cuda.set_rng_state(extra["rng_cuda"], self.device)

    # -- the loop ------------------------------------------------------------------------------

    def _next_batches(self, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The next step's micro-batches, passing over the batches that spike recoveries skip."""
        first = self.state.data_step + 1
        while any(r.skips(self.state.data_step + 1) for r in self.state.recoveries):
            for _ in range(self.cfg.grad_accum_steps):
                next(batches)
            self.state.data_step += 1
        if self.state.data_step >= first:
            self.metrics.event(
                "batches_skipped", self.state.step, first_data_step=first,
                last_data_step=self.state.data_step, count=self.state.data_step - first + 1,
            )  # fmt: skip
        micro = []
        for _ in range(self.cfg.grad_accum_steps):
            inputs, targets = next(batches)
            if self.is_cuda:
                inputs = inputs.pin_memory().to(self.device, non_blocking=True)
                targets = targets.pin_memory().to(self.device, non_blocking=True)
            micro.append((inputs, targets))
        self.state.data_step += 1
        return micro

    def _lr(self, data_step: int) -> float:
        """The learning rate of the next update: the schedule, cooled after a spike recovery."""
        step = self.state.step + 1
        lr = lr_at(self.state.step, self.cfg.optim, self.cfg.max_steps)
        lr *= min((r.lr_scale(step) for r in self.state.recoveries), default=1.0)
        poisoned = self.cfg.health.debug_lr_blowup_data_steps
        if poisoned is not None and poisoned[0] <= data_step <= poisoned[1]:
            lr *= self.cfg.health.debug_lr_blowup_factor
        return lr

    def _loss_scale(self, data_step: int) -> float | None:
        health = self.cfg.health
        if data_step == health.debug_inject_nan_at_step:
            return float("nan")
        if data_step == health.debug_inject_spike_at_step:
            return health.debug_spike_factor
        return None

    def _evaluate(self, step: int) -> None:
        """The eval hook: evaluate this checkpoint's weights here, on the training ranks, between steps
        (``cfg.eval``; model/evaluate.py). Not counted in the step times."""
        from model.evaluate import evaluate_on_training_ranks

        evaluate_on_training_ranks(self.model, self.cfg, step, self.rank, self.world, self.device)

    def run(self) -> None:
        try:
            self._loop()
            self.checkpointer.close()
        except Exception as exc:
            self.metrics.event("failed", self.state.step, error=repr(exc), traceback=traceback.format_exc())
            raise
        finally:
            self.metrics.close()
            dist.destroy_process_group()

    def _loop(self) -> None:
        cfg = self.cfg
        batches = iter(self.loader)
        pending: list[_Pending] = []
        data_wait = 0.0
        interval_start = time.perf_counter()
        while self.state.step < cfg.max_steps:
            t0 = time.perf_counter()
            micro = self._next_batches(batches)
            data_wait += time.perf_counter() - t0
            lr = self._lr(self.state.data_step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, norm, finite = train_step(
                self.model, self.optimizer, micro, cfg.optim.grad_clip, self._loss_scale(self.state.data_step)
            )
            self.state.step += 1
            self.state.tokens_seen += self.tokens_per_step
            pending.append(_Pending(self.state.step, self.state.data_step, lr, loss, norm, finite))

            step = self.state.step
            at_checkpoint = step % cfg.checkpoint_interval == 0 or step == cfg.max_steps
            if not (step % cfg.log_interval == 0 or at_checkpoint):
                continue
            rolled_back = self._sync(pending, time.perf_counter() - interval_start, data_wait)
            pending, data_wait = [], 0.0
            if rolled_back:
                batches = iter(self.loader)
            else:
                stop, writing = self._collective_flags()
                if not writing:
                    self._finish_save()  # every rank has written: the checkpoint becomes complete now
                if at_checkpoint or stop:
                    self._save(wait=stop or step == cfg.max_steps)
                if at_checkpoint and not stop and cfg.eval is not None:
                    self._evaluate(step)
                if stop:
                    self.metrics.event("preempted", step, tokens_seen=self.state.tokens_seen)
                    return
            interval_start = time.perf_counter()
        self._finish_save()
        final = latest_checkpoint(cfg.checkpoint_dir)
        self.metrics.event(
            "done", self.state.step, tokens_seen=self.state.tokens_seen, checkpoint=str(final),
            skipped_updates=self.state.skipped_updates, rollbacks=len(self.state.recoveries),
            mlflow_run_id=self.metrics.run_id,
        )  # fmt: skip

    def _collective_flags(self) -> tuple[bool, bool]:
        """(a SIGTERM reached some rank, some rank is still writing a checkpoint): one all-reduce."""
        flags = torch.tensor(
            [float(self.stop_requested), float(self.checkpointer.writing())], device=self.device
        )
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, writing = flags.tolist()
        return bool(stop), bool(writing)

    def _sync(self, pending: list[_Pending], elapsed: float, data_wait: float) -> bool:
        """Bring the pending steps to the host (one transfer), report them, run the health checks.

        Returns True when a loss spike rolled the run back to an earlier checkpoint.
        """
        n = len(pending)
        losses = torch.stack([p.loss for p in pending])
        dist.all_reduce(losses, op=dist.ReduceOp.SUM)  # SUM: gloo has no AVG
        host = torch.cat([losses / self.world, torch.stack([p.grad_norm for p in pending])]).tolist()
        finite = torch.stack([p.finite for p in pending]).tolist()
        loss_values, norms = host[:n], host[n:]

        spike: tuple[_Pending, float, float] | None = None
        good_losses = []
        for p, loss, ok in zip(pending, loss_values, finite, strict=True):
            if not ok:
                self.state.skipped_updates += 1
                self.metrics.event("nonfinite_skipped", p.step, data_step=p.data_step, loss=loss)
                continue
            z = self.detector.observe(loss)
            if z is not None:
                spike = (p, loss, z)
                break
            good_losses.append(loss)

        last = pending[-1]
        tokens = n * self.tokens_per_step
        tokens_per_s = tokens / elapsed
        values: dict[str, float | int | None] = {
            "loss": sum(good_losses) / len(good_losses) if good_losses else loss_values[-1],
            "lr": last.lr,
            "grad_norm": norms[-1],
            "tokens_seen": self.state.tokens_seen,
            "tokens_per_s": tokens_per_s,
            "mfu": self.flops_per_token * tokens_per_s / self.peak_flops if self.peak_flops else None,
            "step_time_s": elapsed / n,
            "data_wait_s": data_wait / n,
            "skipped_updates": self.state.skipped_updates,
            "rollbacks": len(self.state.recoveries),
            "max_steps": self.cfg.max_steps,
            "eta_s": (self.cfg.max_steps - last.step) * elapsed / n,
        }
        if self.is_cuda:
            values["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.metrics.metric(last.step, values)
        return spike is not None and self._rollback(*spike)

    def _rollback(self, at: _Pending, loss: float, z: float) -> bool:
        """Recover from a loss spike (``model/health.py``): load the newest checkpoint at least
        ``rollback_min_steps_before`` steps before it, skip the batches from there to the spike (or
        more), cool the learning rate. False: no checkpoint is old enough, training goes on."""
        health = self.cfg.health
        self._finish_save()  # a save in flight is of a step before the spike: one to choose from
        checkpoints = dict(complete_checkpoints(self.cfg.checkpoint_dir))
        to_step = rollback_step(list(checkpoints), at.step, health.rollback_min_steps_before)
        if to_step is None:
            reason = f"no checkpoint {health.rollback_min_steps_before} steps before the spike"
            self.metrics.event("spike_not_rolled_back", at.step, loss=loss, zscore=z, reason=reason)
            return False
        near = recoveries_near(self.state.recoveries, at.step, health.recovery_window_steps)
        if near >= health.max_recoveries:
            raise RuntimeError(
                f"loss spike at step {at.step} after {near} recoveries within "
                f"{health.recovery_window_steps} steps; giving up"
            )
        recoveries = self.state.recoveries  # the checkpoint's state may predate some of them
        self._load(checkpoints[to_step])
        recovery = plan_recovery(
            spike_step=at.step, spike_data_step=at.data_step, loss=loss, zscore=z, to_step=to_step,
            to_data_step=self.state.data_step, checkpoint=str(checkpoints[to_step]),
            skip_batches=health.skip_batches, lr_factor=health.recovery_lr_factor,
            lr_steps=health.recovery_lr_steps,
        )  # fmt: skip
        self.state.recoveries = [*recoveries, recovery]
        self.state.mlflow_run_id = self.metrics.run_id
        # The checkpoints after the one loaded belong to the abandoned steps: a resume must not pick one.
        self.checkpointer.discard_after(to_step)
        fields = {k: v for k, v in asdict(recovery).items() if k != "spike_step"}
        self.metrics.event(
            "rollback", at.step, **fields, skipped_batches=recovery.skipped_batches,
            recoveries=len(self.state.recoveries), recoveries_in_window=near + 1,
        )  # fmt: skip
        return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="TrainConfig as .json or .yaml")
    args = parser.parse_args(argv)
    Trainer(load_config(args.config)).run()
    # Leave without the interpreter's final garbage collection: after a run that took no step (resumed
    # at max_steps) it was seen spinning for minutes in torch objects' finalisers. Everything is
    # written and the process group is destroyed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
