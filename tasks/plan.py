"""Compute plan of a pretraining run, before it starts: size, data, steps, FLOPs, time, memory.

From a token count (or a packed dataset), a model preset and a GPU count and kind: parameters,
tokens per parameter against Chinchilla's compute-optimal ~20 (Hoffmann et al. 2022), steps, training
FLOPs (PaLM's 6·N + 12·L·d·T per token, the count MFU uses), and the wall time and GPU-hours at the
throughput measured here (``tasks/throughput.py``, with its date). Warns when the plan is far from
compute-optimal, repeats the data too often, or will not fit in GPU memory.

Memory per GPU under FSDP2 (``model/parallelize.py``): fp32 master weights, gradients and AdamW's two
moments (16 bytes per parameter) sharded over the GPUs; the bf16 weights being computed with (all of
them when blocks keep their gathered weights, about three blocks when they reshard); activations;
and the logits. The activation constant was fitted to the peaks measured with
``benchmarks/bench_train.py`` (1B and 7B, bf16 and float8, with and without activation
checkpointing): the estimate lands within 15% of each measured peak (tests/test_plan.py checks it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from model.metrics import peak_bf16_flops
from model.model import ModelConfig, Transformer, model_config
from tasks.throughput import MEASURED, Measurement, Precision

if TYPE_CHECKING:
    from model.config import TrainSettings

CHINCHILLA_TOKENS_PER_PARAM = 20.0
# Outside this band of tokens per parameter a plan is called far from compute-optimal.
COMPUTE_OPTIMAL_BAND = (10.0, 40.0)
# Beyond this many passes over the data, repeated tokens are worth much less (Muennighoff et al. 2023).
MAX_USEFUL_EPOCHS = 4.0

# Usable memory per GPU (GiB, as the driver reports it), by device-name fragment.
GPU_MEMORY_GIB: dict[str, float] = {"H200": 140.4, "H100": 79.6, "A100": 80.0}
MEMORY_HEADROOM = 0.92  # allocator fragmentation, CUDA context, NCCL buffers

# Activation bytes per token per block without checkpointing: the block input, q/k/v, attention
# output, the residual after attention (2 bytes each, bf16) and the two SwiGLU projections, times a
# factor fitted to the measured peaks. float8 keeps the matmul inputs in float8 for backward.
ACTIVATION_FIT = 1.2
FLOAT8_ACTIVATION_FACTOR = 0.6
LOGIT_BYTES = 2  # bf16 logits (the compiled loss does not keep an fp32 copy), per token per vocab entry


@dataclass(frozen=True)
class Memory:
    """Estimated peak per GPU, GiB."""

    states: float  # fp32 weights, gradients, AdamW moments: sharded
    gathered_weights: float  # bf16 weights unsharded for compute
    activations: float
    logits: float
    total: float
    available: float | None  # usable GPU memory; None: unknown GPU

    @property
    def fits(self) -> bool | None:
        return None if self.available is None else self.total <= self.available * MEMORY_HEADROOM


@dataclass(frozen=True)
class Plan:
    preset: str
    gpu: str
    gpus: int
    precision: Precision
    micro_batch: int
    grad_accum: int
    activation_checkpointing: int
    seq_len: int
    params: int
    tokens: int
    tokens_per_step: int
    steps: int
    flops: float
    tokens_per_s_per_gpu: float | None
    throughput_source: str
    memory: Memory
    data_tokens: int | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params

    @property
    def epochs(self) -> float | None:
        return self.tokens / self.data_tokens if self.data_tokens else None

    @property
    def wall_s(self) -> float | None:
        if self.tokens_per_s_per_gpu is None:
            return None
        return self.tokens / (self.tokens_per_s_per_gpu * self.gpus)

    @property
    def gpu_hours(self) -> float | None:
        return None if self.wall_s is None else self.wall_s * self.gpus / 3600


def packed_data_info(data_dir: str | Path) -> tuple[int, int, int]:
    """(train tokens, seq_len, vocab_size) of a packed dataset (a published root: its LATEST)."""
    from model.data import read_packing_info
    from tasks.dataset import resolve_version

    info = read_packing_info(resolve_version(data_dir))
    train = info["splits"]["train"]
    return train["sequences"] * info["seq_len"], info["seq_len"], info["vocab_size"]


def plan_for_run(settings: TrainSettings, data_dir: str | Path, gpus: int, gpu: str) -> Plan:
    """The plan of a pretrain run as configured: ``max_steps`` steps of its batch on its data."""
    data_tokens, seq_len, vocab_size = packed_data_info(data_dir)
    tokens_per_step = settings.micro_batch_size * settings.grad_accum_steps * seq_len * gpus
    return make_plan(
        settings.model,
        gpus=gpus,
        gpu=gpu,
        tokens=settings.max_steps * tokens_per_step,
        precision="float8" if settings.float8 else "bf16",
        micro_batch=settings.micro_batch_size,
        grad_accum=settings.grad_accum_steps,
        seq_len=seq_len,
        vocab_size=vocab_size,
        activation_checkpointing=int(settings.activation_checkpointing),
        data_tokens=data_tokens,
    )


def parse_count(text: str) -> int:
    """'2e12', '300B', '1.5T', '20M' -> an integer count."""
    scale = {"k": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}.get(text[-1:], 1.0)
    number = text[:-1] if scale != 1.0 else text
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"not a count: {text!r} (e.g. 2e12, 300B, 1.5T)") from None
    if value < 1:
        raise ValueError(f"not a positive count: {text!r}")
    return int(value)


def make_plan(
    preset: str,
    *,
    gpus: int,
    gpu: str,
    tokens: int,
    precision: Precision = "bf16",
    micro_batch: int | None = None,
    grad_accum: int = 1,
    seq_len: int = 2048,
    vocab_size: int | None = None,
    activation_checkpointing: int | None = None,
    data_tokens: int | None = None,
    table: list[Measurement] = MEASURED,
) -> Plan:
    """The plan of training ``preset`` on ``tokens`` tokens with ``gpus`` GPUs of kind ``gpu``.

    ``micro_batch`` (per GPU) and ``activation_checkpointing`` default to the fastest measured
    configuration's; ``data_tokens``: the size of the dataset, for the number of passes over it.
    """
    if gpus < 1 or tokens < 1 or grad_accum < 1:
        raise ValueError("gpus, tokens and grad_accum must be positive")
    fields = {"max_seq_len": seq_len} | ({"vocab_size": vocab_size} if vocab_size else {})
    cfg = model_config(preset, **fields)
    with torch.device("meta"):
        model = Transformer(cfg)
    params, flops_per_token = model.num_params(), model.flops_per_token(seq_len)

    measured = closest_measurement(table, preset, gpu, precision, gpus, micro_batch, activation_checkpointing)
    micro_batch = micro_batch or (measured.micro_batch if measured else 8)
    if activation_checkpointing is None:
        activation_checkpointing = measured.activation_checkpointing if measured else 0
    rate, source = tokens_per_s_per_gpu(
        table, preset, gpu, precision, gpus, micro_batch, activation_checkpointing, flops_per_token
    )
    tokens_per_step = micro_batch * grad_accum * seq_len * gpus
    memory = estimate_memory(
        cfg, params, gpus, gpu, precision, micro_batch, seq_len, activation_checkpointing
    )
    plan = Plan(
        preset=preset, gpu=gpu, gpus=gpus, precision=precision, micro_batch=micro_batch,
        grad_accum=grad_accum, activation_checkpointing=activation_checkpointing, seq_len=seq_len,
        params=params, tokens=tokens, tokens_per_step=tokens_per_step,
        steps=math.ceil(tokens / tokens_per_step), flops=flops_per_token * tokens,
        tokens_per_s_per_gpu=rate, throughput_source=source, memory=memory, data_tokens=data_tokens,
    )  # fmt: skip
    plan.warnings.extend(plan_warnings(plan))
    return plan


def closest_measurement(
    table: list[Measurement],
    preset: str,
    gpu: str,
    precision: Precision,
    gpus: int,
    micro_batch: int | None,
    activation_checkpointing: int | None,
) -> Measurement | None:
    """The measured row of this preset, GPU kind and precision closest in GPU count, then in
    checkpointing and micro-batch (where not given: the fastest)."""
    rows = [m for m in table if (m.preset, m.gpu, m.precision) == (preset, gpu, precision)]
    if not rows:
        return None

    def distance(m: Measurement) -> tuple:
        ac = (
            0
            if activation_checkpointing is None
            else int(m.activation_checkpointing != activation_checkpointing)
        )
        batch = -m.tokens_per_s_per_gpu if micro_batch is None else abs(m.micro_batch - micro_batch)
        return (abs(m.gpus - gpus), ac, batch)

    return min(rows, key=distance)


def tokens_per_s_per_gpu(
    table: list[Measurement],
    preset: str,
    gpu: str,
    precision: Precision,
    gpus: int,
    micro_batch: int,
    activation_checkpointing: int,
    flops_per_token: float,
) -> tuple[float | None, str]:
    """Per-GPU tokens/s for the plan and where it comes from (a sentence for the report).

    In order: this preset measured on this GPU kind (per-GPU rate assumed to hold at other GPU
    counts: 350M kept 96.5% of it at 2 and 4 GPUs); else this preset measured on another kind, scaled
    by peak FLOP/s; else the MFU of the nearest measured preset on this GPU kind in this precision.
    """
    row = closest_measurement(table, preset, gpu, precision, gpus, micro_batch, activation_checkpointing)
    if row is not None:
        note = (
            f"measured {row.date}: {row.preset} {row.precision}, {row.gpus}x {row.gpu}, "
            f"micro-batch {row.micro_batch}, checkpointing every {row.activation_checkpointing or '-'}"
        )
        if row.gpus != gpus:
            note += f"; per-GPU rate assumed at {gpus} GPUs"
        return row.tokens_per_s_per_gpu, note
    peak = peak_bf16_flops(gpu)
    other = [m for m in table if m.preset == preset and m.precision == precision]
    if other and peak:
        row = max(other, key=lambda m: m.tokens_per_s_per_gpu)
        row_peak = peak_bf16_flops(row.gpu)
        if row_peak:
            return row.tokens_per_s_per_gpu * peak / row_peak, (
                f"estimated: measured {row.date} on {row.gpu}, scaled by peak FLOP/s to {gpu}"
            )
    same_kind = [m for m in table if m.gpu == gpu and m.precision == precision]
    if same_kind and peak:
        target = preset_params(preset)
        near = min(same_kind, key=lambda m: abs(math.log(preset_params(m.preset) / target)))
        mfu = near.tokens_per_s_per_gpu * preset_flops_per_token(near.preset) / peak
        return mfu * peak / flops_per_token, (
            f"estimated: {100 * mfu:.1f}% MFU as measured {near.date} for {near.preset} on {gpu}"
        )
    return None, f"no measurement for {precision} on {gpu}: wall time unknown"


def preset_params(preset: str) -> int:
    with torch.device("meta"):
        return Transformer(model_config(preset)).num_params()


def preset_flops_per_token(preset: str, seq_len: int = 2048) -> float:
    with torch.device("meta"):
        return Transformer(model_config(preset, max_seq_len=seq_len)).flops_per_token(seq_len)


def estimate_memory(
    cfg: ModelConfig,
    params: int,
    gpus: int,
    gpu: str,
    precision: Precision,
    micro_batch: int,
    seq_len: int,
    activation_checkpointing: int,
) -> Memory:
    """Peak GiB per GPU under FSDP2 (see the module docstring for the terms)."""
    gib = 2.0**30
    available = next((mem for frag, mem in GPU_MEMORY_GIB.items() if frag in gpu), None)
    states = 16 * params / gpus
    block_params = (
        2 * cfg.dim * cfg.dim + 2 * cfg.dim * cfg.n_kv_heads * cfg.head_dim + 3 * cfg.dim * cfg.ffn_hidden
    )
    root_params = params - cfg.n_layers * block_params
    # Same rule as parallelize.resolve_reshard("auto"): small models keep every block gathered.
    reshard = gpus > 1 and (available is None or 2 * params > available * gib / 16)
    gathered = 2 * (root_params + (3 * block_params if reshard else cfg.n_layers * block_params))
    tokens = micro_batch * seq_len
    kv_dim = cfg.n_kv_heads * cfg.head_dim
    per_block = ACTIVATION_FIT * (8 * cfg.dim + 4 * kv_dim + 4 * cfg.ffn_hidden)
    if precision == "float8":
        per_block *= FLOAT8_ACTIVATION_FACTOR
    every = activation_checkpointing
    checkpointed = math.ceil(cfg.n_layers / every) if every else 0
    # A checkpointed block keeps its bf16 input only (its recomputed activations live one block at a
    # time, during backward, when the forward's are already being freed).
    activations = tokens * ((cfg.n_layers - checkpointed) * per_block + checkpointed * 2 * cfg.dim)
    logits = tokens * cfg.vocab_size * LOGIT_BYTES
    total = states + gathered + activations + logits
    return Memory(
        states=states / gib, gathered_weights=gathered / gib, activations=activations / gib,
        logits=logits / gib, total=total / gib, available=available,
    )  # fmt: skip


def plan_warnings(plan: Plan) -> list[str]:
    out = []
    low, high = COMPUTE_OPTIMAL_BAND
    ratio = plan.tokens_per_param
    if not low <= ratio <= high:
        # Compute-optimal split of the same FLOPs (C = 6·N·D with D = 20·N).
        n_opt = math.sqrt(6 * plan.params * plan.tokens / (6 * CHINCHILLA_TOKENS_PER_PARAM))
        side = "under-trained" if ratio < low else "past compute-optimal"
        out.append(
            f"{ratio:.1f} tokens/parameter is {side} (Chinchilla ~{CHINCHILLA_TOKENS_PER_PARAM:.0f}): "
            f"the same compute trains a ~{fmt_count(n_opt)}-parameter model on "
            f"~{fmt_count(CHINCHILLA_TOKENS_PER_PARAM * n_opt)} tokens to a lower loss"
            + (" (fine if a small model for cheap inference is the point)" if ratio > high else "")
        )
    if plan.epochs is not None and plan.epochs > MAX_USEFUL_EPOCHS:
        out.append(
            f"{plan.epochs:.1f} passes over the data: beyond ~{MAX_USEFUL_EPOCHS:.0f}, repeated tokens "
            "add little; get more data or train a smaller model"
        )
    mem = plan.memory
    if mem.fits is False:
        out.append(
            f"will not fit: ~{mem.total:.0f} GiB per GPU estimated, {mem.available * MEMORY_HEADROOM:.0f} "
            f"usable on {plan.gpu}: use more GPUs, a smaller micro-batch (with grad_accum), "
            "activation checkpointing or float8"
        )
    if mem.available is None:
        out.append(f"unknown GPU {plan.gpu!r}: memory not checked (known: {', '.join(GPU_MEMORY_GIB)})")
    if plan.tokens_per_s_per_gpu is None:
        out.append(plan.throughput_source)
    return out


def fmt_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def fmt_duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def plan_rows(plan: Plan) -> list[tuple[str, str]]:
    """(what, value) pairs: the report's lines, shared by the CLI and the Markdown artifact."""
    mem = plan.memory
    rows = [
        ("model", f"{plan.preset}: {fmt_count(plan.params)} parameters"),
        ("GPUs", f"{plan.gpus}x {plan.gpu}, {plan.precision}"),
        ("tokens", f"{fmt_count(plan.tokens)}"
         + (f" ({plan.epochs:.2f} passes over {fmt_count(plan.data_tokens)})" if plan.data_tokens else "")),
        ("tokens per parameter", f"{plan.tokens_per_param:.1f} (Chinchilla ~{CHINCHILLA_TOKENS_PER_PARAM:.0f})"),
        ("steps", f"{plan.steps:,} of {plan.tokens_per_step:,} tokens each (micro-batch {plan.micro_batch} "
         f"x {plan.grad_accum} accumulation x {plan.seq_len} tokens x {plan.gpus} GPUs)"),
        ("training FLOPs", f"{plan.flops:.3g}"),
    ]  # fmt: skip
    if plan.wall_s is not None:
        rows += [
            ("throughput", f"{plan.tokens_per_s_per_gpu:,.0f} tokens/s per GPU ({plan.throughput_source})"),
            ("wall time", fmt_duration(plan.wall_s)),
            ("GPU-hours", f"{plan.gpu_hours:,.1f}"),
        ]
    available = f" of {mem.available:.0f}" if mem.available else ""
    rows.append((
        "memory per GPU",
        f"~{mem.total:.0f}{available} GiB (states {mem.states:.1f}, weights {mem.gathered_weights:.1f}, "
        f"activations {mem.activations:.1f}, logits {mem.logits:.1f}; activation checkpointing "
        f"{'every ' + str(plan.activation_checkpointing) + ' block(s)' if plan.activation_checkpointing else 'off'})",
    ))  # fmt: skip
    return rows


def plan_text(plan: Plan) -> str:
    width = max(len(what) for what, _ in plan_rows(plan))
    lines = [f"{what:<{width}}  {value}" for what, value in plan_rows(plan)]
    lines += [f"WARNING: {w}" for w in plan.warnings]
    return "\n".join(lines)


def plan_markdown(plan: Plan) -> str:
    """The plan as Markdown (a Prefect artifact of the pretrain flow)."""
    lines = ["## Compute plan", "", "| | |", "|---|---|"]
    lines += [f"| {what} | {value} |" for what, value in plan_rows(plan)]
    lines += [""] + [f"**Warning:** {w}" for w in plan.warnings]
    return "\n".join(lines).rstrip() + "\n"
