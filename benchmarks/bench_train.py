"""Training throughput of our model + trainer step, side by side with Hugging Face ``LlamaForCausalLM``.

Modes (one GPU unless noted):

- default: for each preset, our trainer's step (FSDP2 world of one, bf16 params / fp32 reduce,
  per-block ``torch.compile``, fused AdamW with the on-device skip, grad clipping) and transformers'
  ``LlamaForCausalLM`` at the same shapes, sequence length and batch (fp32 master weights, bf16 autocast,
  SDPA attention, whole-model ``torch.compile``, fused AdamW, grad clipping). Prints tokens/s, MFU
  (PaLM FLOPs, 6N + 12·L·d·T per token, against the device's dense bf16 peak) and our/HF ratio.
- ``--fsdp``, under ``torchrun --nproc-per-node N``: our step only, fixed per-GPU batch; prints per-GPU
  tokens/s and MFU (run with N = 1, 2, 4, 8 to read the scaling).
- ``--precisions bf16,float8``: each preset in each precision, one after the other in one process
  (float8: torchao's float8 linears in the blocks, ``model/float8.py``); ``--ac K`` checkpoints the
  activations of every K-th block; ``--fsdp --hf`` adds HF's model under the same FSDP2 setup.
- ``--train-data DIR``: loss parity; ``--steps`` trainer steps on real packed data in one precision,
  losses, validation loss and steady-state step time written to ``--out`` (JSON).
- ``--checkpoint``: save and load time of a full checkpoint (model + AdamW state, DCP) for the presets,
  and the training time an asynchronous save costs (stall), as a fraction of a 10-minute interval.

    python benchmarks/bench_train.py                                  # GPU: 125M, 350M, 1B vs transformers
    python benchmarks/bench_train.py --device cpu --quick             # CPU smoke check (tiny, no compile)
    torchrun --nproc-per-node 8 benchmarks/bench_train.py --fsdp --presets 1B
    torchrun --nproc-per-node 2 benchmarks/bench_train.py --fsdp --presets 7B --batch 8 --precisions bf16,float8
    python benchmarks/bench_train.py --presets 1B --train-data PACKED --batch 8 --steps 300 --precisions float8 --out f8.json
    python benchmarks/bench_train.py --checkpoint --presets 1B --checkpoint-dir /scratch/ckpt
    python benchmarks/bench_train.py --presets 350M --no-baseline --profile   # where the time goes

Data are random token ids: throughput depends on shapes only. ``transformers`` is optional; without it
the baseline column says so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.checkpoint import Checkpointer
from model.config import OptimConfig
from model.metrics import peak_bf16_flops
from model.model import ModelConfig, Transformer, model_config
from model.parallelize import prefer_attention_kernel
from model.trainer import build_model, build_optimizer, init_distributed, train_step

DEFAULT_BATCH = {"tiny": 4, "125M": 32, "350M": 24, "1B": 16, "7B": 8}  # 7B: per GPU, 2+ H200s
VOCAB = 32768


def time_steps(step: Callable[[], object], warmup: int, steps: int, device: torch.device) -> list[float]:
    """Seconds per step, measured over ``steps`` after ``warmup`` (compile happens in the warmup)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def random_batch(
    batch: int, seq_len: int, device: torch.device, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, seq_len + 1), generator=gen).to(device)
    return [(tokens[:, :-1], tokens[:, 1:])]


def build_ours(cfg: ModelConfig, device, mesh, args, precision: str) -> Transformer:
    return build_model(
        cfg,
        mesh,
        device,
        seed=0,
        mixed_precision=device.type == "cuda",
        activation_checkpointing=args.ac,
        compile=args.compile,
        reshard_after_forward=args.reshard,
        prefetch=args.prefetch,
        float8=precision == "float8",
    )


def bench_ours(
    cfg: ModelConfig, batch: int, seq_len: int, device, mesh, args, precision: str = "bf16"
) -> list[float]:
    release(device)
    model = build_ours(cfg, device, mesh, args, precision)
    optimizer = build_optimizer(model, OptimConfig())
    micro = random_batch(batch, seq_len, device, seed=dist.get_rank())

    def step() -> None:
        train_step(model, optimizer, micro, 1.0)

    try:
        times = time_steps(step, args.warmup, args.steps, device)
        if args.profile and device.type == "cuda" and dist.get_rank() == 0:
            print(kernel_breakdown(step, device, statistics.median(times)), flush=True)
        return times
    finally:
        PEAK_MEM["ours"] = peak_mem_gib(device)


def bench_hf(cfg: ModelConfig, batch: int, seq_len: int, device, args) -> list[float] | str:
    release(device)
    try:
        model = hf_llama(cfg, seq_len).to(device)
    except ImportError:
        return "transformers not installed"
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True
    )
    forward = torch.compile(model) if args.compile else model
    tokens = random_batch(batch, seq_len, device, seed=0)[0][0]
    amp = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = forward(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        return time_steps(step, args.warmup, args.steps, device)
    except torch.OutOfMemoryError:
        return "out of GPU memory"
    finally:
        PEAK_MEM["hf"] = peak_mem_gib(device)


def bench_hf_fsdp(cfg: ModelConfig, batch: int, seq_len: int, device, mesh, args) -> list[float]:
    """HF's ``LlamaForCausalLM`` under the same FSDP2 setup as ours: one ``fully_shard`` per decoder
    layer (each compiled, checkpointed like ours with --ac), bf16 params / fp32 reduce, fused AdamW."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    release(device)
    torch.manual_seed(0)
    with torch.device(device):  # built whole on the GPU (fp32), then sharded: fast init, no meta tricks
        model = hf_llama(cfg, seq_len)
    model.train()
    fsdp_kwargs: dict = {"mesh": mesh}
    if device.type == "cuda":
        fsdp_kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    layers = model.model.layers
    for i, layer in enumerate(layers):
        if args.ac and i % args.ac == 0:
            layer = checkpoint_wrapper(layer, preserve_rng_state=False)
        if args.compile:
            layer.compile()
        layers[i] = layer
        fully_shard(layer, reshard_after_forward=i < len(layers) - 1, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True
    )
    tokens = random_batch(batch, seq_len, device, seed=dist.get_rank())[0][0]

    def step() -> None:
        model(input_ids=tokens, labels=tokens).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        return time_steps(step, args.warmup, args.steps, device)
    finally:
        PEAK_MEM["hf"] = peak_mem_gib(device)


def hf_llama(cfg: ModelConfig, seq_len: int) -> torch.nn.Module:
    """transformers' ``LlamaForCausalLM`` with our preset's shapes (SDPA attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.dim,
            intermediate_size=cfg.ffn_hidden,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads,
            max_position_embeddings=seq_len,
            rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta,
            tie_word_embeddings=cfg.tie_embeddings,
            attn_implementation="sdpa",
        )
    )


def train_on_data(args, device, mesh) -> None:
    """Loss parity: ``--steps`` trainer steps on real packed data (warmup + cosine), one precision.

    The loop is the trainer's own (``train_step``, ``lr_at``, ``PackedLoader``, seed 0), so two runs
    that differ only in ``--precisions`` see the same batches in the same order from the same initial
    weights. Writes every step's loss, the validation loss at the end and the steady-state step time
    (steps after the first ``--warmup``) to ``--out`` (JSON).
    """
    from model.data import PackedLoader
    from model.trainer import lr_at

    (precision,) = args.precisions
    rank, world = dist.get_rank(), dist.get_world_size()
    loader = PackedLoader(args.train_data, "train", batch_size=args.batch, rank=rank, world_size=world)
    cfg = model_config(args.presets[0], vocab_size=loader.vocab_size, max_seq_len=loader.seq_len)
    model = build_ours(cfg, device, mesh, args, precision)
    optim_cfg = OptimConfig(lr=args.lr, warmup_steps=args.lr_warmup)
    optimizer = build_optimizer(model, optim_cfg)
    batches = iter(loader)
    losses: list[torch.Tensor] = []
    t_start = t_steady = time.perf_counter()
    for step in range(args.steps):
        if step == args.warmup:
            losses[-1].item()  # waits for the device: the steady-state clock starts here
            t_steady = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, optim_cfg, args.steps)
        inputs, targets = (t.to(device, non_blocking=True) for t in next(batches))
        loss, _, _ = train_step(model, optimizer, [(inputs, targets)], optim_cfg.grad_clip)
        losses.append(loss)
    host_losses = torch.stack(losses).tolist()  # one sync for the whole run
    t_end = time.perf_counter()
    step_s = (t_end - t_steady) / (args.steps - args.warmup)
    val_loss = validation_loss(model, args.train_data, args.batch, device)
    tokens_per_s = args.batch * loader.seq_len * world / step_s
    result = {
        "preset": args.presets[0], "precision": precision, "gpus": world, "batch_per_gpu": args.batch,
        "seq_len": loader.seq_len, "steps": args.steps, "lr": args.lr, "losses": host_losses,
        "val_loss": val_loss, "steady_step_s": step_s, "tokens_per_s_per_gpu": tokens_per_s / world,
        "wall_s": t_end - t_start, "device": device_name(device),
    }  # fmt: skip
    if rank == 0:
        last = sum(host_losses[-20:]) / len(host_losses[-20:])
        print(
            f"{precision}: loss {host_losses[0]:.3f} -> mean of last 20 steps {last:.4f}; "
            f"val loss {val_loss:.4f}; {step_s * 1e3:.1f} ms/step steady, {tokens_per_s / world:,.0f} tok/s/GPU",
            flush=True,
        )
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))


@torch.no_grad()
def validation_loss(model: Transformer, data_dir: str, batch: int, device: torch.device) -> float:
    """Mean loss over the validation split's full batches (the same sequences in the same order for
    every run; a short last batch is left out: its new shape would recompile every block)."""
    from model.data import PackedLoader

    loader = PackedLoader(
        data_dir, "validation", batch_size=batch, rank=dist.get_rank(),
        world_size=dist.get_world_size(), loop=False, shuffle=False,
    )  # fmt: skip
    total = torch.zeros(2, device=device)
    for inputs, targets in loader:
        if len(inputs) < batch:
            break
        loss = model(inputs.to(device), targets.to(device))
        total += torch.stack([loss * len(inputs), torch.tensor(float(len(inputs)), device=device)])
    dist.all_reduce(total)
    return (total[0] / total[1]).item()


PEAK_MEM: dict[str, float] = {}

# Kernel-name fragments -> category, first match wins (attention before GEMM: cuDNN's attention
# kernels carry "sm90" and "gemm"-like names too).
KERNEL_CATEGORIES = [
    ("nccl", "communication (NCCL)"),
    ("flash", "attention"),
    ("fmha", "attention"),
    ("sdpa", "attention"),
    ("cudnn", "attention"),
    ("attention", "attention"),
    ("gemm", "matmul"),
    ("nvjet", "matmul"),
    ("cutlass", "matmul"),
    ("xmma", "matmul"),
    ("triton", "fused elementwise / norms / loss (Triton)"),
    ("adam", "optimizer"),
    ("multi_tensor", "optimizer / grad clip (foreach)"),
    ("memcpy", "copies"),
    ("memset", "copies"),
    ("copy", "copies"),
]


def kernel_breakdown(step: Callable[[], object], device: torch.device, step_s: float, steps: int = 3) -> str:
    """Where a step's GPU time goes: kernel time per category over ``steps`` profiled steps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize(device)
    per_category: dict[str, float] = {}
    kernels: list[tuple[float, str]] = []
    for event in prof.key_averages():
        if event.device_type != DeviceType.CUDA or event.is_user_annotation:
            continue
        ms = event.self_device_time_total / 1e3 / steps
        name = event.key.lower()
        category = next((c for frag, c in KERNEL_CATEGORIES if frag in name), "other eager kernels")
        per_category[category] = per_category.get(category, 0.0) + ms
        kernels.append((ms, event.key))
    wall_ms = step_s * 1e3
    lines = [f"kernel time per step (profiled {steps} steps; step wall time {wall_ms:.1f} ms)"]
    lines += ["| category | ms/step | % of step |", "|---|---:|---:|"]
    for category, ms in sorted(per_category.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {category} | {ms:.1f} | {100 * ms / wall_ms:.1f}% |")
    busy = sum(per_category.values()) - per_category.get("communication (NCCL)", 0.0)
    lines.append(f"| compute kernels together (no NCCL) | {busy:.1f} | {100 * busy / wall_ms:.1f}% |")
    lines += ["top kernels:"] + [f"  {ms:7.2f} ms  {name[:110]}" for ms, name in sorted(kernels)[::-1][:15]]
    return "\n".join(lines)


def peak_mem_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def release(device: torch.device) -> None:
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def throughput(times: list[float], tokens_per_step: int, flops_per_token: float, peak: float | None):
    step_s = statistics.median(times)
    tokens_per_s = tokens_per_step / step_s
    mfu = flops_per_token * tokens_per_s / peak if peak else None
    return step_s, tokens_per_s, mfu


def fmt_mfu(mfu: float | None) -> str:
    return f"{100 * mfu:5.1f}%" if mfu is not None else "  n/a"


def compare(args, device, mesh, peak) -> None:
    print(
        f"device: {device_name(device)}; seq_len {args.seq_len}; compile {args.compile}; "
        f"activation checkpointing every {args.ac or '-'}; median of {args.steps} steps"
    )
    print(
        "| preset | precision | params | batch | ours tok/s | ours MFU | ours GiB | vs bf16 "
        "| HF tok/s | HF MFU | HF GiB | ours/HF |"
    )
    print("|" + "---|" * 12)
    for preset in args.presets:
        cfg = model_config(preset, vocab_size=VOCAB, max_seq_len=args.seq_len)
        batch = args.batch or DEFAULT_BATCH.get(preset, 4)
        with torch.device("meta"):
            n_params = Transformer(cfg).num_params()
            flops = Transformer(cfg).flops_per_token(args.seq_len)
        tokens = batch * args.seq_len
        hf = bench_hf(cfg, batch, args.seq_len, device, args) if not args.no_baseline else "skipped"
        if isinstance(hf, str):
            hf_tps, hf_cols = None, f"{hf} | | | |"
        else:
            _, hf_tps, hf_mfu = throughput(hf, tokens, flops, peak)
            hf_cols = f"{hf_tps:,.0f} | {fmt_mfu(hf_mfu)} | {PEAK_MEM['hf']:.1f} |"
        bf16_tps = None
        for precision in args.precisions:
            times = bench_ours(cfg, batch, args.seq_len, device, mesh, args, precision)
            _, tps, mfu = throughput(times, tokens, flops, peak)
            bf16_tps = tps if precision == "bf16" else bf16_tps
            vs_bf16 = f"{tps / bf16_tps:.2f}x" if bf16_tps else ""
            ratio = f" {tps / hf_tps:.2f}x |" if hf_tps else ""
            print(
                f"| {preset} | {precision} | {n_params / 1e6:,.0f}M | {batch} | {tps:,.0f} | {fmt_mfu(mfu)} "
                f"| {PEAK_MEM['ours']:.1f} | {vs_bf16} | {hf_cols}{ratio}",
                flush=True,
            )


def fsdp_scaling(args, device, mesh, peak) -> None:
    """Per-GPU throughput of each preset x precision (and HF's model under the same FSDP2, --hf)."""
    world = dist.get_world_size()
    for preset in args.presets:
        cfg = model_config(preset, vocab_size=VOCAB, max_seq_len=args.seq_len)
        batch = args.batch or DEFAULT_BATCH.get(preset, 4)
        with torch.device("meta"):
            flops = Transformer(cfg).flops_per_token(args.seq_len)
        runs: list[tuple[str, Callable[[], list[float]]]] = [
            (precision, partial(bench_ours, cfg, batch, args.seq_len, device, mesh, args, precision))
            for precision in args.precisions
        ]
        if args.hf:
            runs.append(("HF bf16", partial(bench_hf_fsdp, cfg, batch, args.seq_len, device, mesh, args)))
        for label, run in runs:
            times = torch.tensor(run(), device=device)
            dist.all_reduce(times, op=dist.ReduceOp.MAX)  # a step is as slow as its slowest rank
            step_s, tps, mfu = throughput(times.tolist(), batch * args.seq_len, flops, peak)
            if dist.get_rank() == 0:
                mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
                print(
                    f"| {preset} | {label} | {world} GPUs | batch/GPU {batch} | AC every {args.ac or '-'} "
                    f"| step {step_s * 1e3:,.1f} ms | {tps:,.0f} tok/s/GPU | {tps * world:,.0f} tok/s total "
                    f"| MFU {fmt_mfu(mfu)} | peak mem {mem:.1f} GiB |",
                    flush=True,
                )


def checkpoint_timing(args, device, mesh) -> None:
    """Save/load time of a full checkpoint, and what saving costs the training loop.

    Trains the preset at its benchmark batch, then: a synchronous save (the loop waits for all of
    it) and a load; then two asynchronous saves (the first allocates the pinned staging buffers, the
    second is the steady state) with training going on while the files are written. The stall is the
    time the loop was blocked plus what the steps taken during the write lost against the median
    step; as a fraction of a 10-minute checkpoint interval it is the training time lost to saving.
    """
    shared = [args.checkpoint_dir or tempfile.mkdtemp(prefix="bench_ckpt_")]
    dist.broadcast_object_list(shared)  # one directory for all ranks: rank 0's
    root = Path(shared[0])
    print(
        "| preset | ranks | size | sync save | load | async: blocked (first / steady) | written in | steps during | lost in steps | stall | stall / 10 min |"
    )
    print("|" + "---|" * 11)
    for preset in args.presets:
        checkpoint_costs(preset, root, args, device, mesh)
        release(device)


def checkpoint_costs(preset: str, root: Path, args, device: torch.device, mesh) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = model_config(preset, vocab_size=VOCAB, max_seq_len=args.seq_len)
    batch = args.batch or DEFAULT_BATCH.get(preset, 4)
    model = build_model(
        cfg, mesh, device, seed=0, mixed_precision=device.type == "cuda", compile=args.compile
    )
    optimizer = build_optimizer(model, OptimConfig())
    step = partial(train_step, model, optimizer, random_batch(batch, args.seq_len, device, seed=rank), 1.0)
    step_s = statistics.median(time_steps(step, args.warmup, args.steps, device))

    sync = Checkpointer(root / preset / "sync", keep=1, rank=rank, world_size=world)
    saved = sync.save(1, model, optimizer, {"step": 1})
    size = sum(f.stat().st_size for f in saved.path.rglob("*") if f.is_file()) / 2**30
    t0 = time.perf_counter()
    sync.load(saved.path, model, optimizer)
    dist.barrier()
    load_s = time.perf_counter() - t0
    shutil.rmtree(root / preset / "sync", ignore_errors=True)

    background = Checkpointer(root / preset / "async", keep=1, rank=rank, world_size=world, asynchronous=True)
    blocked = []
    for save_step in (2, 3):  # the first save allocates the staging buffers; the second is steady
        background.save(save_step, model, optimizer, {"step": save_step}, wait=False)
        during = []
        while collective_any(background.writing(), device):
            during += time_steps(step, 0, 1, device)
        async_saved = background.finish()
        blocked.append(f"{async_saved.blocked_s:.2f}")
    background.close()
    lost = max(0.0, sum(during) - len(during) * step_s)  # signed deviations: noise cancels out
    stall = async_saved.blocked_s + lost
    if rank == 0:
        print(
            f"| {preset} | {world} | {size:.2f} GiB | {saved.total_s:.1f} s | {load_s:.1f} s "
            f"| {' / '.join(blocked)} s | {async_saved.total_s:.1f} s | {len(during)} x {step_s * 1e3:.0f} ms "
            f"| {lost:.2f} s | {stall:.2f} s | {100 * stall / 600:.2f}% |",
            flush=True,
        )
        shutil.rmtree(root / preset, ignore_errors=True)


def collective_any(flag: bool, device: torch.device) -> bool:
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny preset, few steps, no compile (smoke check)"
    )
    parser.add_argument("--presets", default="125M,350M,1B", help="comma-separated")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=None, help="per GPU; default per preset")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument(
        "--ac", type=int, default=0, help="activation checkpointing of every k-th block (0: none, 1: all)"
    )
    parser.add_argument("--precisions", default="bf16", help="comma-separated: bf16, float8")
    parser.add_argument("--no-baseline", action="store_true", help="skip transformers")
    parser.add_argument("--fsdp", action="store_true", help="per-GPU throughput under torchrun")
    parser.add_argument("--hf", action="store_true", help="--fsdp: also HF's Llama under the same FSDP2")
    parser.add_argument("--train-data", help="loss parity: train --steps on this packed dataset")
    parser.add_argument("--lr", type=float, default=3e-4, help="--train-data: peak learning rate")
    parser.add_argument("--lr-warmup", type=int, default=30, help="--train-data: warmup steps")
    parser.add_argument("--out", help="--train-data: write the losses and timings here (JSON)")
    parser.add_argument("--checkpoint", action="store_true", help="checkpoint save/load timing")
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument(
        "--reshard", choices=["auto", "always", "never"], default="auto", help="FSDP reshard after forward"
    )
    parser.add_argument("--prefetch", type=int, default=1, help="FSDP blocks gathered ahead")
    parser.add_argument("--profile", action="store_true", help="print where our step's GPU time goes")
    parser.add_argument(
        "--inductor-tuning",
        action="store_true",
        help="coordinate-descent tuning of Triton kernels (both sides)",
    )
    parser.add_argument(
        "--sdpa", choices=["default", "cudnn", "flash"], default="default", help="attention kernel"
    )
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the trainer picks gloo + fp32 when it sees no GPU
    if args.quick:
        args.presets, args.seq_len, args.steps, args.warmup, args.compile = "tiny", 128, 3, 1, False
    args.presets = args.presets.split(",")
    args.precisions = args.precisions.split(",")
    if not set(args.precisions) <= {"bf16", "float8"}:
        parser.error(f"--precisions: bf16 and/or float8, not {args.precisions}")
    if args.train_data and (len(args.precisions) != 1 or not args.batch):
        parser.error("--train-data takes one precision and --batch")
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.inductor_tuning:
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True

    prefer_attention_kernel(args.sdpa)  # for both models alike
    _, _, device, mesh = init_distributed()
    peak = peak_bf16_flops(device_name(device))
    try:
        if args.train_data:
            train_on_data(args, device, mesh)
        elif args.checkpoint:
            checkpoint_timing(args, device, mesh)
        elif args.fsdp:
            fsdp_scaling(args, device, mesh, peak)
        else:
            compare(args, device, mesh, peak)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
