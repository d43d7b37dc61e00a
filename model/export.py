"""A checkpoint out to Hugging Face: a folder ``transformers`` loads as ``LlamaForCausalLM``.

Our Transformer is the Llama architecture, so the export is a renaming of weights, no arithmetic:

- RoPE: ``apply_rope`` rotates the two halves of each head (GPT-NeoX layout), with inverse frequencies
  ``theta^(-i/half)``: exactly what HF's ``rotate_half`` does, so q/k need no permutation (that is
  only needed for weights in Meta's interleaved layout).
- RMSNorm (``norm_eps``), SwiGLU (w1 = gate, w3 = up, w2 = down), no biases anywhere, grouped-query
  attention with ``head_dim = dim / n_heads``, tied or untied output head.

The folder holds ``config.json``, ``generation_config.json``, the weights as safetensors (sharded with
an index above ``max_shard_bytes``), the packed data's tokenizer as a fast tokenizer
(``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``) and ``pretrain_export.json``
(what it was made from). Our end-of-text token is also BOS: every document follows one in training.
``split_special_tokens`` is set because training encoded special-token strings in page text as plain
text (tasks/tokenizer.py), so the exported tokenizer gives the same ids on any text.

The checkpoint is read as the evals read it (``model/evaluate.py``: one process, no process group,
DCP reshards). No transformers here and no tasks/: the test loads the result with transformers and
compares the logits with ours.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from model.evaluate import load_model, resolve_inputs
from model.model import ModelConfig, Transformer
from model.run_dir import RunDir

EXPORT_INFO = "pretrain_export.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_SHARD_BYTES = 5 * 1024**3  # the size transformers' save_pretrained shards at


def hf_state_dict(model: Transformer, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our parameters under LlamaForCausalLM's names (contiguous, ``dtype``); a tied head is stored once."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not model.cfg.tie_embeddings:
        names["output.weight"] = "lm_head.weight"
    per_layer = {
        "attention.wq": "self_attn.q_proj",
        "attention.wk": "self_attn.k_proj",
        "attention.wv": "self_attn.v_proj",
        "attention.wo": "self_attn.o_proj",
        "feed_forward.w1": "mlp.gate_proj",
        "feed_forward.w3": "mlp.up_proj",
        "feed_forward.w2": "mlp.down_proj",
        "attention_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    for i in model.layers:
        for ours, theirs in per_layer.items():
            names[f"layers.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    params = dict(model.named_parameters())  # a tied head appears once, as tok_embeddings
    unmapped = set(params) - set(names)
    if unmapped:
        raise ValueError(f"parameters without a Llama name: {sorted(unmapped)}")
    return {theirs: params[ours].detach().to(dtype).contiguous() for ours, theirs in names.items()}


def hf_config(cfg: ModelConfig, info: dict[str, Any], dtype: str) -> dict[str, Any]:
    """``config.json`` of LlamaForCausalLM with our shapes and special ids."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": info["eot_id"],
        "eos_token_id": info["eot_id"],
        "pad_token_id": info["pad_id"],
        "torch_dtype": dtype,
        "use_cache": True,
    }


def tokenizer_files(tokenizer: Tokenizer, info: dict[str, Any], max_len: int) -> dict[str, Any]:
    """``tokenizer_config.json`` and ``special_tokens_map.json`` for our tokenizer.json."""
    eot, pad = tokenizer.id_to_token(info["eot_id"]), tokenizer.id_to_token(info["pad_id"])
    if eot is None or pad is None:
        raise ValueError(f"the tokenizer has no token with id {info['eot_id']} or {info['pad_id']}")
    special = {"bos_token": eot, "eos_token": eot, "pad_token": pad}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": max_len,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def save_safetensors(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> list[str]:
    """``model.safetensors``, or shards + ``model.safetensors.index.json`` (HF's layout) above the limit."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return ["model.safetensors"]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, shard in zip(files, shards, strict=True):
        save_file(shard, out / file, metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    weight_map = {name: file for file, shard in zip(files, shards, strict=True) for name in shard}
    _write_json(
        out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
    )
    return files


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    data_dir: str | Path | None = None,
    dtype: str = "float32",
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write the Hugging Face folder of ``checkpoint`` to ``out`` (which must not exist or be empty).

    Written into a temporary sibling and renamed: a killed export leaves no half folder at ``out``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; one of: {', '.join(DTYPES)}")
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory; remove it or pick another --out")
    inputs = resolve_inputs(checkpoint, data_dir)  # one-line errors for a bad checkpoint or data
    model, info = load_model(inputs, torch.device("cpu")), inputs.info
    cfg = model.cfg
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        weights = save_safetensors(hf_state_dict(model, DTYPES[dtype]), tmp, max_shard_bytes)
        _write_json(tmp / "config.json", hf_config(cfg, info, dtype))
        _write_json(
            tmp / "generation_config.json",
            {"bos_token_id": info["eot_id"], "eos_token_id": info["eot_id"], "pad_token_id": info["pad_id"]},
        )
        shutil.copyfile(info["tokenizer"], tmp / "tokenizer.json")
        for name, content in tokenizer_files(inputs.tokenizer, info, cfg.max_seq_len).items():
            _write_json(tmp / name, content)
        _write_json(
            tmp / EXPORT_INFO,
            {
                "checkpoint": str(inputs.checkpoint),
                "step": inputs.step,
                "run": RunDir.of_checkpoint(inputs.checkpoint).name,
                "data_dir": str(inputs.data_dir),
                "tokenizer_sha256": info["tokenizer_sha256"],
                "dtype": dtype,
                "weights": weights,
            },
        )
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the export is meant to be shared
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
