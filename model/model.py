"""A decoder-only transformer in the modern (Llama) style, in one file.

RoPE positions, RMSNorm before each sub-layer, SwiGLU feed-forward, grouped-query attention through
``F.scaled_dot_product_attention`` (flash / cuDNN kernels on GPU), optional tied input/output
embeddings. No parallelism lives here: FSDP, activation checkpointing and ``torch.compile`` are applied
from the outside by ``model/parallelize.py`` (torchtitan style), so this file stays plain PyTorch.

Size presets (parameter counts for a 32,768-token vocabulary; the trainer takes the vocabulary size from
the packed data). Every width is a multiple of 128 and every head is 128 wide (but tiny's): the shapes
the H100 tensor cores and flash attention like.

| preset | dim  | layers | heads | kv heads | ffn hidden | tied | params |
|--------|------|--------|-------|----------|------------|------|--------|
| tiny   | 64   | 2      | 4     | 2        | 192        | yes  | 0.1M + vocab·64 (CPU tests) |
| 125M   | 768  | 12     | 6     | 6        | 2048       | yes  | 110M   |
| 350M   | 1024 | 24     | 8     | 8        | 2816       | yes  | 342M   |
| 1B     | 2048 | 16     | 16    | 8        | 8192       | yes  | 1.07B  |
| 7B     | 4096 | 32     | 32    | 8        | 14336      | no   | 7.25B  |

Initialisation: every weight is a truncated normal (±3σ) with σ = 0.02, the projections that write
into the residual stream (``wo``, ``w2``) with σ = 0.02 / √(2·layers) (GPT-2), so the residual
stream's variance does not grow with depth; an untied output head uses σ = dim^-½ so the first
logits are O(1). Norm weights start at one. ``init_weights`` can run after the parameters were
materialised from the meta device (and sharded), so large models are never built whole on one host.

Incremental decoding (samples, ``model/generate.py``): ``Transformer.forward_cached(tokens, cache)``
runs only the new tokens against a ``KVCache`` of the keys and values of the positions before them;
one new token per row goes through ``decode_step``, whose shapes never change (a CUDA graph replays it).
Training never passes a cache: its forward is the plain causal one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_hidden: int = 192
    vocab_size: int = 32768
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError("head dim must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=192, max_seq_len=512),
    "125M": ModelConfig(dim=768, n_layers=12, n_heads=6, n_kv_heads=6, ffn_hidden=2048),
    "350M": ModelConfig(dim=1024, n_layers=24, n_heads=8, n_kv_heads=8, ffn_hidden=2816),
    "1B": ModelConfig(dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, ffn_hidden=8192),
    "7B": ModelConfig(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=14336, tie_embeddings=False
    ),
}


def model_config(preset: str, **overrides: object) -> ModelConfig:
    """The preset's shapes with ``overrides`` (e.g. ``vocab_size``) replacing fields."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; known: {', '.join(PRESETS)}")
    return replace(PRESETS[preset], **overrides)


def rope_tables(cfg: ModelConfig, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, [max_seq_len, head_dim], in fp32."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, half, device=device, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head of x [B, H, T, D] by the position's angles (GPT-NeoX layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).type_as(x)


def trunc_normal_(weight: torch.Tensor, std: float, generator: torch.Generator) -> None:
    """Truncated normal (±3σ) in place. A sharded weight (FSDP's DTensor) gets its slice of the full
    tensor drawn on every rank alike, so the initial model does not depend on the number of ranks."""
    if isinstance(weight, DTensor):
        full = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        nn.init.trunc_normal_(full, std=std, a=-3 * std, b=3 * std, generator=generator)
        weight.copy_(distribute_tensor(full, weight.device_mesh, weight.placements, src_data_rank=None))
    else:
        nn.init.trunc_normal_(weight, std=std, a=-3 * std, b=3 * std, generator=generator)


class KVCache:
    """Keys and values of the positions decoded so far, for ``Transformer.forward_cached``.

    One preallocated buffer per layer, [batch, kv heads, max_len, head dim], made on first use with
    the dtype and device of the keys. ``pos`` counts the positions already in the cache; ``position``
    holds the one ``decode_step`` writes, on the device, so the step reads no Python number.
    ``key_valid`` [batch, max_len] (optional) is False at padding slots: rows of different lengths
    left-padded to one width, which no query attends to. RoPE sees only relative positions, so a
    left-padded row gives what it gives alone.
    """

    def __init__(self, n_layers: int, max_len: int, key_valid: torch.Tensor | None = None) -> None:
        self.max_len = max_len
        self.pos = 0
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.position: torch.Tensor | None = None
        self.key_valid = key_valid

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' k, v [B, H, T, D] at ``pos``; return all keys and values so far."""
        if self.keys[layer] is None:
            B, H, _, D = k.shape
            # Zeros, not empty: decode_step attends over the whole buffer with the unwritten slots
            # masked, and a NaN there would still reach the weighted sum (0 x NaN).
            self.keys[layer] = k.new_zeros(B, H, self.max_len, D)
            self.values[layer] = v.new_zeros(B, H, self.max_len, D)
            self.position = torch.zeros(1, dtype=torch.long, device=k.device)
        end = self.pos + k.shape[2]
        self.keys[layer][:, :, self.pos : end] = k
        self.values[layer][:, :, self.pos : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def write_step(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one position's k, v [B, H, 1, D] at ``position``; return the whole buffers."""
        self.keys[layer].index_copy_(2, self.position, k)
        self.values[layer].index_copy_(2, self.position, v)
        return self.keys[layer], self.values[layer]

    def visible(self) -> torch.Tensor:
        """[1 or B, 1, 1, max_len]: the slots a query at ``position`` attends to (itself and before)."""
        slots = torch.arange(self.max_len, device=self.position.device)
        seen = (slots <= self.position).view(1, 1, 1, -1)
        return seen if self.key_valid is None else seen & self.key_valid[:, None, None, :]

    def chunk_mask(self, T: int, device: torch.device) -> torch.Tensor | None:
        """[1 or B, 1, T, pos + T]: the keys each of T new queries after ``pos`` positions attends to
        (every earlier slot and, causally, each other; never a padding slot, but each query its own
        slot, so a padding query has a key); None when that is plain causal attention."""
        start = self.pos
        if not start and self.key_valid is None:
            return None
        queries = torch.arange(T, device=device)[:, None] + start
        keys = torch.arange(start + T, device=device)[None, :]
        mask = keys <= queries
        if self.key_valid is None:
            return mask
        return (mask & self.key_valid[:, None, None, : start + T]) | (keys == queries)

    def rows(self, rows: torch.Tensor) -> KVCache:
        """A cache of the rows ``rows`` of this one (ids, repeats allowed): e.g. one context per continuation."""
        valid = None if self.key_valid is None else self.key_valid.index_select(0, rows)
        picked = KVCache(len(self.keys), self.max_len, valid)
        picked.pos, picked.position = self.pos, self.position
        picked.keys = [None if k is None else k.index_select(0, rows) for k in self.keys]
        picked.values = [None if v is None else v.index_select(0, rows) for v in self.values]
        return picked


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: tuple[KVCache, int] | None = None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        causal, mask = True, None
        if cache is not None:
            kv_cache, layer = cache
            start = kv_cache.pos
            if start and T == 1:  # decode_step: fixed shapes, the unwritten slots masked
                k, v = kv_cache.write_step(layer, k, v)
                causal, mask = False, kv_cache.visible()
            else:
                # On an empty cache without padding this is the training path's attention.
                mask = kv_cache.chunk_mask(T, x.device)
                causal = mask is None
                cached_k, cached_v = kv_cache.append(layer, k, v)
                if start:
                    k, v = cached_k, cached_v
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: tuple[KVCache, int] | None = None
    ) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        # A ModuleDict keyed by index keeps parameter names stable whatever wraps a block.
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Not persistent: recomputed from the config, never stored in checkpoints.
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """(Re)initialise every parameter and buffer in place; works on sharded (DTensor) parameters.

        Draws from its own generator: the result depends on ``seed`` only, not on the global RNG.
        """
        cfg = self.cfg
        gen = torch.Generator(device=self.rope_cos.device).manual_seed(seed)
        cos, sin = rope_tables(cfg, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        std, residual_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
        trunc_normal_(self.tok_embeddings.weight, std, gen)
        for block in self.layers.values():
            attn, ffn = block.attention, block.feed_forward
            for linear in (attn.wq, attn.wk, attn.wv, ffn.w1, ffn.w3):
                trunc_normal_(linear.weight, std, gen)
            for linear in (attn.wo, ffn.w2):
                trunc_normal_(linear.weight, residual_std, gen)
            nn.init.ones_(block.attention_norm.weight)
            nn.init.ones_(block.ffn_norm.weight)
        nn.init.ones_(self.norm.weight)
        if not cfg.tie_embeddings:
            trunc_normal_(self.output.weight, cfg.dim**-0.5, gen)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] or, given targets, the mean next-token cross-entropy (fp32 scalar)."""
        seq_len = tokens.shape[1]
        if seq_len > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_seq_len {self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:seq_len], self.rope_sin[:seq_len]
        h = self.tok_embeddings(tokens)
        for block in self.layers.values():
            h = block(h, cos, sin)
        return self.head(h, targets)

    @torch.no_grad()
    def forward_cached(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [B, T, vocab] of ``tokens`` that follow the ``cache.pos`` positions already in ``cache``.

        Appends the tokens' keys and values to the cache. On an empty cache this is ``forward(tokens)``
        (the same kernels, the same logits); then one token at a time makes decoding linear in length.
        """
        return self.head(self.hidden_cached(tokens, cache))

    @torch.no_grad()
    def hidden_cached(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """``forward_cached`` before the ``head``: the final hidden states [B, T, dim], so a caller that
        needs the logits of a few positions (a prefill's last, a continuation's) computes only those."""
        start, T = cache.pos, tokens.shape[1]
        if start + T > min(cache.max_len, self.cfg.max_seq_len):
            raise ValueError(f"{start + T} positions exceed the cache ({cache.max_len}) or max_seq_len")
        if start and T == 1:
            cache.position.fill_(start)
        h = self._cached_blocks(tokens, cache)
        cache.pos += T
        return h

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [B, 1, vocab] of one token per row [B, 1] at ``cache.position`` (after a prefill).

        Writes their keys and values there and attends over the whole cache, masked: every shape and
        every address is the same at each position, so one capture of this step as a CUDA graph serves
        the whole continuation. The caller sets ``cache.position`` and advances ``cache.pos``.
        """
        return self.head(self._cached_blocks(tokens, cache))

    def _cached_blocks(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        start, T = cache.pos, tokens.shape[1]
        if start and T == 1:  # one position after a prefill: its angles read on the device (decode_step)
            cos, sin = (
                self.rope_cos.index_select(0, cache.position),
                self.rope_sin.index_select(0, cache.position),
            )
        else:
            cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        h = self.tok_embeddings(tokens)
        for layer, block in enumerate(self.layers.values()):
            h = block(h, cos, sin, (cache, layer))
        return h

    def head(self, h: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm and output projection; with targets, the loss (a unit of its own, compiled apart)."""
        logits = self.output(self.norm(h))
        if targets is None:
            return logits
        # fp32 softmax: bf16 log-probabilities lose the precision the loss needs.
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, PaLM appendix B: 6·N + 12·L·d·T.

        N counts the weights that take part in matrix products: every parameter except the embedding
        table (a lookup), plus the output head, which is the same tensor when tied.
        """
        cfg = self.cfg
        n_matmul = self.num_params() - self.tok_embeddings.weight.numel()
        if cfg.tie_embeddings:
            n_matmul += self.output.weight.numel()
        return 6 * n_matmul + 12 * cfg.n_layers * cfg.dim * seq_len
