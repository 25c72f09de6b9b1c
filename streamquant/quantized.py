"""What the quantize stage hands the writer: one finished block as plain values (no live modules, no pipeline).

A `QuantizedBlock` holds the block's dense tensors (norms, biases, pass-through tensors, and every linear's weight
when weights stay 16-bit), each quantized linear's integer codes with the scales, zeros and quantizer config they
were chosen with, and the block's R2. Formats (`streamquant.formats`) turn it into named tensors; the writer
(`streamquant.writer`) only stores them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from streamquant.arch import ArchMap
from streamquant.quant.quantizers import WeightQuantConfig

Codes = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]   # linear -> (int codes, scale, zero)


@dataclass(frozen=True)
class QuantizedLinear:
    """w ≈ (codes − zero) · scale per group (see quant/quantizers.py for the grid)."""

    codes: torch.Tensor       # [out, in] integers
    scale: torch.Tensor       # [out, groups], in the model dtype
    zero: torch.Tensor        # [out, groups]
    config: WeightQuantConfig

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)


@dataclass(frozen=True)
class QuantizedBlock:
    index: int
    dense: dict[str, torch.Tensor]               # names relative to the block prefix
    linears: dict[str, QuantizedLinear]          # linear name (e.g. "mlp.down_proj") -> its quantized weight
    r2: torch.Tensor | None = None               # [kv_heads, head_dim, head_dim] fp64, or None (no R2)

    @classmethod
    def from_layer(cls, index: int, layer: nn.Module, arch: ArchMap, codes: Codes | None,
                   config: WeightQuantConfig | None, r2: torch.Tensor | None) -> "QuantizedBlock":
        """Values out of a built, quantized layer: the linears in `codes` become QuantizedLinear, the rest stays."""
        codes = codes or {}
        linears = {name: QuantizedLinear(*codes[name], config) for name in arch.linear_names if name in codes}
        dense = {k: v for k, v in layer.state_dict().items() if k.removesuffix(".weight") not in linears}
        return cls(index, dense, linears, r2)
