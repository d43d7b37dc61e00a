"""The compute planner's arithmetic (tasks/plan.py): steps, FLOPs, time, tokens per parameter, the
compute-optimal warnings, the memory estimate against the measured peaks, where the throughput comes
from, the run-form and CLI entry points."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flows.cli import main
from model.config import TrainSettings
from model.data import FORMAT_VERSION, PACKING_FILE
from model.model import Transformer, model_config
from tasks.plan import (
    estimate_memory,
    make_plan,
    parse_count,
    plan_for_run,
    plan_markdown,
    plan_text,
)
from tasks.throughput import MEASURED, Measurement


def row(preset="1B", gpu="H200", gpus=1, precision="bf16", batch=8, ac=0, tps=100_000.0) -> Measurement:
    return Measurement(preset, gpu, gpus, precision, batch, ac, tps, None, "2026-01-01", "test")


def shapes(preset: str, vocab: int = 32768) -> tuple[int, float]:
    with torch.device("meta"):
        model = Transformer(model_config(preset, vocab_size=vocab))
    return model.num_params(), model.flops_per_token(2048)


def test_steps_flops_time_and_gpu_hours():
    params, flops_per_token = shapes("1B")
    tokens = 10_000_000_000
    plan = make_plan("1B", gpus=4, gpu="H200", tokens=tokens, vocab_size=32768, table=[row(tps=80_000)])
    assert plan.params == params
    assert plan.micro_batch == 8 and plan.tokens_per_step == 8 * 2048 * 4
    assert plan.steps == math.ceil(tokens / (8 * 2048 * 4))
    assert plan.flops == pytest.approx(flops_per_token * tokens)
    assert plan.wall_s == pytest.approx(tokens / (80_000 * 4))
    assert plan.gpu_hours == pytest.approx(plan.wall_s * 4 / 3600)
    assert plan.tokens_per_param == pytest.approx(tokens / params)
    assert "per-GPU rate assumed at 4 GPUs" in plan.throughput_source


def test_compute_optimal_warnings():
    params, _ = shapes("1B")
    optimal = make_plan("1B", gpus=8, gpu="H200", tokens=20 * params, vocab_size=32768, table=[row()])
    assert not any("compute-optimal" in w or "under-trained" in w for w in optimal.warnings)
    under = make_plan("1B", gpus=8, gpu="H200", tokens=2 * params, vocab_size=32768, table=[row()])
    (warning,) = [w for w in under.warnings if "under-trained" in w]
    # the same FLOPs (6·N·D) at 20 tokens/param: N = sqrt(N·D/20) = N/sqrt(10)
    assert f"~{params / math.sqrt(10) / 1e6:.3g}M-parameter" in warning
    over = make_plan("1B", gpus=8, gpu="H200", tokens=500 * params, vocab_size=32768, table=[row()])
    assert any("past compute-optimal" in w for w in over.warnings)


def test_repeated_data_warning():
    plan = make_plan("1B", gpus=8, gpu="H200", tokens=10**10, data_tokens=10**9, table=[row()])
    assert plan.epochs == pytest.approx(10.0)
    assert any("passes over the data" in w for w in plan.warnings)


@pytest.mark.parametrize("measured", [m for m in MEASURED if m.peak_mem_gib], ids=str)
def test_memory_estimate_is_within_15_percent_of_every_measured_peak(measured: Measurement):
    cfg = model_config(measured.preset, vocab_size=32768)
    params, _ = shapes(measured.preset)
    est = estimate_memory(
        cfg, params, measured.gpus, measured.gpu, measured.precision, measured.micro_batch, 2048,
        measured.activation_checkpointing,
    )  # fmt: skip
    assert est.total == pytest.approx(measured.peak_mem_gib, rel=0.15)


def test_will_not_fit_warning_and_what_helps():
    too_big = make_plan("7B", gpus=1, gpu="H100", tokens=10**9, micro_batch=8)
    assert too_big.memory.fits is False
    assert any("will not fit" in w for w in too_big.warnings)
    sharded = make_plan("7B", gpus=2, gpu="H200", tokens=10**9, micro_batch=8)
    assert sharded.memory.fits is True
    assert sharded.memory.states == pytest.approx(too_big.memory.states / 2)
    checkpointed = make_plan(
        "7B", gpus=2, gpu="H200", tokens=10**9, micro_batch=8, activation_checkpointing=1
    )
    assert checkpointed.memory.activations < sharded.memory.activations / 10
    fp8 = make_plan("7B", gpus=2, gpu="H200", tokens=10**9, micro_batch=8, precision="float8")
    assert fp8.memory.activations < sharded.memory.activations


def test_throughput_sources_in_order():
    table = [row("1B", "H200", 2, tps=80_000), row("1B", "H100", 1, tps=70_000)]
    exact = make_plan("1B", gpus=2, gpu="H200", tokens=10**9, table=table)
    assert exact.tokens_per_s_per_gpu == 80_000 and exact.throughput_source.startswith("measured")
    scaled = make_plan("1B", gpus=1, gpu="A100", tokens=10**9, table=table)
    assert scaled.tokens_per_s_per_gpu == pytest.approx(80_000 * 312 / 989)  # fastest row, by peak
    by_mfu = make_plan("350M", gpus=1, gpu="H200", tokens=10**9, table=table)
    _, f_1b = shapes("1B")
    _, f_350m = shapes("350M")
    assert by_mfu.tokens_per_s_per_gpu == pytest.approx(80_000 * f_1b / f_350m)
    assert "MFU" in by_mfu.throughput_source
    unknown = make_plan("1B", gpus=1, gpu="Z9000", tokens=10**9, table=table)
    assert unknown.wall_s is None
    assert any("no measurement" in w for w in unknown.warnings)
    assert any("unknown GPU" in w for w in unknown.warnings)


def test_defaults_follow_the_fastest_measured_configuration():
    plan = make_plan("7B", gpus=2, gpu="H200", tokens=10**9)
    fastest = max(
        (m for m in MEASURED if (m.preset, m.gpu, m.gpus, m.precision) == ("7B", "H200", 2, "bf16")),
        key=lambda m: m.tokens_per_s_per_gpu,
    )
    assert (plan.micro_batch, plan.activation_checkpointing) == (
        fastest.micro_batch,
        fastest.activation_checkpointing,
    )


def test_plan_matches_a_measured_training_run_within_10_percent():
    """benchmarks/RESULTS.md, 2026-11-29: 300 steps of 1B on one H200 at micro-batch 8 on real packed
    data through the trainer's loop (not the benchmark's random batches) ran 219.1 ms/step (bf16)
    and 182.6 ms/step (float8) after warm-up. The plan from the throughput table must agree."""
    for precision, measured_step_s in (("bf16", 0.2191), ("float8", 0.1826)):
        plan = make_plan(
            "1B", gpus=1, gpu="H200", tokens=300 * 8 * 2048, micro_batch=8, precision=precision,
            vocab_size=32000,
        )  # fmt: skip
        assert plan.wall_s == pytest.approx(300 * measured_step_s, rel=0.10)


def test_parse_count():
    assert parse_count("300B") == 300 * 10**9
    assert parse_count("2e12") == 2 * 10**12
    assert parse_count("1.5T") == 1_500_000_000_000
    with pytest.raises(ValueError, match="not a count"):
        parse_count("lots")


def fake_packed(tmp_path, sequences=1000, seq_len=2048, vocab=32000):
    """The two files the planner reads: a manifest (it is a dataset) and packing.json."""
    (tmp_path / "manifest.json").write_text("{}")
    packing = {
        "format_version": FORMAT_VERSION, "seq_len": seq_len, "vocab_size": vocab, "tokenizer": "t.json",
        "splits": {"train": {"sequences": sequences, "tokens": sequences * seq_len}},
    }  # fmt: skip
    (tmp_path / PACKING_FILE).write_text(json.dumps(packing))
    return tmp_path


def test_plan_for_a_configured_run(tmp_path):
    data = fake_packed(tmp_path)
    settings = TrainSettings(model="1B", micro_batch_size=4, grad_accum_steps=2, max_steps=500, float8=True)
    plan = plan_for_run(settings, data, gpus=2, gpu="H200")
    assert plan.tokens == 500 * 4 * 2 * 2048 * 2 and plan.steps == 500
    assert plan.precision == "float8" and plan.data_tokens == 1000 * 2048
    markdown = plan_markdown(plan)
    assert markdown.startswith("## Compute plan") and "| tokens per parameter |" in markdown
    assert "**Warning:**" in markdown  # 4 passes over a tiny dataset, far under 20 tokens/param


def test_cli_plan(tmp_path, capsys):
    assert main(["plan", "--tokens", "20B", "--model", "1B", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "tokens per parameter" in out and "GPU-hours" in out
    assert main(["plan", "--data", str(fake_packed(tmp_path)), "--epochs", "2", "--model", "125M"]) == 0
    assert "2.00 passes" in capsys.readouterr().out
    assert main(["plan", "--data", str(tmp_path / "missing")]) == 2
    assert main(["plan", "--model", "1B"]) == 2
    assert "give --data" in capsys.readouterr().err
    assert plan_text(make_plan("1B", gpus=1, gpu="H200", tokens=10**9))
