"""The sizes of one checkpoint, read from config.json alone; its block layout comes from the architecture map
(`streamquant.arch`). Every size streamquant uses comes from here, never from assumptions such as
head_dim == hidden // heads. (Rope variants and the rest of config.json reach transformers' own layer classes
unchanged through `raw`.)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from streamquant.arch import (ARCHS, EXPERT_INTERMEDIATE, EXPERTS, GATE_UP, HEAD_DIM, HIDDEN, INTERMEDIATE, KV, Q, QKV,
                              ArchMap)
from streamquant.errors import UserError


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
    biased: tuple[str, ...] = ()          # linears that carry a bias (the architecture's rule applied to config.json)
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] | None = None   # layers the window applies to (None: every layer)
    num_experts: int = 0                  # MoE: experts per block, how many each token goes to, one expert's MLP
    experts_per_token: int = 0            # width, and whether the top-k routing weights are renormalised
    expert_intermediate_size: int = 0
    normalize_routing: bool = True
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def arch(self) -> ArchMap:
        """The architecture map with this checkpoint's experts spelled out (MoE), so every linear has a name."""
        return _arch(self.model_type, self.num_experts)

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def attention_bias(self) -> bool:
        return any(name in self.biased for name in self.arch.attention_linears())

    def window(self, layer: int) -> int | None:
        """The sliding window of one layer (None: full causal attention)."""
        if self.sliding_layers is not None and layer not in self.sliding_layers:
            return None
        return self.sliding_window

    @property
    def mlp_width(self) -> int:
        """The inner width of one MLP: down_proj's input (one expert's in a MoE block, where the router sends each
        token through top-k experts one after the other)."""
        return self.dims()[self.arch.linear(self.arch.r4).inp]

    def dims(self) -> dict[str, int]:
        """Values of the symbolic sizes the architecture map writes shapes in."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {HIDDEN: self.hidden_size, INTERMEDIATE: self.intermediate_size, Q: q, KV: kv, HEAD_DIM: self.head_dim,
                QKV: q + 2 * kv, GATE_UP: 2 * self.intermediate_size, EXPERTS: self.num_experts,
                EXPERT_INTERMEDIATE: self.expert_intermediate_size}

    def block_shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected shape of every tensor of one decoder block (names relative to the block prefix)."""
        return self.arch.block_shapes(self.dims(), self.biased)

    def block_params(self) -> int:
        return sum(_numel(s) for s in self.block_shapes().values())


@lru_cache(maxsize=None)
def _arch(model_type: str, num_experts: int) -> ArchMap:
    return ARCHS[model_type].with_experts(num_experts)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# transformers' default `max_window_layers` (Qwen2/Qwen3 configs) when config.json names neither it nor layer_types
_MAX_WINDOW_LAYERS = 28


def _sliding_layers(cfg: dict) -> tuple[int, ...]:
    """Layers marked "sliding_attention", derived as transformers does when config.json has no layer_types:
    layers from max_window_layers on."""
    types = cfg.get("layer_types")
    if types is None:
        first = int(cfg.get("max_window_layers", _MAX_WINDOW_LAYERS))
        return tuple(range(first, int(cfg["num_hidden_layers"])))
    return tuple(i for i, t in enumerate(types) if t == "sliding_attention")


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
    if model_type not in ARCHS:
        raise UserError(f"unsupported model_type {model_type!r} in {path}; supported: {', '.join(ARCHS)}")
    arch = ARCHS[model_type]
    moe = arch.moe
    if moe is not None:
        for key, value in moe.all_sparse:
            if key in cfg and cfg[key] != value:
                raise UserError(f"{path}: {key} = {cfg[key]!r} makes some {model_type} layers dense MLPs; only "
                                f"checkpoints whose every layer is MoE ({key} = {value!r}) are supported")
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
            biased=arch.biased(cfg),
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", arch.sliding_window_by_default) else None,
            sliding_layers=_sliding_layers(cfg) if arch.window_by_layer_types else None,
            num_experts=int(next((cfg[k] for k in moe.experts_keys if k in cfg), None)) if moe else 0,
            experts_per_token=int(cfg[moe.top_k_key]) if moe else 0,
            expert_intermediate_size=int(cfg[moe.intermediate_key]) if moe else 0,
            normalize_routing=bool(cfg.get(moe.normalize_key, True)) if moe and moe.normalize_key else True,
            raw=cfg,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path} lacks or has a bad field: {exc}") from exc
    if moe is not None and not 0 < spec.experts_per_token <= spec.num_experts:
        raise UserError(f"{path}: {moe.top_k_key} {spec.experts_per_token} must be between 1 and the number of "
                        f"experts ({spec.num_experts})")
    if heads % kv_heads:
        raise UserError(f"{path}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    return spec
