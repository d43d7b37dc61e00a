"""Parallelism applied to a plain ``Transformer`` from the outside (torchtitan style).

Order matters: float8 linears replace the blocks' ``nn.Linear`` (``model/float8.py``), activation
checkpointing wraps each block (or every k-th), ``torch.compile`` compiles each block (one small graph
compiled once and reused, instead of one huge graph), then FSDP2 ``fully_shard`` shards each block and
finally the root (embeddings, final norm, output head).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from model.float8 import convert_to_float8, has_float8_tensor_cores
from model.model import Transformer


def prefer_attention_kernel(name: str) -> None:
    """Put one SDPA kernel first for the whole process ("default": PyTorch's own order).

    cuDNN's fused attention is a few percent faster than flash attention 2 on H100 at head dim 128;
    a kernel that cannot take a call (e.g. GQA, dropout) falls through to the next in the list.
    """
    if name == "default":
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[name]
    order = [first, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    sdpa_kernel(list(dict.fromkeys(order)), set_priority=True).__enter__()  # process-wide on purpose


ReshardPolicy = Literal["auto", "always", "never"]


def resolve_reshard(policy: ReshardPolicy, model: Transformer, mesh: DeviceMesh) -> bool:
    """Whether blocks free their gathered weights after forward (and gather them again for backward).

    "auto": keep them when there is one rank (nothing to gather) or when the whole model's bf16 weights
    take at most 1/16 of the GPU's memory (e.g. 1B on an 80 GB card): one all-gather per block instead
    of two, a third less traffic, for a few GiB. Bigger models (7B+) reshard, as ZeRO-3 does.
    """
    if policy != "auto":
        return policy == "always"
    if mesh.size() == 1:
        return False
    if mesh.device_type != "cuda":
        return True
    gathered_bytes = 2 * model.num_params()
    return gathered_bytes > torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 16


def parallelize(
    model: Transformer,
    mesh: DeviceMesh,
    *,
    mixed_precision: bool,
    activation_checkpointing: bool | int = False,
    compile: bool = False,
    reshard_after_forward: ReshardPolicy = "auto",
    prefetch: int = 1,
    float8: bool = False,
) -> Transformer:
    """Shard ``model`` over ``mesh`` with FSDP2, in place; returns it for chaining.

    ``mixed_precision``: parameters are gathered and computed in bf16 while the sharded master
    weights, the optimizer and the gradient reduce-scatter stay fp32 (summing bf16 gradients across
    many ranks loses precision). Off on CPU, where everything is fp32.
    ``prefetch``: how many blocks ahead (forward) or behind (backward) are gathered while a block
    computes; 1 is FSDP2's own default, more hides slow links at the cost of memory.
    ``activation_checkpointing``: recompute the activations of every k-th block in backward (True or 1:
    every block; 2: every second one, which keeps half the blocks' activations for less recompute).
    ``float8``: the blocks' linears compute in float8 (``model/float8.py``); emulated where the
    device has no float8 tensor cores.
    """
    if float8:
        convert_to_float8(model, emulate=not has_float8_tensor_cores(mesh.device_type))
    reshard = resolve_reshard(reshard_after_forward, model, mesh)
    every = int(activation_checkpointing)
    for name, block in list(model.layers.items()):
        if every and int(name) % every == 0:
            block = checkpoint_wrapper(block, preserve_rng_state=False)
        if compile:
            block.compile(fullgraph=True)  # in place: parameter names stay unchanged
        model.layers[name] = block
    if compile:
        # The head's fp32 logits are the largest activation; compiled, the cast fuses into the loss.
        model.head = torch.compile(model.head, fullgraph=True)  # type: ignore[method-assign]

    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision
        else None
    )
    fsdp_kwargs: dict = {"mesh": mesh}
    if mp is not None:
        fsdp_kwargs["mp_policy"] = mp
    blocks: list[nn.Module] = list(model.layers.values())
    for i, block in enumerate(blocks):
        # The last block's weights are needed again at once by backward: never free them.
        fully_shard(block, reshard_after_forward=reshard and i < len(blocks) - 1, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    if prefetch > 1:
        for i, block in enumerate(blocks):
            block.set_modules_to_forward_prefetch(blocks[i + 1 : i + 1 + prefetch])
            block.set_modules_to_backward_prefetch(blocks[max(0, i - prefetch) : i][::-1])
    return model
