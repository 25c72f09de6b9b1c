"""The architecture registry and the spec read from config.json, against transformers' own decoder layers (fast:
no checkpoint, no subprocess)."""
from __future__ import annotations

import json

import pytest
import torch

from streamquant.arch import ARCHS, ArchMap, LinearMap, NormMap
from streamquant.errors import UserError
from streamquant.spec import read_spec

SMALL = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, head_dim=12, vocab_size=64, max_position_embeddings=128)
# every bias rule each architecture has, switched on and off
CASES = [("llama", {}), ("llama", {"attention_bias": True}), ("llama", {"mlp_bias": True}),
         ("mistral", {}), ("qwen2", {}), ("qwen3", {}), ("qwen3", {"attention_bias": True}),
         ("phi3", {})]


# MoE configs name their experts (transformers' defaults would be 8 or 128 of them)
MOE_SMALL = {"mixtral": dict(num_local_experts=3, num_experts_per_tok=2),
             "qwen3_moe": dict(num_experts=3, num_experts_per_tok=2, moe_intermediate_size=40)}


def write_config(tmp_path, model_type: str, **extra) -> dict:
    cfg = {"model_type": model_type, **SMALL, **MOE_SMALL.get(model_type, {}), **extra}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return cfg


def hf_layer_shapes(model_type: str, cfg: dict) -> dict[str, tuple[int, ...]]:
    """Shapes of transformers' own decoder layer for this config (the independent reference)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        layer = ARCHS[model_type].hf_class("layer")(config, layer_idx=0)
    return {k: tuple(v.shape) for k, v in layer.state_dict().items()}


@pytest.mark.parametrize("model_type,extra", CASES)
def test_block_shapes_equal_transformers_layer(tmp_path, model_type, extra):
    cfg = write_config(tmp_path, model_type, **extra)
    spec = read_spec(tmp_path)
    assert spec.block_shapes() == hf_layer_shapes(model_type, cfg)


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_every_linear_of_the_layer_is_mapped_once(tmp_path, model_type):
    """Each Linear transformers builds is in the map, read by a norm or written to the residual or inside a block."""
    from torch import nn
    from transformers import AutoConfig

    from streamquant.moe import install_experts

    cfg = write_config(tmp_path, model_type)
    spec = read_spec(tmp_path)
    arch = spec.arch   # MoE: every expert spelled out
    with torch.device("meta"):
        layer = ARCHS[model_type].hf_class("layer")(AutoConfig.for_model(**cfg), layer_idx=0)
        if arch.moe is not None:   # transformers' fused experts are no Linears: ours (test_moe_* below) are
            install_experts(layer, spec)
    linears = sorted(name for name, m in layer.named_modules() if isinstance(m, nn.Linear))
    assert sorted(arch.linear_names) == linears
    assert sorted([*(n for group in arch.gptq_order for n in group), *arch.unquantized]) == linears
    for name in arch.residual_readers:   # readers take the hidden size in, writers give it out
        assert layer.get_submodule(name).in_features == SMALL["hidden_size"]
    for name in arch.residual_writers:
        assert layer.get_submodule(name).out_features == SMALL["hidden_size"]


@pytest.mark.parametrize("model_type", sorted(MOE_SMALL))
def test_moe_expert_shapes_equal_transformers_fused_experts(tmp_path, model_type):
    """Our per-expert tensors, stacked as transformers' conversion stacks them ([gate; up] per expert, then down),
    have the shapes of its fused experts; the router's weight is its router's; the rest of the layer is as mapped."""
    cfg = write_config(tmp_path, model_type)
    spec = read_spec(tmp_path)
    moe, theirs = spec.arch.moe, hf_layer_shapes(model_type, cfg)
    ours = spec.block_shapes()
    n, attr = spec.num_experts, moe.layer_attr
    expert = [f"{moe.module}.experts.{e}" for e in range(n)]
    gate_up = [(ours[f"{x}.{moe.gate}.weight"][0] + ours[f"{x}.{moe.up}.weight"][0], ours[f"{x}.{moe.gate}.weight"][1])
               for x in expert]
    assert theirs.pop(f"{attr}.experts.gate_up_proj") == (n, *gate_up[0]) and len(set(gate_up)) == 1
    assert theirs.pop(f"{attr}.experts.down_proj") == (n, *ours[f"{expert[0]}.{moe.down}.weight"])
    assert theirs.pop(f"{attr}.{moe.router}.weight") == ours.pop(f"{moe.module}.{moe.router}.weight")
    assert theirs == {k: v for k, v in ours.items() if ".experts." not in k}


@pytest.mark.parametrize("extra, message", [({"mlp_only_layers": [1]}, "mlp_only_layers"),
                                            ({"decoder_sparse_step": 2}, "decoder_sparse_step"),
                                            ({"num_experts_per_tok": 5}, "between 1 and")])
def test_qwen3_moe_with_dense_layers_or_bad_top_k_is_refused(tmp_path, extra, message):
    write_config(tmp_path, "qwen3_moe", **extra)
    with pytest.raises(UserError, match=message):
        read_spec(tmp_path)


def test_explicit_head_dim_and_sliding_window_rules(tmp_path):
    write_config(tmp_path, "mistral", sliding_window=16)
    spec = read_spec(tmp_path)
    assert spec.head_dim == 12 != spec.hidden_size // spec.num_heads and spec.sliding_window == 16
    write_config(tmp_path, "qwen2", sliding_window=16)          # qwen2: only with use_sliding_window
    assert read_spec(tmp_path).sliding_window is None
    write_config(tmp_path, "qwen2", sliding_window=16, use_sliding_window=True)
    assert read_spec(tmp_path).sliding_window == 16


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
@pytest.mark.parametrize("extra", [{}, {"use_sliding_window": True, "sliding_window": 16},
                                   {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
                                   {"use_sliding_window": True, "sliding_window": 16,
                                    "layer_types": ["sliding_attention", "full_attention"]}])
def test_per_layer_sliding_window_equals_transformers_layers(tmp_path, model_type, extra):
    """Qwen3 windows only the layers layer_types marks (derived from max_window_layers when absent): the window
    of each layer equals the one transformers' own attention module of that layer uses."""
    from transformers import AutoConfig

    cfg = write_config(tmp_path, model_type, **extra)
    spec = read_spec(tmp_path)
    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        theirs = [ARCHS[model_type].hf_class("layer")(config, layer_idx=i).self_attn.sliding_window
                  for i in range(spec.num_layers)]
    assert [spec.window(i) for i in range(spec.num_layers)] == theirs
    if extra.get("max_window_layers") == 1 or "layer_types" in extra:
        assert None in theirs and 16 in theirs   # the case really mixes windowed and full layers


def test_unknown_architecture_is_refused_naming_the_supported(tmp_path):
    write_config(tmp_path, "gpt2")
    with pytest.raises(UserError, match="supported: llama, mistral, qwen2, qwen3, phi3"):
        read_spec(tmp_path)


def test_a_map_that_misnames_a_linear_is_rejected():
    lin = (LinearMap("a", "hidden", "hidden"), LinearMap("b", "hidden", "hidden"))
    with pytest.raises(ValueError, match="gptq_order"):
        ArchMap("x", "m", "L", "R", lin, (NormMap("n", ("a",)),), ("b",), "a", "b", "b", (("a",),))
    with pytest.raises(ValueError, match="not one of its linears"):
        ArchMap("x", "m", "L", "R", lin, (NormMap("n", ("c",)),), ("b",), "a", "b", "b", (("a",), ("b",)))
