"""Training throughput of our model + trainer step, side by side with Hugging Face ``LlamaForCausalLM``.

Modes (one GPU unless noted):

- default: for each preset, our trainer's step (FSDP2 world of one, bf16 params / fp32 reduce,
  per-block ``torch.compile``, fused AdamW with the on-device skip, grad clipping) and transformers'
  ``LlamaForCausalLM`` at the same shapes, sequence length and batch (fp32 master weights, bf16 autocast,
  SDPA attention, whole-model ``torch.compile``, fused AdamW, grad clipping). Prints tokens/s, MFU
  (PaLM FLOPs, 6N + 12·L·d·T per token, against the device's dense bf16 peak) and our/HF ratio.
- ``--fsdp``, under ``torchrun --nproc-per-node N``: our step only, fixed per-GPU batch; prints per-GPU
  tokens/s and MFU (run with N = 1, 2, 4, 8 to read the scaling).
- ``--checkpoint``: save and load time of a full checkpoint (model + AdamW state, DCP) for the presets,
  and the training time an asynchronous save costs (stall), as a fraction of a 10-minute interval.

    python benchmarks/bench_train.py                                  # GPU: 125M, 350M, 1B vs transformers
    python benchmarks/bench_train.py --device cpu --quick             # CPU smoke check (tiny, no compile)
    torchrun --nproc-per-node 8 benchmarks/bench_train.py --fsdp --presets 1B
    python benchmarks/bench_train.py --checkpoint --presets 1B --checkpoint-dir /scratch/ckpt
    python benchmarks/bench_train.py --presets 350M --no-baseline --profile   # where the time goes

Data are random token ids: throughput depends on shapes only. ``transformers`` is optional; without it
the baseline column says so.
"""

from __future__ import annotations

import argparse
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

DEFAULT_BATCH = {"tiny": 4, "125M": 32, "350M": 24, "1B": 16, "7B": 2}
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


def bench_ours(cfg: ModelConfig, batch: int, seq_len: int, device, mesh, args) -> list[float]:
    release(device)
    model = build_model(
        cfg,
        mesh,
        device,
        seed=0,
        mixed_precision=device.type == "cuda",
        activation_checkpointing=args.activation_checkpointing,
        compile=args.compile,
        reshard_after_forward=args.reshard,
        prefetch=args.prefetch,
    )
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
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return "transformers not installed"
    hf_cfg = LlamaConfig(
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
    model = LlamaForCausalLM(hf_cfg).to(device)
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
        f"device: {device_name(device)}; seq_len {args.seq_len}; compile {args.compile}; median of {args.steps} steps"
    )
    print(
        "| preset | params | batch | ours tok/s | ours MFU | ours GiB | HF tok/s | HF MFU | HF GiB | ours/HF |"
    )
    print("|" + "---|" * 10)
    for preset in args.presets:
        cfg = model_config(preset, vocab_size=VOCAB, max_seq_len=args.seq_len)
        batch = args.batch or DEFAULT_BATCH.get(preset, 4)
        with torch.device("meta"):
            n_params = Transformer(cfg).num_params()
            flops = Transformer(cfg).flops_per_token(args.seq_len)
        tokens = batch * args.seq_len
        _, ours_tps, ours_mfu = throughput(
            bench_ours(cfg, batch, args.seq_len, device, mesh, args), tokens, flops, peak
        )
        hf = bench_hf(cfg, batch, args.seq_len, device, args) if not args.no_baseline else "skipped"
        if isinstance(hf, str):
            hf_cols = f"{hf} | | | |"
        else:
            _, hf_tps, hf_mfu = throughput(hf, tokens, flops, peak)
            hf_cols = f"{hf_tps:,.0f} | {fmt_mfu(hf_mfu)} | {PEAK_MEM['hf']:.1f} | {ours_tps / hf_tps:.2f}x |"
        ours_cols = f"{ours_tps:,.0f} | {fmt_mfu(ours_mfu)} | {PEAK_MEM['ours']:.1f}"
        print(f"| {preset} | {n_params / 1e6:,.0f}M | {batch} | {ours_cols} | {hf_cols}", flush=True)


def fsdp_scaling(args, device, mesh, peak) -> None:
    world = dist.get_world_size()
    for preset in args.presets:
        cfg = model_config(preset, vocab_size=VOCAB, max_seq_len=args.seq_len)
        batch = args.batch or DEFAULT_BATCH.get(preset, 4)
        with torch.device("meta"):
            flops = Transformer(cfg).flops_per_token(args.seq_len)
        times = torch.tensor(bench_ours(cfg, batch, args.seq_len, device, mesh, args), device=device)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)  # a step is as slow as its slowest rank
        step_s, tps, mfu = throughput(times.tolist(), batch * args.seq_len, flops, peak)
        if dist.get_rank() == 0:
            mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
            print(
                f"| {preset} | {world} GPUs | batch/GPU {batch} | step {step_s * 1e3:,.1f} ms | "
                f"{tps:,.0f} tok/s/GPU | {tps * world:,.0f} tok/s total | MFU {fmt_mfu(mfu)} | peak mem {mem:.1f} GiB |",
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
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--no-baseline", action="store_true", help="skip transformers")
    parser.add_argument("--fsdp", action="store_true", help="scaling run under torchrun (ours only)")
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
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.inductor_tuning:
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True

    prefer_attention_kernel(args.sdpa)  # for both models alike
    _, _, device, mesh = init_distributed()
    peak = peak_bf16_flops(device_name(device))
    try:
        if args.checkpoint:
            checkpoint_timing(args, device, mesh)
        elif args.fsdp:
            fsdp_scaling(args, device, mesh, peak)
        else:
            compare(args, device, mesh, peak)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
