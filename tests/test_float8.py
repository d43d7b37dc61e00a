"""float8 training wiring on CPU (torchao's emulated casts): which linears are converted, that a
converted model trains like the original, that parallelize applies it and checkpoints keep their
names, and the config field. Speed is measured on GPUs only (benchmarks/RESULTS.md)."""

from __future__ import annotations

import sys

import pytest
import torch
from pydantic import ValidationError

from model.config import OptimConfig, TrainConfig
from model.float8 import TORCHAO_HINT, convert_to_float8, has_float8_tensor_cores
from model.model import Transformer, model_config
from model.trainer import build_model, build_optimizer, train_step
from tests.test_model import one_rank_group  # noqa: F401  (the fixture)

pytestmark = pytest.mark.filterwarnings("ignore:float8. no float8 tensor cores")
VOCAB = 256


def tiny(**overrides) -> Transformer:
    model = Transformer(model_config("tiny", vocab_size=VOCAB, **overrides))
    model.init_weights(seed=0)
    return model


def linear_kinds(model: torch.nn.Module) -> dict[str, str]:
    return {
        name: type(module).__name__
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def test_block_linears_are_converted_but_not_the_head():
    model = tiny(tie_embeddings=False)
    names = convert_to_float8(model, emulate=True)
    kinds = linear_kinds(model)
    assert kinds.pop("output") == "Linear"
    assert set(kinds.values()) == {"Float8Linear"}
    assert sorted(names) == sorted(kinds)
    assert len(names) == 2 * 7  # wq wk wv wo w1 w2 w3 in each of the two blocks
    assert type(model.tok_embeddings) is torch.nn.Embedding


def test_linears_whose_dims_are_not_multiples_of_16_stay():
    model = tiny(ffn_hidden=200)  # 200 % 16 == 8: the feed-forward stays, attention converts
    convert_to_float8(model, emulate=True)
    kinds = linear_kinds(model)
    for name, kind in kinds.items():
        expected = "Float8Linear" if ".attention." in name else "Linear"
        assert kind == expected, name


def test_float8_model_trains_like_the_original():
    """Same weights: the emulated float8 loss is within float8 rounding of the fp32 one, the
    gradients point the same way, and the parameter names (checkpoint keys) are unchanged."""
    reference, converted = tiny(), tiny()
    convert_to_float8(converted, emulate=True)
    assert list(converted.state_dict()) == list(reference.state_dict())
    tokens = torch.randint(0, VOCAB, (4, 65), generator=torch.Generator().manual_seed(0))
    losses = []
    for model in (reference, converted):
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[1] - losses[0]) / losses[0] < 1e-2
    for (name, p_ref), p_f8 in zip(reference.named_parameters(), converted.parameters(), strict=True):
        cosine = torch.nn.functional.cosine_similarity(p_ref.grad.flatten(), p_f8.grad.flatten(), dim=0)
        assert cosine > 0.98, name
    # float8 rounding really happens: the block weights' gradients differ from fp32
    w1 = "layers.0.feed_forward.w1.weight"
    assert not torch.equal(reference.get_parameter(w1).grad, converted.get_parameter(w1).grad)


def test_parallelize_applies_float8_and_training_steps_run(one_rank_group):  # noqa: F811
    cfg = model_config("tiny", vocab_size=VOCAB)
    model = build_model(cfg, one_rank_group, torch.device("cpu"), seed=0, mixed_precision=False, float8=True)
    plain = build_model(cfg, one_rank_group, torch.device("cpu"), seed=0, mixed_precision=False)
    assert "Float8Linear" in set(linear_kinds(model).values())
    assert set(linear_kinds(plain).values()) == {"Linear"}
    assert list(model.state_dict()) == list(plain.state_dict())  # resume across precisions works
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=0))
    tokens = torch.randint(0, VOCAB, (4, 33), generator=torch.Generator().manual_seed(1))
    batch = [(tokens[:, :-1], tokens[:, 1:])]
    first, _, finite = train_step(model, optimizer, batch, grad_clip=1.0)
    for _ in range(5):
        last, _, _ = train_step(model, optimizer, batch, grad_clip=1.0)
    assert bool(finite) and last.item() < first.item()


def test_no_float8_tensor_cores_on_cpu():
    assert not has_float8_tensor_cores("cpu")


def test_missing_torchao_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(ImportError, match="torchao"):
        convert_to_float8(tiny(), emulate=True)
    assert "pip install" in TORCHAO_HINT


def test_config_float8_field(tmp_path):
    base = {"data_dir": str(tmp_path), "checkpoint_dir": str(tmp_path / "ckpt")}
    assert TrainConfig.model_validate(base).float8 is False
    assert TrainConfig.model_validate({**base, "float8": True}).float8 is True
    with pytest.raises(ValidationError):
        TrainConfig.model_validate({**base, "float8": "sometimes"})
