"""The online runtime of a rotated block (qblock.py): QLinear, R3/R4 and the quantizers, on a transformers decoder
layer built from a config alone (fast: no checkpoint, no subprocess)."""
from __future__ import annotations

import json

import pytest
import torch

from streamquant.kernels.hadamard import OnlineHadamard
from streamquant.qblock import Runtime, install_runtime, qlinears
from streamquant.quant.quantizers import ActQuantConfig
from streamquant.spec import read_spec
from streamquant.stream import Engine

CONFIG = dict(model_type="qwen2", hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=64, max_position_embeddings=64, rms_norm_eps=1e-5)


@pytest.fixture
def setup(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    spec = read_spec(tmp_path)
    gen = torch.Generator().manual_seed(0)
    weights = {k: (1 + 0.2 * torch.randn(s, generator=gen)) if len(s) == 1 and "norm" in k else
               0.2 * torch.randn(s, generator=gen) for k, s in spec.block_shapes().items()}
    engine = Engine(spec, torch.device("cpu"), torch.float32, micro_batch=2)
    hidden = torch.randn(2, 20, spec.hidden_size, generator=gen)
    return spec, engine, weights, hidden


def forward(engine, spec, weights, runtime, hidden):
    layer = install_runtime(engine.build_layer(0, weights), spec, runtime)
    out = hidden.clone()
    engine.run_block(layer, out)
    return layer, out


def test_without_online_parts_the_block_is_transformers_own(setup):
    spec, engine, weights, hidden = setup
    plain = engine.build_layer(0, weights)
    _, ours = forward(engine, spec, weights, Runtime(), hidden)
    pos = engine.position_embeddings(hidden.shape[1])
    with torch.no_grad():
        ref = plain(hidden, attention_mask=None, position_embeddings=pos)
    assert torch.allclose(ours, ref[0] if isinstance(ref, tuple) else ref, atol=1e-6)


def test_r4_is_applied_to_down_proj_input_as_its_matrix(setup):
    spec, engine, weights, _ = setup
    layer = install_runtime(engine.build_layer(0, weights), spec, Runtime(r4_seed=9))
    down = qlinears(layer, spec.arch)["mlp.down_proj"]
    x = torch.randn(5, spec.intermediate_size, dtype=torch.float32)
    dense = x.double() @ OnlineHadamard(spec.intermediate_size, 9).matrix() @ weights["mlp.down_proj.weight"].double().T
    assert torch.allclose(down(x).double(), dense, atol=1e-5)
    assert all(q.transform is None for n, q in qlinears(layer, spec.arch).items() if n != "mlp.down_proj")


def test_o_online_is_applied_to_o_proj_input_as_its_matrix(setup):
    spec, engine, weights, _ = setup
    layer = install_runtime(engine.build_layer(0, weights), spec, Runtime(r4_seed=9, o_seed=5))
    o_proj = qlinears(layer, spec.arch)["self_attn.o_proj"]
    n = spec.num_heads * spec.head_dim
    x = torch.randn(5, n, dtype=torch.float32)
    dense = x.double() @ OnlineHadamard(n, 5).matrix() @ weights["self_attn.o_proj.weight"].double().T
    assert torch.allclose(o_proj(x).double(), dense, atol=1e-5)
    assert {n for n, q in qlinears(layer, spec.arch).items() if q.transform is not None} == {"self_attn.o_proj",
                                                                                             "mlp.down_proj"}


def test_r3_cancels_in_attention_scores(setup):
    """R3 rotates Q and K after RoPE by the same orthogonal matrix: QKᵀ, hence the block output, is unchanged."""
    spec, engine, weights, hidden = setup
    _, plain = forward(engine, spec, weights, Runtime(), hidden)
    _, r3 = forward(engine, spec, weights, Runtime(r3_seed=3), hidden)
    assert torch.allclose(plain, r3, atol=1e-5)
    _, kv4 = forward(engine, spec, weights, Runtime(r3_seed=3, kv_bits=4), hidden)
    assert not torch.allclose(plain, kv4, atol=1e-3)


def test_activation_quantizer_feeds_each_linear_16_levels_per_token(setup):
    spec, engine, weights, hidden = setup
    layer = install_runtime(engine.build_layer(0, weights), spec, Runtime(act=ActQuantConfig(bits=4)))
    x = torch.randn(3, 7, spec.hidden_size)
    q = qlinears(layer, spec.arch)["self_attn.q_proj"].quantized_input(x)
    assert max(len(torch.unique(row)) for row in q.reshape(-1, spec.hidden_size)) <= 16
    assert (q - x).abs().max() > 0


def test_runtime_round_trips_through_json():
    rt = Runtime(r3_seed=3, r4_seed=4, act=ActQuantConfig(bits=4, clip_ratio=0.9), kv_bits=4, kv_clip=0.95)
    assert Runtime.from_json(json.loads(json.dumps(rt.to_json()))) == rt
    rt_o = Runtime(r4_seed=4, act=ActQuantConfig(bits=4), o_seed=5)
    assert Runtime.from_json(json.loads(json.dumps(rt_o.to_json()))) == rt_o
    assert "o_seed" not in rt.to_json()   # off: the JSON of outputs written before it existed
