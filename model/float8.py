"""float8 training: the blocks' linear layers compute in float8 on Hopper (and newer) tensor cores.

torchao's ``Float8Linear`` with dynamic tensorwise scaling: before each matrix product the input and
the weight are cast to float8 e4m3 (the output gradient to e5m2, which has the range gradients need),
each with one scale per tensor taken from its current absolute maximum; ``torch._scaled_mm`` multiplies
them on the float8 tensor cores with fp32 accumulation and returns bf16. Master weights, optimizer
state, gradient reduction and everything outside those linears (embeddings, norms, attention scores,
the output head and the loss) keep their precision. Applied from the outside, like parallelism
(``model/parallelize.py`` calls ``convert_to_float8`` before compiling and sharding), so ``model.py``
stays plain PyTorch and checkpoints keep their parameter names: a run can switch float8 on or off
on resume.

Not converted: the output head (float8 logits cost loss; torchtitan leaves it out too), the embedding
(a lookup, no matrix product) and any linear whose two dimensions are not multiples of 16 (the
float8 kernels' layout rule). Without float8 tensor cores (CPU, GPUs before compute capability 8.9)
the casts are emulated: same rounding, products in higher precision, no speed-up.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

TORCHAO_HINT = "float8 training needs torchao (pip install 'torchao==0.17.0')"


def has_float8_tensor_cores(device: torch.device | str) -> bool:
    """True on CUDA devices of compute capability 8.9 or newer (Ada, Hopper, Blackwell)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def is_float8_candidate(module: nn.Module, name: str) -> bool:
    """A linear layer inside a transformer block with both dimensions divisible by 16."""
    return (
        isinstance(module, nn.Linear)
        and name.startswith("layers.")
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def convert_to_float8(model: nn.Module, *, emulate: bool) -> list[str]:
    """Replace the candidate linears of ``model`` by float8 ones, in place (meta tensors are fine).

    Returns the names of the converted modules. ``emulate``: cast to float8 but multiply in higher
    precision (for devices without float8 tensor cores; numerics only).
    """
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as exc:
        raise ImportError(TORCHAO_HINT) from exc
    if emulate:
        warnings.warn(
            "float8: no float8 tensor cores here; emulating the casts (same rounding, no speed-up)",
            stacklevel=2,
        )
    names = [name for name, module in model.named_modules() if is_float8_candidate(module, name)]
    config = Float8LinearConfig.from_recipe_name("tensorwise")
    if emulate:
        config = dataclasses.replace(config, emulate=True)
    convert_to_float8_training(model, module_filter_fn=is_float8_candidate, config=config)
    return names
