"""Unit tests of the model side: shapes and maths of the transformer, init, schedule, optimizer groups,
the device-side update skip, spike detection, checkpoint atomicity, config parsing, MFU peaks."""

from __future__ import annotations

import itertools
import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from model.checkpoint import COMPLETE, Checkpointer, complete_checkpoints, latest_checkpoint
from model.config import OptimConfig, TrainConfig, load_config
from model.health import SpikeDetector
from model.metrics import MetricsLogger, peak_bf16_flops
from model.model import Attention, Transformer, apply_rope, model_config, rope_tables
from model.parallelize import resolve_reshard
from model.trainer import build_model, build_optimizer, lr_at, train_step

VOCAB = 256


def tiny(**overrides) -> Transformer:
    model = Transformer(model_config("tiny", vocab_size=VOCAB, **overrides))
    model.init_weights(seed=0)
    return model


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """A one-rank gloo process group in this process (FSDP and DCP need one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)
    mesh = dist.device_mesh.init_device_mesh("cpu", (1,))
    yield mesh
    dist.destroy_process_group()


def sharded_tiny(mesh, seed: int = 0):
    """The tiny model through ``build_model`` (FSDP over ``mesh``, fp32) and its optimizer."""
    model = build_model(
        model_config("tiny", vocab_size=VOCAB), mesh, torch.device("cpu"), seed=seed, mixed_precision=False
    )
    return model, build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=0))


# -- model ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "low", "high"),
    [("125M", 100e6, 140e6), ("350M", 300e6, 380e6), ("1B", 0.95e9, 1.2e9), ("7B", 6.5e9, 7.5e9)],
)
def test_presets_have_the_documented_sizes_and_gpu_friendly_shapes(preset, low, high):
    cfg = model_config(preset, vocab_size=32768)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert low <= model.num_params() <= high
    assert cfg.head_dim == 128
    for width in (cfg.dim, cfg.ffn_hidden, cfg.n_kv_heads * cfg.head_dim):
        assert width % 128 == 0


def test_unknown_preset_and_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="unknown model preset"):
        model_config("13B")
    with pytest.raises(ValueError, match="n_kv_heads"):
        model_config("tiny", n_kv_heads=3)


def test_initial_loss_is_near_uniform_and_logits_shape():
    model = tiny()
    tokens = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    assert model(tokens).shape == (4, 32, VOCAB)
    loss = model(tokens[:, :-1], tokens[:, 1:])
    # A careful init predicts close to uniform: loss within a few percent of ln(V).
    assert abs(loss.item() - math.log(VOCAB)) < 0.05 * math.log(VOCAB)


def test_model_is_causal():
    model = tiny()
    tokens = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    changed = tokens.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % VOCAB
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_attention_matches_a_naive_gqa_reference():
    cfg = model_config("tiny", vocab_size=VOCAB)
    torch.manual_seed(3)
    attn = Attention(cfg)
    x = torch.randn(2, 12, cfg.dim)
    cos, sin = rope_tables(cfg)
    cos, sin = cos[:12], sin[:12]
    q = attn.wq(x).view(2, 12, cfg.n_heads, cfg.head_dim).transpose(1, 2)
    k = attn.wk(x).view(2, 12, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
    v = attn.wv(x).view(2, 12, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    group = cfg.n_heads // cfg.n_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(cfg.head_dim)
    scores = scores.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), float("-inf"))
    expected = attn.wo((F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(2, 12, -1))
    torch.testing.assert_close(attn(x, cos, sin), expected, rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    cfg = model_config("tiny", vocab_size=VOCAB)
    cos, sin = rope_tables(cfg)
    q, k = torch.randn(cfg.head_dim), torch.randn(cfg.head_dim)

    def score(i: int, j: int) -> float:
        qi = apply_rope(q.view(1, 1, 1, -1), cos[i], sin[i])
        kj = apply_rope(k.view(1, 1, 1, -1), cos[j], sin[j])
        return (qi * kj).sum().item()

    assert score(5, 2) == pytest.approx(score(40, 37), rel=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-2)


def test_init_is_seeded_scaled_and_tied():
    a, b, c = tiny(), tiny(), Transformer(model_config("tiny", vocab_size=VOCAB))
    c.init_weights(seed=1)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb), name
        if pa.ndim == 2:
            assert not torch.equal(pa, pc), name
    assert a.output.weight is a.tok_embeddings.weight
    residual = a.layers["0"].feed_forward.w2.weight
    assert residual.std().item() == pytest.approx(0.02 / math.sqrt(2 * a.cfg.n_layers), rel=0.15)
    assert a.layers["0"].attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.1)
    untied = tiny(tie_embeddings=False)
    assert untied.output.weight is not untied.tok_embeddings.weight
    assert untied.output.weight.std().item() == pytest.approx(untied.cfg.dim**-0.5, rel=0.1)


def test_flops_per_token_follows_palm_formula():
    model = tiny()
    cfg = model.cfg
    per_layer = 2 * cfg.dim * cfg.n_heads * cfg.head_dim + 2 * cfg.dim * cfg.n_kv_heads * cfg.head_dim
    per_layer += 3 * cfg.dim * cfg.ffn_hidden + 2 * cfg.dim  # + the two norms
    n = cfg.n_layers * per_layer + cfg.dim + VOCAB * cfg.dim  # final norm, output head (tied)
    assert model.flops_per_token(64) == 6 * n + 12 * cfg.n_layers * cfg.dim * 64


# -- schedule, optimizer, the skipped update --------------------------------------------------------


def test_lr_schedule_warms_up_linearly_then_decays_to_the_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg, max_steps=110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert all(x >= y for x, y in itertools.pairwise(lrs[10:]))
    assert lrs[60] == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(110, cfg, 110) == pytest.approx(0.1) and lr_at(500, cfg, 110) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices():
    groups = build_optimizer(tiny(), OptimConfig(weight_decay=0.1)).param_groups
    assert groups[0]["weight_decay"] == 0.1 and all(p.ndim == 2 for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 0.0 and all(p.ndim == 1 for p in groups[1]["params"])
    assert groups[0]["fused"]


def test_nonfinite_step_leaves_weights_and_optimizer_state_untouched(one_rank_group):
    model, opt = sharded_tiny(one_rank_group)
    batch = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(4))
    micro = [(batch[:, :-1], batch[:, 1:])]
    loss, norm, finite = train_step(model, opt, micro, grad_clip=1.0)
    assert finite.item() and math.isfinite(loss.item())

    def snapshot():
        weights = {n: p.detach().full_tensor().clone() for n, p in model.named_parameters()}
        states = {
            (i, k): (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
            for i, st in enumerate(opt.state.values())
            for k, v in st.items()
        }
        return weights, states

    before = snapshot()
    loss, norm, finite = train_step(model, opt, micro, grad_clip=1.0, loss_scale=float("nan"))
    assert not finite.item() and math.isnan(norm.item())
    after = snapshot()
    for part_before, part_after in zip(before, after, strict=True):
        for key, value in part_before.items():
            assert torch.equal(value, part_after[key]), key
    loss, norm, finite = train_step(model, opt, micro, grad_clip=1.0)  # and it trains on afterwards
    assert finite.item()
    assert not torch.equal(before[0]["norm.weight"], model.norm.weight.full_tensor())


def test_reshard_policy(one_rank_group):
    model = tiny()
    assert resolve_reshard("auto", model, one_rank_group) is False  # one rank: nothing to gather again
    assert resolve_reshard("always", model, one_rank_group) is True
    assert resolve_reshard("never", model, one_rank_group) is False


def test_clipping_folded_into_the_optimizer_equals_clipping_the_gradients(one_rank_group):
    batch = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(5))
    micro = [(batch[:, :-1], batch[:, 1:])]
    folded, folded_opt = sharded_tiny(one_rank_group)
    _, norm, _ = train_step(folded, folded_opt, micro, grad_clip=0.05)
    explicit, explicit_opt = sharded_tiny(one_rank_group)
    explicit(*micro[0]).backward()
    explicit_norm = torch.nn.utils.clip_grad_norm_(explicit.parameters(), 0.05, foreach=True)
    explicit_opt.step()
    assert norm.item() > 0.05 and norm.item() == pytest.approx(explicit_norm.full_tensor().item())
    for (name, a), b in zip(folded.named_parameters(), explicit.parameters(), strict=True):
        torch.testing.assert_close(a.full_tensor(), b.full_tensor(), rtol=1e-6, atol=1e-7, msg=name)


# -- health -----------------------------------------------------------------------------------------


def test_spike_detector_flags_jumps_not_noise_and_round_trips():
    detector = SpikeDetector(window=20, min_history=5, zscore=6.0)
    gen = torch.Generator().manual_seed(5)
    noise = (3.0 + 0.05 * torch.randn(40, generator=gen)).tolist()
    assert all(detector.observe(x) is None for x in noise)
    z = detector.observe(4.0)
    assert z is not None and z > 6
    assert len(detector.history) == 20 and 4.0 not in detector.history  # a spike never enters the window
    restored = SpikeDetector(window=20, min_history=5, zscore=6.0)
    restored.load_state_dict(json.loads(json.dumps(detector.state_dict())))
    assert restored.score(3.5) == detector.score(3.5)
    assert SpikeDetector(window=10, min_history=5, zscore=6.0).observe(100.0) is None  # no history yet


# -- checkpoints ------------------------------------------------------------------------------------


def test_checkpoint_round_trip_keep_last_and_partial_saves_ignored(one_rank_group, tmp_path):
    model, opt = sharded_tiny(one_rank_group, seed=7)
    batch = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(6))
    micro = [(batch[:, :-1], batch[:, 1:])]
    ckpt = Checkpointer(tmp_path, keep=2, rank=0, world_size=1)
    for step in (1, 2, 3):
        train_step(model, opt, micro, grad_clip=1.0)
        ckpt.save(step, model, opt, {"step": step})
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [2, 3]
    # A save killed mid-way (no marker, or still .tmp) is never taken for a checkpoint.
    (tmp_path / "step-9").mkdir()
    (tmp_path / "step-9" / ".metadata").write_bytes(b"partial")
    (tmp_path / "step-10.tmp").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "step-3"
    Checkpointer(tmp_path, keep=2, rank=0, world_size=1)
    assert not (tmp_path / "step-10.tmp").exists()

    expected_next = train_step(model, opt, micro, grad_clip=1.0)[0].item()
    model2, opt2 = sharded_tiny(one_rank_group, seed=7)
    extra = ckpt.load(tmp_path / "step-3", model2, opt2)
    assert extra == {"step": 3}
    assert train_step(model2, opt2, micro, grad_clip=1.0)[0].item() == expected_next  # bitwise

    marker = tmp_path / "step-3" / COMPLETE
    marker.write_text(json.dumps({"step": 3, "world_size": 4}))
    with pytest.raises(ValueError, match="written by 4 ranks"):
        ckpt.load(tmp_path / "step-3", model2, opt2)


# -- config and metrics -----------------------------------------------------------------------------


def test_config_from_json_and_yaml_and_strictness(tmp_path):
    data = {"model": "350M", "data_dir": "d", "checkpoint_dir": "c", "optim": {"lr": 1e-3}}
    (tmp_path / "run.json").write_text(json.dumps(data))
    (tmp_path / "run.yaml").write_text("model: 350M\ndata_dir: d\ncheckpoint_dir: c\noptim:\n  lr: 0.001\n")
    assert load_config(tmp_path / "run.json") == load_config(tmp_path / "run.yaml")
    cfg = load_config(tmp_path / "run.json")
    shapes = cfg.model_config_for(vocab_size=50304, seq_len=4096)
    assert (shapes.dim, shapes.vocab_size, shapes.max_seq_len) == (1024, 50304, 4096)
    with pytest.raises(ValueError, match="optim"):
        TrainConfig.model_validate({**data, "optim": {"learning_rate": 1}})
    with pytest.raises(ValueError, match="unknown model preset"):
        TrainConfig.model_validate({**data, "model": "2B"})
    with pytest.raises(ValueError, match="unknown model_overrides"):
        TrainConfig.model_validate({**data, "model_overrides": {"width": 3}})
    overridden = TrainConfig.model_validate({**data, "model_overrides": {"n_layers": 2}})
    assert overridden.model_config_for(vocab_size=512).n_layers == 2


def test_peak_flops_table():
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("cpu") is None


def test_metrics_logger_writes_lines_in_order_from_its_thread(capfd):
    logger = MetricsLogger(enabled=True)
    for step in range(1, 4):
        logger.metric(step, {"loss": 1.0 / step})
    logger.event("done", 3, tokens_seen=12)
    logger.close()
    lines = capfd.readouterr().out.splitlines()
    assert lines[0] == 'METRIC {"step": 1, "loss": 1.0}'
    assert json.loads(lines[2].removeprefix("METRIC ")) == {"step": 3, "loss": 1 / 3}
    assert json.loads(lines[3].removeprefix("EVENT ")) == {"event": "done", "step": 3, "tokens_seen": 12}
    silent = MetricsLogger(enabled=False)
    silent.metric(1, {"loss": 1.0})
    silent.close()
    assert capfd.readouterr().out == ""
