"""Architecture spec of a Llama-family checkpoint, read from config.json alone.

Every size streamquant uses comes from here, never from assumptions such as head_dim == hidden // heads.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamquant.errors import UserError

SUPPORTED = ("llama", "mistral", "qwen2")

# Linear layers of one decoder block, in the order a block computes them.
ATTN_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_LINEARS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
BLOCK_LINEARS = ATTN_LINEARS + MLP_LINEARS
BLOCK_NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    rope: dict[str, Any] = field(default_factory=dict)
    sliding_window: int | None = None
    torch_dtype: str = "float32"
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def block_shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected shape of every tensor of one decoder block (names relative to `model.layers.{i}.`)."""
        h, hd, i = self.hidden_size, self.head_dim, self.intermediate_size
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        shapes: dict[str, tuple[int, ...]] = {
            "self_attn.q_proj.weight": (q, h),
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, q),
            "mlp.gate_proj.weight": (i, h),
            "mlp.up_proj.weight": (i, h),
            "mlp.down_proj.weight": (h, i),
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
        }
        if self.attention_bias:
            shapes |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
            if self.model_type == "llama":  # Llama's attention_bias also covers o_proj; Qwen2 has q/k/v biases only
                shapes["self_attn.o_proj.bias"] = (h,)
        if self.mlp_bias:
            shapes |= {"mlp.gate_proj.bias": (i,), "mlp.up_proj.bias": (i,), "mlp.down_proj.bias": (h,)}
        return shapes

    def block_params(self) -> int:
        return sum(_numel(s) for s in self.block_shapes().values())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def read_spec(model_dir: Path) -> ModelSpec:
    """Parse config.json; refuse architectures whose block layout we do not know, naming what is supported."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir} has no config.json")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from exc
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED:
        raise UserError(f"unsupported model_type {model_type!r} in {path}; supported: {', '.join(SUPPORTED)}")
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        spec = ModelSpec(
            model_type=model_type,
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=int(cfg["vocab_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            rope=dict(cfg.get("rope_parameters") or {"rope_theta": cfg.get("rope_theta", 10000.0),
                                                      "rope_scaling": cfg.get("rope_scaling")}),
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", model_type == "mistral") else None,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            raw=cfg,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path} lacks or has a bad field: {exc}") from exc
    if heads % kv_heads:
        raise UserError(f"{path}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    return spec


def hf_config(spec: ModelSpec):
    """The transformers config object for building the real decoder layer class of this architecture."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(**{k: v for k, v in spec.raw.items() if k not in ("architectures", "quantization_config")})
    from streamquant.qblock import ATTENTION  # registers SDPA with streamquant's online R3 / KV quantizer hooks

    config._attn_implementation = ATTENTION
    return config
