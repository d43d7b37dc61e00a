"""Checkpoint evaluation: exact bits per byte, the stratified window sample, per-language metrics of a
real training run's checkpoints in MLflow, and one-line errors for bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed.checkpoint as dcp
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from tokenizers import Tokenizer
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from flows import cli
from flows.evaluate import EvaluateParams, evaluate
from model import data as packed
from model import evaluate as me
from model.config import TrainConfig
from model.model import Transformer
from model.run_dir import RunDir
from model.tracking import find_or_create_run
from tasks import pack
from tasks import tokenizer as tk
from tests.test_tokenizer import SMALL, build_lid_dataset

REPO = Path(__file__).resolve().parents[1]
# Multi-byte UTF-8 of every length, a special token's text as plain text, and a token-splitting emoji.
TEXT = "a héllo wörld, naïve café — 日本語のテキスト 🎉🇫🇷 <|endoftext|> Ωμέγα ok"


@pytest.fixture(scope="module")
def packed_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 lid-dev documents (many languages and sources), a 512-token BPE, windows of 33 tokens."""
    root = tmp_path_factory.mktemp("eval-data")
    documents = build_lid_dataset(corpus, root / "documents", limit=300, shards=1)
    tk.train_tokenizer([documents], root / "tokenizer", SMALL.model_copy(update={"sample_chars": 300_000}))
    config = pack.PackConfig(seq_len=32, tokens_per_shard=33 * 200, validation_fraction=0.1)
    pack.pack_datasets([documents], root / "tokenizer", root / "packed", config)
    return root / "packed"


def save_checkpoint(model: nn.Module, checkpoint: Path, step: int) -> Path:
    """A checkpoint as the trainer lays it out (DCP ``model`` state + COMPLETE marker), written directly."""
    checkpoint.mkdir(parents=True)
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=checkpoint, no_dist=True)
    (checkpoint / "COMPLETE").write_text(json.dumps({"step": step, "world_size": 1}))
    return checkpoint


def hand_made_run(root: Path, data_dir: Path, vocab_size: int, step: int = 5) -> Path:
    """run.json + one checkpoint of a freshly initialised tiny model; returns the checkpoint."""
    run = RunDir.of(root / "runs", "hand-made")
    config = TrainConfig(data_dir=data_dir, checkpoint_dir=run.checkpoint_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    run.config_path.write_text(config.model_dump_json())
    model = Transformer(config.model_config_for(vocab_size=vocab_size, seq_len=32))
    model.init_weights(0)
    return save_checkpoint(model, run.checkpoint_dir / f"step-{step}", step)


# ---------------------------------------------------------------------------------------------
# Bytes and bits per byte


def test_token_bytes_concatenate_to_the_text(packed_dir):
    tokenizer = Tokenizer.from_file(str(packed_dir / packed.TOKENIZER_FILE))
    lengths = me.token_byte_lengths(tokenizer)
    ids = tk.encode_texts(tk.load_tokenizer(packed_dir / packed.TOKENIZER_FILE), [TEXT])[0]
    assert sum(lengths[i] for i in ids) == len(TEXT.encode("utf-8"))
    alphabet = me.byte_level_alphabet()
    pieces = [bytes(alphabet[c] for c in tokenizer.id_to_token(i)) for i in ids]
    assert b"".join(pieces) == TEXT.encode("utf-8")
    assert any(len(p) > 1 for p in pieces) and any(p and p[0] >= 0x80 for p in pieces)
    info = packed.read_packing_info(packed_dir)
    assert lengths[info["eot_id"]] == 0 and lengths[info["pad_id"]] == 0


class Uniform(nn.Module):
    """Equal logits for every token: NLL is exactly ln(vocab) per predicted token."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*tokens.shape, self.vocab)


def write_hand_made_validation(
    data_dir: Path, tokenizer_file: Path, docs: list[tuple[str, str, str]]
) -> dict:
    """A packed directory whose validation split is exactly ``docs`` (text, lang, source), one window."""
    tokenizer = tk.load_tokenizer(tokenizer_file)
    vocab, eot = tokenizer.get_vocab_size(), tokenizer.token_to_id(tk.EOT)
    ids = [tk.encode_texts(tokenizer, [text])[0] for text, _, _ in docs]
    stream = sum(len(d) + 1 for d in ids)
    data_dir.mkdir(parents=True)
    with packed.PackedShardWriter(
        data_dir, "validation", stream - 1, packed.token_dtype(vocab), 10
    ) as writer:
        placements = []
        for row, doc in enumerate(ids):
            placements.append((writer.tokens_written, len(doc), row))
            writer.write(np.array([*doc, eot]))
    packed.write_placements(data_dir, "validation", np.array(placements))
    pq.write_table(
        pa.table({"lang": [d[1] for d in docs], "source": [d[2] for d in docs]}),
        data_dir / packed.DOCUMENTS_FILE,
    )
    shutil.copy(tokenizer_file, data_dir / packed.TOKENIZER_FILE)
    info = packed.packing_info(
        seq_len=stream - 1, vocab_size=vocab, eot_id=eot, pad_id=tokenizer.token_to_id(tk.PAD),
        tokenizer_sha256="-", splits={"validation": writer.info},
    )  # fmt: skip
    packed.write_packing_info(data_dir, info)
    return {"ids": ids, "vocab": vocab}


def test_bits_per_byte_is_exact_on_a_hand_made_example(packed_dir, tmp_path):
    # Each text starts with a one-byte, one-token word: the window's first token (input only).
    docs = [("a " + TEXT, "xx", "one.example"), ("b Ωμέγα 日本 ok", "yy", "two.example")]
    made = write_hand_made_validation(tmp_path / "data", packed_dir / packed.TOKENIZER_FILE, docs)
    assert made["ids"][0][0] != made["ids"][0][1]  # "a" is its own token
    vocab = made["vocab"]
    inputs = me.EvalInputs(
        checkpoint=tmp_path / "step-0", step=0, config=None, data_dir=tmp_path / "data",
        info=packed.read_packing_info(tmp_path / "data"),
        tokenizer=Tokenizer.from_file(str(packed_dir / packed.TOKENIZER_FILE)), vocab_size=vocab,
    )  # fmt: skip
    out = me.evaluate_model(Uniform(vocab), inputs, me.EvalConfig(), torch.device("cpu"))

    text_bytes = [len(t.encode("utf-8")) for t, _, _ in docs]
    text_tokens = [len(d) for d in made["ids"]]
    # Predicted: every token but the stream's first ("a"); the two end-of-texts have no bytes.
    predicted_bytes = text_bytes[0] - 1 + text_bytes[1]
    predicted_text_tokens = text_tokens[0] - 1 + text_tokens[1]
    expected_bpb = predicted_text_tokens * math.log(vocab) / (math.log(2) * predicted_bytes)
    assert out.tokens == predicted_text_tokens + 2 and out.windows == 1
    assert next(r for r in out.table if r.kind == "overall").bytes == predicted_bytes  # exact (integers)
    # NLL is fp32 (ln V to 1e-7); the rest is exact.
    assert out.loss == pytest.approx(math.log(vocab), rel=1e-6)
    assert out.bpb == pytest.approx(expected_bpb, rel=1e-6)
    assert out.metrics["val/bpb"] == out.bpb
    targets = [*made["ids"][0][1:], inputs.info["eot_id"], *made["ids"][1], inputs.info["eot_id"]]
    assert out.accuracy == targets.count(0) / len(targets)  # argmax of equal logits: token 0
    rows = {(r.kind, r.name): r for r in out.table}
    assert rows["lang", "xx"].bytes == text_bytes[0] - 1 and rows["lang", "yy"].bytes == text_bytes[1]
    assert out.metrics["val/bpb/xx"] == pytest.approx(
        (text_tokens[0] - 1) * math.log2(vocab) / (text_bytes[0] - 1), rel=1e-6
    )
    assert out.metrics["val/bpb/source/two.example"] == pytest.approx(
        text_tokens[1] * math.log2(vocab) / text_bytes[1], rel=1e-6
    )
    assert set(out.metrics) == {
        "val/loss", "val/bpb", "val/accuracy", "val/bpb/xx", "val/bpb/yy",
        "val/bpb/source/one.example", "val/bpb/source/two.example",
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The sample


def test_window_sample_is_fixed_covers_every_slice_and_is_a_stratified_estimate(packed_dir, tmp_path):
    checkpoint = hand_made_run(tmp_path, packed_dir, 512)
    inputs = me.resolve_inputs(checkpoint)
    model = me.load_model(inputs, torch.device("cpu"))
    every = me.evaluate_model(model, inputs, me.EvalConfig(max_tokens=10**9), torch.device("cpu"))
    config = me.EvalConfig(max_tokens=2000, min_windows_per_slice=2)
    sampled = me.evaluate_model(model, inputs, config, torch.device("cpu"))
    again = me.evaluate_model(model, inputs, config, torch.device("cpu"))
    assert sampled.metrics == again.metrics  # a fixed sample

    info = inputs.info
    sequences = info["splits"]["validation"]["sequences"]
    assert every.windows == sequences and every.tokens == sequences * info["seq_len"]
    assert 2000 / 32 <= sampled.windows < sequences / 3
    slices = me.validation_slices(packed_dir)
    assert {r.name for r in sampled.table if r.kind == "slice"} == {f"{a}/{b}" for a, b in slices.names}
    # Every estimate stands for the whole split, sampled or not.
    for out in (every, sampled):
        by_kind = {k: [r for r in out.table if r.kind == k] for k in ("overall", "lang", "source", "slice")}
        total = by_kind["overall"][0].tokens_in_split
        assert total == sequences * info["seq_len"]
        for kind in ("lang", "source", "slice"):
            assert sum(r.tokens_in_split for r in by_kind[kind]) == total
    # An untrained model: the sample's estimate is close to the full split's value.
    assert sampled.loss == pytest.approx(every.loss, rel=0.02)
    assert sampled.bpb == pytest.approx(every.bpb, rel=0.05)


# ---------------------------------------------------------------------------------------------
# A real training run: checkpoints at several steps, evaluated into its MLflow run


@pytest.fixture(scope="module")
def trained(packed_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[RunDir, str, str]:
    """The trainer (one CPU process) for 30 steps, a checkpoint every 10, logging into an MLflow run
    made beforehand as the pretrain flow makes it; (run dir, tracking URI, run id)."""
    root = tmp_path_factory.mktemp("eval-run")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    _, run_id = find_or_create_run(MlflowClient(tracking_uri=uri), "pretrain", "evaluated")
    run = RunDir.of(root / "runs", "evaluated")
    config = TrainConfig(
        data_dir=packed_dir, checkpoint_dir=run.checkpoint_dir, micro_batch_size=16, max_steps=30,
        checkpoint_interval=10, keep_checkpoints=5, log_interval=5, checkpoint_async=False,
        optim={"lr": 3e-3, "warmup_steps": 3}, mlflow={"tracking_uri": uri, "run_id": run_id},
    )  # fmt: skip
    run.root.mkdir(parents=True)
    run.config_path.write_text(config.model_dump_json())
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    done = subprocess.run(
        [sys.executable, "-m", "model.trainer", "--config", str(run.config_path)],
        cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return run, uri, run_id


@pytest.mark.slow
def test_per_language_metrics_at_every_checkpoint_go_into_the_training_run(
    trained, packed_dir, prefect_harness
):
    run, uri, run_id = trained
    steps = [10, 20, 30]
    # No tasks_dir: the tasks and prompts are built once into the run dir from the validation documents.
    config = {"threads": 1, "task_limit": 12, "sample_tokens": 8}
    results = [
        evaluate(EvaluateParams(checkpoint=str(run.checkpoint_dir / f"step-{s}"), eval=config)) for s in steps
    ]
    client = MlflowClient(tracking_uri=uri)
    history = {key: client.get_metric_history(run_id, key) for key in results[-1].metrics}
    langs = {r.name for r in results[-1].table if r.kind == "lang"}
    sources = {r.name for r in results[-1].table if r.kind == "source"}
    assert len(langs) >= 10 and len(sources) >= 3
    for key in ["val/loss", "val/bpb", "val/accuracy", *(f"val/bpb/{lang}" for lang in langs)]:
        assert [m.step for m in history[key]] == steps, key
    assert all(history[f"val/bpb/source/{s}"] for s in sources)
    tasks = [
        f"task/{name}/{m}"
        for name in ("next_sentence", "page_continuation", "word_order")
        for m in ("acc", "acc_norm")
    ]
    for key in tasks:
        assert [m.step for m in history[key]] == steps, key
    assert len(history) == 3 + len(langs) + len(sources) + len(tasks)  # no chart group per slice
    assert (run.root / "eval-tasks" / packed_dir.name / "prompts.jsonl").is_file()
    assert [m.value for m in history["val/bpb"]] == [r.bpb for r in results]
    assert results[-1].bpb < results[0].bpb  # it learns
    assert client.get_metric_history(run_id, "loss")  # the trainer's own metrics, same run

    # The eval tables as artifacts: JSON and a readable table per step.
    names = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert names == {f"eval/step-{s}.{ext}" for s in steps for ext in ("json", "md")}
    samples = {a.path for a in client.list_artifacts(run_id, "samples")}
    assert samples == {f"samples/step-{s}.md" for s in steps}
    text = Path(client.download_artifacts(run_id, "samples/step-30.md")).read_text()
    assert text.startswith("# Samples at step 30") and "greedy:" in text
    local = Path(client.download_artifacts(run_id, "eval/step-30.json"))
    assert me.EvalResult.model_validate_json(local.read_text()).metrics == results[-1].metrics
    table = Path(client.download_artifacts(run_id, "eval/step-30.md")).read_text()
    assert "| lang | en |" in table and "| overall | all |" in table and "| next_sentence | 12 |" in table
    with get_client(sync_client=True) as prefect:
        artifact = {a.key: a for a in prefect.read_latest_artifacts()}["eval-evaluated"]
    assert artifact.type == "table"


@pytest.mark.slow
def test_full_eval_equals_the_plain_mean_cross_entropy(trained, packed_dir):
    run, _, _ = trained
    out = me.evaluate_checkpoint(run.checkpoint_dir / "step-30", me.EvalConfig(max_tokens=10**9, threads=1))
    inputs = me.resolve_inputs(run.checkpoint_dir / "step-30")
    model = me.load_model(inputs, torch.device("cpu"))
    windows = torch.from_numpy(np.concatenate(packed.open_shards(packed_dir, "validation")).astype(np.int64))
    with torch.no_grad():
        plain = float(model(windows[:, :-1], windows[:, 1:]))
    assert out.loss == pytest.approx(plain, rel=1e-5)
    slices = [r for r in out.table if r.kind == "slice"]
    assert sum(r.tokens for r in slices) == out.tokens == windows[:, 1:].numel()


def test_the_eval_on_the_training_ranks_is_the_eval_of_the_checkpoint(packed_dir, tmp_path):
    checkpoint = hand_made_run(tmp_path, packed_dir, 512)
    inputs = me.resolve_inputs(checkpoint)
    config = me.EvalConfig(max_tokens=3000, on_training_ranks=True)
    # The trainer's hook on its (here unsharded) model: a plain copy of the weights is evaluated.
    trained = me.load_model(inputs, torch.device("cpu"))
    run_config = inputs.config.model_copy(update={"eval": config})
    result = me.TrainingEval(run_config, 0, 1, torch.device("cpu"))(trained, 5)
    assert result.checkpoint == str(checkpoint) and result.step == 5
    assert me.read_training_eval(checkpoint, timeout_s=0) == result  # what the flow reads and logs
    alone = me.evaluate_checkpoint(checkpoint, config)
    assert result.metrics == pytest.approx(alone.metrics, rel=1e-6) and result.tokens == alone.tokens
    with pytest.raises(me.EvalInputError, match=r"no eval of .* from the training ranks"):
        me.read_training_eval(checkpoint.parent / "step-6", timeout_s=0)


# ---------------------------------------------------------------------------------------------
# Bad input


def one_line_error(args: list[str], capsys: pytest.CaptureFixture) -> str:
    assert cli.main(["evaluate", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_bad_input_is_one_line_naming_the_cause(packed_dir, tmp_path, capsys):
    checkpoint = hand_made_run(tmp_path / "ok", packed_dir, 512)

    incomplete = checkpoint.parent / "step-9"
    shutil.copytree(checkpoint, incomplete)
    (incomplete / "COMPLETE").unlink()
    with pytest.raises(me.EvalInputError, match="not a complete checkpoint: no COMPLETE marker"):
        me.resolve_inputs(incomplete)
    assert "not a complete checkpoint" in one_line_error(["--checkpoint", str(incomplete)], capsys)

    gone = tmp_path / "versions" / "0123456789abcdef"
    shutil.copytree(packed_dir, gone)
    stale = hand_made_run(tmp_path / "stale", gone, 512)
    shutil.rmtree(gone)  # the data version the run pinned was deleted since
    with pytest.raises(me.EvalInputError, match=r"run's data version .*0123456789abcdef no longer exists"):
        me.resolve_inputs(stale)
    assert "no longer exists" in one_line_error(["--checkpoint", str(stale)], capsys)

    wrong_vocab = hand_made_run(tmp_path / "vocab", packed_dir, 640)
    with pytest.raises(me.EvalInputError, match="vocabulary mismatch: step-5 has 640 token embeddings"):
        me.resolve_inputs(wrong_vocab)
    assert "vocabulary mismatch" in one_line_error(["--checkpoint", str(wrong_vocab)], capsys)
    with pytest.raises(me.EvalInputError, match="vocabulary mismatch"):
        me.resolve_inputs(wrong_vocab, data_dir=packed_dir)  # also against data given explicitly
    assert me.resolve_inputs(checkpoint).step == 5
