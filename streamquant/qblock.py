"""A rotated (and optionally quantized) decoder block at run time.

The block is still transformers' own decoder layer; what DartQuant adds at run time is slotted in around it:
- every Linear becomes a `QLinear`: optional online Hadamard on its input (R4 for down_proj; for o_proj, one across
  heads, `Runtime.o_seed`), then the per-token activation quantizer, then the (fake-quantized or dequantized INT4)
  weight;
- attention goes through the registered "streamquant" attention function, which applies the online R3 Hadamard to
  Q and K after RoPE and quantizes K and V when the KV cache is quantized, then calls SDPA.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from streamquant.kernels.hadamard import OnlineHadamard
from streamquant.quant.pack import to_transform_weight
from streamquant.quant.quantizers import ActQuantConfig, fake_quantize_activation, fake_quantize_kv
from streamquant.arch import ArchMap
from streamquant.spec import ModelSpec

ATTENTION = "streamquant"


@dataclass(frozen=True)
class Runtime:
    """What happens online, at run time, in every block of a rotated model."""

    r3_seed: int | None = None      # online Hadamard on Q and K after RoPE (None: off)
    r4_seed: int | None = None      # online Hadamard on down_proj's input (None: off)
    act: ActQuantConfig = ActQuantConfig()
    kv_bits: int = 16
    kv_clip: float = 1.0
    r4_stored: bool = False         # R4 applied as compressed-tensors applies its stored transform weight (exports)
    o_seed: int | None = None       # online Hadamard on o_proj's input, across heads (None: off)

    def to_json(self) -> dict:
        d = {"r3_seed": self.r3_seed, "r4_seed": self.r4_seed, "a_bits": self.act.bits,
             "a_clip": self.act.clip_ratio, "a_symmetric": self.act.symmetric,
             "kv_bits": self.kv_bits, "kv_clip": self.kv_clip}
        if self.r4_stored:   # these two are absent when off: older outputs read the same
            d["r4_stored"] = True
        if self.o_seed is not None:
            d["o_seed"] = self.o_seed
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Runtime":
        return cls(d["r3_seed"], d["r4_seed"], ActQuantConfig(bits=d["a_bits"], clip_ratio=d["a_clip"],
                                                              symmetric=d["a_symmetric"]), d["kv_bits"], d["kv_clip"],
                   d.get("r4_stored", False), d.get("o_seed"))


class StoredTransform:
    """An online transform exactly as compressed-tensors' HadamardTransform applies the exported weight
    `W = sqrt(n)·R` (quant.pack.to_transform_weight): `(x in fp32 @ W) / sqrt(n)`, back to x's dtype. A run that
    exports R4 computes with this rather than the fast transform, so that an activation quantizer after it rounds
    the same values the loaded export rounds (fp32 differences of 1e-7 flip int8 codes otherwise)."""

    def __init__(self, hadamard: OnlineHadamard):
        self.n = hadamard.n
        self.weight = to_transform_weight(hadamard.matrix())
        self._scale = torch.tensor(self.n, dtype=torch.float64).sqrt()
        self._on: dict[torch.device, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self._on.get(x.device)
        if w is None:
            w = self._on[x.device] = self.weight.to(x.device)
        return ((x.to(w.dtype) @ w) / self._scale).to(x.dtype)


class QLinear(nn.Module):
    """input transform -> activation quantizer -> linear. The weight is already rotated/quantized offline."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act: ActQuantConfig,
                 transform: OnlineHadamard | StoredTransform | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.act = act
        self.transform = transform
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """Exactly what the matmul sees (GPTQ builds its Hessian from this)."""
        return self.input_and_target(x)[0]

    def input_and_target(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the matmul sees, and what it would see without the activation quantizer (--asym-calib's target)."""
        if self.transform is not None:
            x = self.transform(x)
        return fake_quantize_activation(x, self.act), x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.weight, self.bias)


def _attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    r3: OnlineHadamard | None = getattr(module, "sq_r3", None)
    if r3 is not None:
        query, key = r3(query), r3(key)
    kv_bits = getattr(module, "sq_kv_bits", 16)
    if kv_bits < 16:
        key = fake_quantize_kv(key, kv_bits, module.sq_kv_clip)
        value = fake_quantize_kv(value, kv_bits, module.sq_kv_clip)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION, _attention)


def install_runtime(layer: nn.Module, spec: ModelSpec, runtime: Runtime) -> nn.Module:
    """Swap every Linear of a built layer for a QLinear and attach the online attention settings."""
    arch = spec.arch
    for name in arch.linear_names:
        parent_name, attr = name.rsplit(".", 1)
        parent = layer.get_submodule(parent_name)
        old: nn.Linear = getattr(parent, attr)
        transform = None
        if name in arch.r4_names and runtime.r4_seed is not None:
            transform = OnlineHadamard(old.in_features, runtime.r4_seed)
            transform = StoredTransform(transform) if runtime.r4_stored else transform
        if name == arch.r2_output and runtime.o_seed is not None:
            transform = OnlineHadamard(old.in_features, runtime.o_seed)
        act = ActQuantConfig() if name in arch.unquantized else runtime.act   # a 16-bit router reads 16-bit inputs
        setattr(parent, attr, QLinear(old.weight.data, None if old.bias is None else old.bias.data, act, transform))
    attn = layer.get_submodule(arch.attention)
    attn.sq_r3 = OnlineHadamard(spec.head_dim, runtime.r3_seed) if runtime.r3_seed is not None else None
    attn.sq_kv_bits, attn.sq_kv_clip = runtime.kv_bits, runtime.kv_clip
    return layer


@contextlib.contextmanager
def activations_unquantized(layer: nn.Module, on: bool = True) -> Iterator[nn.Module]:
    """The layer with every activation and KV quantizer off while inside (`on`), as full-precision calibration
    sees it (`--calib-acts full`); the online transforms (R3, R4) stay, they are part of the rotated model's function."""
    if not on:
        yield layer
        return
    linears = [(m, m.act) for m in layer.modules() if isinstance(m, QLinear)]
    attention = [(m, m.sq_kv_bits) for m in layer.modules() if hasattr(m, "sq_kv_bits")]
    for m, _ in linears:
        m.act = ActQuantConfig()
    for m, _ in attention:
        m.sq_kv_bits = 16
    try:
        yield layer
    finally:
        for m, act in linears:
            m.act = act
        for m, bits in attention:
            m.sq_kv_bits = bits


def qlinears(layer: nn.Module, arch: ArchMap) -> dict[str, QLinear]:
    """The linears whose weights get quantized (a 16-bit MoE router is not among them)."""
    return {name: layer.get_submodule(name) for name in arch.quantized_names}


def hf_config(spec: ModelSpec):
    """The transformers config for building this architecture's decoder layers, with attention routed through the
    streamquant attention function (online R3 and the KV quantizer; plain SDPA when both are off)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(**{k: v for k, v in spec.raw.items() if k not in ("architectures", "quantization_config")})
    config._attn_implementation = ATTENTION
    return config
