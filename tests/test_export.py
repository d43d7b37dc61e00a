"""Hugging Face export: a checkpoint of a real training run (torchrun, tiny preset, CPU) written by
``pretrain export`` and loaded by transformers as ``LlamaForCausalLM``. Its logits equal ours (fp32,
max abs difference below TOLERANCE), its fast tokenizer gives our token ids on multilingual corpus
text, lm-evaluation-harness runs a local multiple-choice task on it offline with our log-likelihoods,
and the folder attaches to a registered model version in a real MLflow store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from mlflow.tracking import MlflowClient
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from flows.cli import main
from model.checkpoint import COMPLETE
from model.data import open_shards, read_packing_info
from model.evaluate import load_model, resolve_inputs
from model.export import EXPORT_INFO, export_checkpoint
from model.model import Transformer
from tasks import pack
from tasks import tokenizer as tk
from tasks.run_tracking import TrainingData, register_checkpoint
from tests.test_tokenizer import SMALL, build_lid_dataset
from tests.test_trainer import config, train

pytestmark = pytest.mark.slow

TOLERANCE = 1e-4  # fp32 on CPU: the same operations in the same order give (near) bitwise-equal logits


@pytest.fixture(scope="module")
def packed(corpus: Path, tmp_path_factory) -> Path:
    docs = build_lid_dataset(corpus, tmp_path_factory.mktemp("docs"), limit=600, shards=2)
    tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
    tk.train_tokenizer([docs], tokenizer_dir, SMALL)
    out = tmp_path_factory.mktemp("packed")
    pack.pack_datasets([docs], tokenizer_dir, out, pack.PackConfig(seq_len=64, validation_fraction=0.05))
    return out


@pytest.fixture(scope="module")
def checkpoint(packed: Path, tmp_path_factory) -> Path:
    """step-8 of a real 2-rank FSDP run (tied embeddings, grouped-query attention)."""
    run_dir = tmp_path_factory.mktemp("run")
    run = train(config(packed, run_dir, max_steps=8, checkpoint_interval=8), run_dir)
    assert run.returncode == 0, "\n".join(run.lines[-40:])
    return run_dir / "checkpoints" / "step-8"


@pytest.fixture(scope="module")
def exported(checkpoint: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "model"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    return out


def ours(checkpoint: Path) -> Transformer:
    return load_model(resolve_inputs(checkpoint), torch.device("cpu"))


def validation_tokens(packed: Path, n: int = 4) -> torch.Tensor:
    return torch.from_numpy(np.asarray(open_shards(packed, "validation")[0][:n, :-1], dtype=np.int64))


def max_logit_diff(model: Transformer, hf_dir: Path, tokens: torch.Tensor, attn: str) -> float:
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation=attn)
    assert isinstance(theirs, LlamaForCausalLM)
    with torch.no_grad():
        return (model(tokens) - theirs(tokens).logits).abs().max().item()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_transformers_logits_equal_ours(checkpoint, exported, packed, attn):
    tokens = validation_tokens(packed)
    assert max_logit_diff(ours(checkpoint), exported, tokens, attn) < TOLERANCE
    info = json.loads((exported / EXPORT_INFO).read_text())
    assert info["step"] == 8 and info["weights"] == ["model.safetensors"]
    assert json.loads((exported / "config.json").read_text())["tie_word_embeddings"] is True


def test_greedy_generation_equals_ours(checkpoint, exported, packed):
    """The KV-cache path of transformers continues a prompt exactly as our full recompute does."""
    model = ours(checkpoint)
    prompt = validation_tokens(packed, 1)[:, :16]
    theirs = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    generated = theirs.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    tokens = prompt
    with torch.no_grad():
        for _ in range(12):
            tokens = torch.cat([tokens, model(tokens)[:, -1:].argmax(-1)], dim=1)
    assert generated.tolist() == tokens.tolist()


def test_untied_head_and_sharded_weights(packed, tmp_path):
    """A 7B-style untied output head, one kv head, non-unit norms, weights split over several files."""
    run_dir = tmp_path / "run"
    cfg = config(packed, run_dir, model_overrides={"tie_embeddings": False, "n_kv_heads": 1})
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps(cfg))
    inputs_info = read_packing_info(packed)
    from model.config import TrainConfig

    model = Transformer(
        TrainConfig.model_validate(cfg).model_config_for(inputs_info["vocab_size"], inputs_info["seq_len"])
    )
    model.init_weights(seed=1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    ckpt = run_dir / "checkpoints" / "step-3"
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=ckpt, no_dist=True)
    (ckpt / COMPLETE).write_text(json.dumps({"step": 3, "world_size": 1}))

    out = export_checkpoint(ckpt, tmp_path / "hf", max_shard_bytes=64 * 1024)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and "lm_head.weight" in index["weight_map"]
    assert max_logit_diff(ours(ckpt), out, validation_tokens(packed), "sdpa") < TOLERANCE


def multilingual_texts(corpus: Path, per_lang: int = 3) -> list[str]:
    by_lang: dict[str, list[str]] = {}
    for line in (corpus / "lid-dev.jsonl").read_text(encoding="utf-8").splitlines():
        doc = json.loads(line)
        if len(by_lang.setdefault(doc["lang"], [])) < per_lang:
            by_lang[doc["lang"]].append(doc["text"])
    assert {"zh", "ja", "ko", "ru", "el", "de"} <= set(by_lang), sorted(by_lang)
    return [text for texts in by_lang.values() for text in texts]


def test_fast_tokenizer_gives_our_ids(exported, checkpoint, corpus):
    info = resolve_inputs(checkpoint).info
    reference = tk.load_tokenizer(info["tokenizer"])
    hf = AutoTokenizer.from_pretrained(exported)
    assert hf.is_fast
    assert (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id) == (
        info["eot_id"],
        info["eot_id"],
        info["pad_id"],
    )
    texts = [
        *multilingual_texts(corpus),
        f"a page that quotes {tk.EOT} and {tk.PAD} as text",  # plain text, as in training
        "  two leading spaces,\ttabs\n\nand blank lines ",
        "e\u0301 decomposed and é composed, emoji 🙂, 中文と日本語と한국어",
    ]
    expected = [e.ids for e in reference.encode_batch(texts, add_special_tokens=False)]
    assert hf(texts)["input_ids"] == expected
    assert [hf.encode(t) for t in texts] == expected
    assert all(
        hf.decode(ids) == unicodedata.normalize("NFC", t) for ids, t in zip(expected, texts, strict=True)
    )


def test_export_refuses_bad_input_with_one_line(checkpoint, exported, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "not a complete checkpoint" in err and len(err.strip().splitlines()) == 1
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(exported)]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert not list(exported.parent.glob(".*.tmp"))  # no temporary folder left behind


# -- lm-evaluation-harness ---------------------------------------------------------------------------

TASK_YAML = """\
task: corpus_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def loglikelihood(model: Transformer, tokenizer, context: str, continuation: str) -> float:
    """As lm-evaluation-harness scores a choice: trailing context spaces move to the continuation,
    the continuation's tokens are those of the whole text after as many as the context has, and the
    model reads the context's tokens followed by them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tokenizer.encode(context, add_special_tokens=False).ids
    whole = tokenizer.encode(context + continuation, add_special_tokens=False).ids
    target = torch.tensor(whole[len(context_ids) :])
    with torch.no_grad():
        logits = model(torch.tensor([context_ids + target.tolist()[:-1]]))[0, len(context_ids) - 1 :]
    return logits.log_softmax(-1).gather(1, target[:, None]).sum().item()


def test_lm_eval_harness_runs_a_local_task_offline(exported, checkpoint, corpus, tmp_path):
    texts = [t for t in multilingual_texts(corpus, per_lang=1) if len(t) > 120][:8]
    docs = [
        {"context": t[:60], "choices": [t[60:100], texts[(i + 1) % len(texts)][60:100]], "label": 0}
        for i, t in enumerate(texts)
    ]
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    data = task_dir / "corpus_mc.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    (task_dir / "corpus_mc.yaml").write_text(TASK_YAML.format(data=data))
    out = tmp_path / "results"
    # The command the README documents, with nothing reachable but local files.
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf"]
    cmd += ["--model_args", f"pretrained={exported},dtype=float32", "--tasks", "corpus_mc"]
    cmd += ["--include_path", str(task_dir), "--device", "cpu", "--batch_size", "4"]
    cmd += ["--output_path", str(out), "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["corpus_mc"]
    samples = [
        json.loads(line) for line in next(out.rglob("samples_corpus_mc_*.jsonl")).read_text().splitlines()
    ]
    assert len(samples) == len(docs)
    model, tokenizer = ours(checkpoint), tk.load_tokenizer(exported / "tokenizer.json")
    correct = 0
    for sample in samples:
        doc = sample["doc"]
        mine = [loglikelihood(model, tokenizer, doc["context"], choice) for choice in doc["choices"]]
        harness = [float(r[0][0]) for r in sample["resps"]]
        assert np.allclose(harness, mine, atol=1e-3), (harness, mine)
        correct += int(np.argmax(mine) == doc["label"])
    assert results["acc,none"] == pytest.approx(correct / len(docs))


# -- MLflow ---------------------------------------------------------------------------------------------


def test_export_attaches_to_the_registered_version(checkpoint, packed, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("pretrain", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment, run_name="export-test").info.run_id
    data = TrainingData.of(packed)
    for step, bpb, final in ((4, 3.0, False), (8, 2.5, True)):
        register_checkpoint(
            client, run_id, step, checkpoint, {"val/bpb": bpb},
            data=data, data_refresh_run_id=None, model_name="tiny", final=final,
        )  # fmt: skip
    out = tmp_path / "hf"
    cli = ["export", "--checkpoint", str(checkpoint), "--out", str(out), "--tracking-uri", uri]
    assert main([*cli, "--model-name", "tiny", "--model-version", "best"]) == 0
    version = client.get_model_version_by_alias("tiny", "best")
    assert version.tags["hf_export"] == "hf"

    # what the registered version serves (its download URI, through this client's registry)
    source = client.get_model_version_download_uri("tiny", version.version)
    downloaded = Path(
        mlflow.artifacts.download_artifacts(artifact_uri=f"{source}/hf", dst_path=str(tmp_path / "download"))
    )
    tokens = validation_tokens(packed)
    assert max_logit_diff(ours(checkpoint), downloaded, tokens, "sdpa") < TOLERANCE

    # version 1 is step 4: an export of step 8 is refused, not attached
    assert (
        main([*cli[:4], str(tmp_path / "hf2"), *cli[5:], "--model-name", "tiny", "--model-version", "1"]) == 2
    )
    assert "hf_export" not in client.get_model_version("tiny", "1").tags
