"""Training throughput measured on lent GPUs with ``benchmarks/bench_train.py`` (benchmarks/RESULTS.md).

The compute planner (``tasks/plan.py``) reads its wall-time predictions from this table. Each row is
one measured configuration: per-GPU tokens/s of our trainer's step (FSDP2, per-block compile, cuDNN
attention, seq len 2048, vocab 32768, random tokens), the per-GPU micro-batch, activation
checkpointing (0: none, k: every k-th block) and the peak memory allocated. Add a row when a new
configuration is measured; keep the date and command it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Precision = Literal["bf16", "float8"]


@dataclass(frozen=True)
class Measurement:
    preset: str
    gpu: str  # device-name fragment, as in model.metrics.PEAK_BF16_FLOPS
    gpus: int
    precision: Precision
    micro_batch: int
    activation_checkpointing: int
    tokens_per_s_per_gpu: float
    peak_mem_gib: float | None
    date: str
    command: str


_COMPARE = "bench_train.py --presets {p} --batch {b} --precisions bf16,float8 --sdpa cudnn --no-baseline"
_FSDP = "torchrun --nproc-per-node {n} bench_train.py --fsdp --presets {p} --batch {b} --precisions bf16,float8 --sdpa cudnn"
_H100 = "bench_train.py --presets 125M,350M,1B --sdpa cudnn --steps 15 --warmup 5"


M = Measurement
MEASURED: list[Measurement] = [
    # 2026-11-29, nvidia-h200-x2, torch 2.11.0+cu130, torchao 0.17.0 (issue 16)
    M("1B", "H200", 1, "bf16", 8, 0, 75_365, 34.3, "2026-11-29", _COMPARE.format(p="1B", b=8)),
    M("1B", "H200", 1, "float8", 8, 0, 88_088, 28.4, "2026-11-29", _COMPARE.format(p="1B", b=8)),
    M("1B", "H200", 1, "bf16", 24, 0, 82_035, 74.6, "2026-11-29", _COMPARE.format(p="1B", b=24)),
    M("1B", "H200", 1, "float8", 24, 0, 101_948, 56.7, "2026-11-29", _COMPARE.format(p="1B", b=24)),
    M("7B", "H200", 2, "bf16", 8, 0, 12_239, 111.2, "2026-11-29", _FSDP.format(n=2, p="7B", b=8)),
    M("7B", "H200", 2, "float8", 8, 0, 16_785, 89.9, "2026-11-29", _FSDP.format(n=2, p="7B", b=8)),
    M("7B", "H200", 2, "bf16", 4, 0, 11_435, 76.7, "2026-11-29", _FSDP.format(n=2, p="7B", b=4)),
    M(
        "7B",
        "H200",
        2,
        "bf16",
        12,
        2,
        11_608,
        99.4,
        "2026-11-29",
        _FSDP.format(n=2, p="7B", b=12) + " --ac 2",
    ),
    M(
        "7B",
        "H200",
        2,
        "bf16",
        16,
        1,
        10_679,
        62.5,
        "2026-11-29",
        _FSDP.format(n=2, p="7B", b=16) + " --ac 1",
    ),
    M("7B", "H200", 2, "float8", 12, 0, 18_152, 113.9, "2026-11-29", _FSDP.format(n=2, p="7B", b=12)),
    # 2026-11-21, nvidia-h200-x4 (FSDP scaling table of RESULTS.md)
    M("350M", "H200", 1, "bf16", 24, 0, 204_204, None, "2026-11-21", _FSDP.format(n=1, p="350M", b=24)),
    M("350M", "H200", 2, "bf16", 24, 0, 196_962, None, "2026-11-21", _FSDP.format(n=2, p="350M", b=24)),
    M("350M", "H200", 4, "bf16", 24, 0, 197_060, None, "2026-11-21", _FSDP.format(n=4, p="350M", b=24)),
    # 2026-11-21, nvidia-h100-x1
    M("125M", "H100", 1, "bf16", 32, 0, 518_065, 23.8, "2026-11-21", _H100),
    M("350M", "H100", 1, "bf16", 24, 0, 192_443, 44.5, "2026-11-21", _H100),
    M("1B", "H100", 1, "bf16", 16, 0, 76_824, 54.5, "2026-11-21", _H100),
]
