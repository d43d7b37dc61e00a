"""Checkpoint evaluation speed: eval tokens/s at 350M and 1B, loading from a DCP checkpoint included, and
the share of training wall time the evals cost at the default checkpoint interval.

For each preset: a checkpoint of random weights is written as the trainer lays it out (run.json, DCP
model state, COMPLETE marker) over synthetic packed validation data (random token ids, documents of
8 languages x 4 sources, so the slice bookkeeping runs at full size), then ``model.evaluate`` runs
exactly as ``pretrain evaluate`` does: check the inputs, load the weights (bf16 on GPU), score the
sample. Speed depends on shapes only, so random weights and tokens measure it. The training step
time comes from our trainer's own step (FSDP world of one, bf16 mixed precision on GPU) at the
default micro-batch; eval share = eval seconds / (interval x step seconds).

    python benchmarks/bench_eval.py --device cuda                      # 350M and 1B, 1M tokens
    python benchmarks/bench_eval.py --device cpu --preset tiny         # CPU smoke check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed.checkpoint as dcp
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch.distributed.checkpoint.state_dict import get_model_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import data as packed
from model import evaluate as me
from model.config import OptimConfig, TrainConfig
from model.model import Transformer
from model.run_dir import RunDir
from model.trainer import build_model, build_optimizer, init_distributed, train_step

LANGS = ["en", "de", "fr", "es", "ja", "zh", "ru", "pl"]
SOURCES = ["a.example", "b.example", "c.example", "d.example"]


def byte_tokenizer(path: Path) -> None:
    """A byte-level tokenizer of end-of-text + the 256 bytes (ids past it decode to 0 bytes): enough for
    the per-token byte table; the model's vocabulary is the preset's."""
    vocab = {"<|endoftext|>": 0, **{ch: i + 1 for i, ch in enumerate(me.byte_level_alphabet())}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(str(path))


def synthetic_validation(data_dir: Path, tokens: int, seq_len: int, vocab: int, seed: int = 0) -> None:
    """Packed data whose validation split holds ``tokens`` predicted tokens of random documents."""
    rng = np.random.default_rng(seed)
    data_dir.mkdir(parents=True)
    byte_tokenizer(data_dir / packed.TOKENIZER_FILE)
    window = seq_len + 1
    sequences = -(-tokens // seq_len)
    dtype = packed.token_dtype(vocab)
    placements, langs, sources = [], [], []
    with packed.PackedShardWriter(data_dir, "validation", seq_len, dtype, 1 << 14) as writer:
        while writer.tokens_written < sequences * window:
            n = int(rng.integers(50, 4000))
            placements.append((writer.tokens_written, n, len(placements)))
            langs.append(LANGS[int(rng.integers(len(LANGS)))])
            sources.append(SOURCES[int(rng.integers(len(SOURCES)))])
            writer.write(np.append(rng.integers(1, vocab, n), 0).astype(dtype))
    packed.write_placements(data_dir, "validation", np.array(placements))
    pq.write_table(pa.table({"lang": langs, "source": sources}), data_dir / packed.DOCUMENTS_FILE)
    info = packed.packing_info(
        seq_len=seq_len, vocab_size=vocab, eot_id=0, pad_id=0, tokenizer_sha256="-",
        splits={"validation": writer.info},
    )  # fmt: skip
    packed.write_packing_info(data_dir, info)


def random_checkpoint(root: Path, preset: str, data_dir: Path, vocab: int, seq_len: int, device) -> Path:
    """run.json + ``checkpoints/step-1`` of a randomly initialised ``preset``, as the trainer writes it."""
    run = RunDir.of(root, f"bench-{preset}")
    config = TrainConfig(model=preset, data_dir=data_dir, checkpoint_dir=run.checkpoint_dir)
    run.root.mkdir(parents=True)
    run.config_path.write_text(config.model_dump_json())
    with torch.device(device):
        model = Transformer(config.model_config_for(vocab_size=vocab, seq_len=seq_len))
    checkpoint = run.checkpoint_dir / "step-1"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no process group: single-process save, as meant
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=checkpoint, no_dist=True)
    (checkpoint / "COMPLETE").write_text(json.dumps({"step": 1, "world_size": 1}))
    del model
    return checkpoint


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eval_once(checkpoint: Path, config: me.EvalConfig, device: torch.device) -> dict[str, float]:
    """One eval as ``pretrain evaluate`` runs it, timed by phase."""
    t0 = time.perf_counter()
    inputs = me.resolve_inputs(checkpoint)
    model = me.load_model(inputs, device)
    sync(device)
    t1 = time.perf_counter()
    result = me.evaluate_model(model, inputs, config, device)
    sync(device)
    t2 = time.perf_counter()
    params = model.num_params()
    del model
    return {
        "load_s": t1 - t0,
        "score_s": t2 - t1,
        "total_s": t2 - t0,
        "tokens": result.tokens,
        "params": params,
    }


def train_step_s(preset: str, vocab: int, seq_len: int, batch: int, device: torch.device, mesh, steps: int):
    """Seconds per step of our trainer's step at ``batch`` sequences (median of ``steps`` after 2)."""
    config = TrainConfig(model=preset, data_dir=".", checkpoint_dir=".", micro_batch_size=batch)
    model = build_model(
        config.model_config_for(vocab_size=vocab, seq_len=seq_len),
        mesh, device, seed=0, mixed_precision=device.type == "cuda",
    )  # fmt: skip
    optimizer = build_optimizer(model, OptimConfig())
    tokens = torch.randint(0, vocab, (batch, seq_len + 1), device=device)
    micro = [(tokens[:, :-1], tokens[:, 1:])]
    times = []
    for _ in range(steps + 2):
        sync(device)
        start = time.perf_counter()
        train_step(model, optimizer, micro, grad_clip=1.0)
        sync(device)
        times.append(time.perf_counter() - start)
    del model, optimizer
    return float(np.median(times[2:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--preset", action="append", help="repeatable; default 350M and 1B (tiny on CPU)")
    parser.add_argument("--tokens", type=int, help="eval tokens; default 1M on GPU, 50k on CPU")
    parser.add_argument("--seq-len", type=int, help="default 2048 on GPU, 256 on CPU")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--batch-tokens", type=int, default=0, help="eval tokens per forward; 0: the default")
    parser.add_argument(
        "--train-batch", type=int, default=TrainConfig.model_fields["micro_batch_size"].default
    )
    parser.add_argument("--train-steps", type=int, default=5, help="timed training steps")
    parser.add_argument(
        "--interval",
        type=int,
        default=TrainConfig.model_fields["checkpoint_interval"].default,
        help="steps between checkpoints (each one evaluated); default: the trainer's",
    )
    parser.add_argument("--workdir", help="where checkpoints and data go (default: a temporary dir)")
    parser.add_argument("--out", help="write the results here (JSON)")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    presets = args.preset or (["350M", "1B"] if gpu else ["tiny"])
    tokens = args.tokens or (1_000_000 if gpu else 50_000)
    seq_len = args.seq_len or (2048 if gpu else 256)
    if not gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA starts: the trainer's setup picks gloo
    _, _, device, mesh = init_distributed()

    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-eval-"))
    data_dir = root / "data"
    shutil.rmtree(root / "runs", ignore_errors=True)
    shutil.rmtree(data_dir, ignore_errors=True)
    synthetic_validation(data_dir, tokens, seq_len, args.vocab)
    config = me.EvalConfig(max_tokens=tokens, device=args.device, batch_tokens=args.batch_tokens)
    name = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}; {tokens:,} eval tokens of {seq_len}-token windows, vocabulary {args.vocab:,}")
    print(
        f"{'preset':>6} {'params':>8} {'load s':>7} {'score s':>8} {'total s':>8} {'warm s':>7} "
        f"{'eval tok/s':>11} {'train step s':>12} {'eval share':>10}"
    )
    results = []
    for preset in presets:
        checkpoint = random_checkpoint(root / "runs", preset, data_dir, args.vocab, seq_len, device)
        cold = eval_once(checkpoint, config, device)  # first load: file pages not cached yet
        warm = eval_once(checkpoint, config, device)
        step_s = train_step_s(preset, args.vocab, seq_len, args.train_batch, device, mesh, args.train_steps)
        share = cold["total_s"] / (args.interval * step_s)
        row = {
            "preset": preset, "params": cold["params"], "device": name, "seq_len": seq_len, "vocab": args.vocab,
            "eval_tokens": cold["tokens"], "load_s": cold["load_s"], "score_s": cold["score_s"],
            "total_s": cold["total_s"], "warm_total_s": warm["total_s"],
            "eval_tokens_per_s": cold["tokens"] / cold["score_s"], "train_step_s": step_s,
            "train_batch": args.train_batch, "interval": args.interval, "eval_share": share,
        }  # fmt: skip
        results.append(row)
        print(
            f"{preset:>6} {cold['params'] / 1e6:>7.1f}M {cold['load_s']:>7.1f} {cold['score_s']:>8.1f} "
            f"{cold['total_s']:>8.1f} {warm['total_s']:>7.1f} {row['eval_tokens_per_s']:>11,.0f} "
            f"{step_s:>12.3f} {share:>10.1%}"
        )
        shutil.rmtree(checkpoint.parent.parent)
        if gpu:
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    if not args.workdir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
