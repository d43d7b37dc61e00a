"""Checkpoint evaluation speed on one device: the two ways of evaluating a training run's checkpoints,
eval tokens/s at 350M and 1B, and the share of training wall time each costs at the default interval.

For each preset, over synthetic packed validation data (random token ids, documents of 8 languages x 4
sources, so the slice bookkeeping runs at full size) and synthetic capability tasks and prompts of the
shipped tasks' sizes (``--no-tasks``: validation only):

- **own process** (``pretrain evaluate``, the CPU path): a checkpoint of random weights written as the
  trainer lays it out, then ``model.evaluate`` exactly as ``pretrain evaluate`` runs it: check the
  inputs, load the weights (bf16 on GPU), score the sample, the tasks and the samples. Cold (file pages
  not cached yet) and warm. The process start (Python, torch, CUDA) is not counted.
- **training ranks** (``EvalConfig.on_training_ranks``, the GPU path): the trainer's own FSDP model
  (world of one) evaluated between steps by ``model.evaluate.TrainingEval`` as the trainer's hook runs
  it, eager and compiled; the first call (building the copy, compiling) and a later one.

Speed depends on shapes only, so random weights and tokens measure it. The training step time is our
trainer's step at the default micro-batch; share = eval seconds / (interval x step seconds).

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

REPO = Path(__file__).resolve().parents[1]
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


def synthetic_tasks(folder: Path, languages: int, seed: int = 0) -> None:
    """The shipped tasks' YAML (evals/) over random items of their sizes, and 3 prompts per language.

    The byte tokenizer makes one token per character, so lengths are set in tokens as our BPE makes
    them of the real items (about 4 characters per token): contexts of up to 150, choices of 5 to 75,
    prompts of 10 to 60."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)

    def text(low: int, high: int) -> str:
        return "".join(rng.choice(list("abcdefghij klmnop qrstuvwxyz"), int(rng.integers(low, high))))

    for template in sorted((REPO / "evals").glob("*.yaml")):
        shutil.copy(template, folder / template.name)
        items = [
            {
                "context": text(40, 150),
                "choices": [text(5, 75) for _ in range(4)],
                "label": int(rng.integers(4)),
            }
            for _ in range(400)
        ]
        (folder / f"{template.stem}.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    prompts = [{"lang": LANGS[i % languages], "text": text(10, 60)} for i in range(3 * languages)]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))


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


def trainer_model(preset: str, vocab: int, seq_len: int, batch: int, device: torch.device, mesh, steps: int):
    """Our trainer's FSDP model and optimizer after ``steps`` + 2 steps at ``batch`` sequences, and the
    median seconds per step of the last ``steps``."""
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
    return model, optimizer, float(np.median(times[2:]))


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def on_training_ranks(
    model, checkpoint: Path, config: me.EvalConfig, device, compile: bool
) -> dict[str, float]:
    """``TrainingEval`` on the trainer's model as its hook runs it: the first call (the copy made, the
    forward compiled), a later one, and the validation alone (for tokens/s)."""
    run_config = me.run_config(checkpoint).model_copy(
        update={"eval": config.model_copy(update={"compile": compile, "on_training_ranks": True})}
    )
    first_s = timed(lambda: me.TrainingEval(run_config, 0, 1, device)(model, 1), device)
    evaluator = me.TrainingEval(run_config, 0, 1, device)
    evaluator(model, 1)
    total_s = timed(lambda: evaluator(model, 2), device)
    evaluator.config = evaluator.config.model_copy(update={"tasks_and_samples": False})
    val_s = timed(lambda: evaluator(model, 3), device)
    tokens = me.read_training_eval(checkpoint.parent / "step-3", 0).tokens
    return {"first_s": first_s, "total_s": total_s, "val_s": val_s, "tokens": tokens}


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
    parser.add_argument("--no-tasks", action="store_true", help="validation only: no tasks, no samples")
    parser.add_argument("--task-limit", type=int, help="items scored per task (default: EvalConfig's)")
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
    for made in ("runs", "data", "tasks"):
        shutil.rmtree(root / made, ignore_errors=True)
    synthetic_validation(data_dir, tokens, seq_len, args.vocab)
    tasks_dir = None if args.no_tasks else root / "tasks"
    if tasks_dir:
        synthetic_tasks(tasks_dir, len(LANGS))
    config = me.EvalConfig(
        max_tokens=tokens,
        device=args.device,
        batch_tokens=args.batch_tokens,
        tasks_dir=tasks_dir,
        **({"task_limit": args.task_limit} if args.task_limit else {}),
    )
    val_only = config.model_copy(update={"tasks_and_samples": False})
    name = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}; {tokens:,} eval tokens of {seq_len}-token windows, vocabulary {args.vocab:,}")
    header = (
        f"{'preset':>6} {'path':<22} {'first s':>8} {'load s':>7} {'total s':>8} {'val s':>6} "
        f"{'val tok/s':>10} {'step s':>7} {'share':>6}"
    )
    results, lines = [], []
    for preset in presets:
        checkpoint = random_checkpoint(root / "runs", preset, data_dir, args.vocab, seq_len, device)
        cold = eval_once(checkpoint, config, device)  # first load: file pages not cached yet
        warm = eval_once(checkpoint, config, device)
        alone = eval_once(checkpoint, val_only, device)
        model, optimizer, step_s = trainer_model(
            preset, args.vocab, seq_len, args.train_batch, device, mesh, args.train_steps
        )
        interval_s = args.interval * step_s
        rows = [
            {
                "path": "own process (cold)",
                "first_s": cold["total_s"],
                "load_s": cold["load_s"],
                "total_s": cold["total_s"],
                "warm_total_s": warm["total_s"],
                "val_s": alone["score_s"],
                "val_total_s": alone["total_s"],
                "tokens": alone["tokens"],
            }
        ]
        for compiled in (False, True):
            ranks = on_training_ranks(model, checkpoint, config, device, compiled)
            path = f"training ranks{', compiled' if compiled else ''}"
            rows.append({"path": path, "load_s": 0.0, **ranks})
        for row in rows:
            row.update(
                preset=preset, params=cold["params"], device=name, seq_len=seq_len, vocab=args.vocab,
                eval_tokens_per_s=row["tokens"] / row["val_s"], train_step_s=step_s,
                train_batch=args.train_batch, interval=args.interval, eval_share=row["total_s"] / interval_s,
            )  # fmt: skip
            results.append(row)
            lines.append(
                f"{preset:>6} {row['path']:<22} {row['first_s']:>8.1f} {row['load_s']:>7.1f} "
                f"{row['total_s']:>8.2f} {row['val_s']:>6.2f} {row['eval_tokens_per_s']:>10,.0f} "
                f"{step_s:>7.3f} {row['eval_share']:>6.1%}"
            )
            print(lines[-1], flush=True)
        del model, optimizer
        shutil.rmtree(checkpoint.parent.parent)
        if gpu:
            torch.cuda.empty_cache()
    print("\n" + header + "\n" + "\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    if not args.workdir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
