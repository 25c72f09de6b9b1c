"""INT4 packing in compressed-tensors' ``pack-quantized`` layout (what vLLM and transformers load).

Layout (compressed-tensors 0.19–0.20, ``pack_to_int32`` with ``num_bits=4``): each signed 4-bit value
``v ∈ [−8, 7]`` is stored as the nibble ``v + 8``; eight consecutive values along the packed dimension fill one
int32, least significant nibble first; the last word is zero-padded. ``weight_packed`` is packed along the input dimension
(``[out, ceil(in/8)]``), an asymmetric ``weight_zero_point`` along the output dimension (``[ceil(out/8), G]``).

Zero points: our asymmetric codes and zeros are unsigned (``[0, 15]``, see ``quantizers.py``); compressed-tensors
stores signed codes and zero points and dequantizes ``(q − zp) · scale``. Subtracting 8 from both keeps
``q − zp`` unchanged, so the stored zero point nibble equals our unsigned zero. Symmetric weights store no zero point.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .quantizers import WeightQuantConfig, code_range

__all__ = [
    "pack_int4",
    "unpack_int4",
    "pack_zero_point",
    "unpack_zero_point",
    "to_compressed_tensors",
    "compressed_tensors_weight_args",
    "compressed_tensors_input_args",
    "to_int_quantized",
    "from_int_quantized",
    "to_transform_weight",
    "from_transform_weight",
]

_PER_WORD = 8  # int4 values per int32
_SHIFTS = torch.arange(_PER_WORD, dtype=torch.int64) * 4


def pack_int4(q: Tensor) -> Tensor:
    """Pack signed int4 codes ``[rows, cols]`` (any int dtype, in [−8, 7]) into int32 ``[rows, ceil(cols/8)]``."""
    if q.ndim != 2:
        raise ValueError(f"pack_int4 expects a 2-D tensor, got shape {tuple(q.shape)}")
    if q.is_floating_point():
        raise ValueError(f"pack_int4 expects integer codes, got {q.dtype}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError(f"int4 codes must lie in [-8, 7], got [{int(q.min())}, {int(q.max())}]")
    rows, cols = q.shape
    words = -(-cols // _PER_WORD)
    nibbles = torch.zeros(rows, words, _PER_WORD, dtype=torch.int32, device=q.device)
    # Padding nibbles stay 0, as in compressed-tensors (it pads the biased values with zeros).
    nibbles.view(rows, words * _PER_WORD)[:, :cols] = q.to(torch.int32) + 8
    packed = nibbles[..., 0].clone()
    for k in range(1, _PER_WORD):   # nibble k at bits 4k..4k+3; the top one lands in the sign bit (two's complement)
        packed |= nibbles[..., k] << (4 * k)
    return packed


def unpack_int4(p: Tensor, cols: int) -> Tensor:
    """Inverse of :func:`pack_int4`: int32 ``[rows, words]`` → int8 ``[rows, cols]`` in [−8, 7]."""
    if p.dtype != torch.int32 or p.ndim != 2:
        raise ValueError(f"unpack_int4 expects a 2-D int32 tensor, got {p.dtype} of shape {tuple(p.shape)}")
    rows, words = p.shape
    if not 0 <= cols <= words * _PER_WORD or words != -(-cols // _PER_WORD):
        raise ValueError(f"{words} packed words per row cannot hold exactly {cols} int4 values")
    unsigned = p.to(torch.int64) & 0xFFFFFFFF
    nibbles = (unsigned.unsqueeze(-1) >> _SHIFTS.to(p.device)) & 0xF
    return (nibbles.reshape(rows, words * _PER_WORD)[:, :cols] - 8).to(torch.int8)


def pack_zero_point(z: Tensor) -> Tensor:
    """Pack signed int4 zero points ``[out, G]`` along dim 0 → int32 ``[ceil(out/8), G]`` (compressed-tensors)."""
    return pack_int4(z.t()).t().contiguous()


def unpack_zero_point(p: Tensor, rows: int) -> Tensor:
    """Inverse of :func:`pack_zero_point`: → int8 ``[rows, G]`` in [−8, 7]."""
    return unpack_int4(p.t().contiguous(), rows).t().contiguous()


def to_compressed_tensors(
    result_q: Tensor,
    scale: Tensor,
    zero: Tensor,
    cfg: WeightQuantConfig,
    weight_shape: tuple[int, int] | torch.Size,
) -> dict[str, Tensor]:
    """One Linear's tensors for the ``pack-quantized`` format (names without the module prefix).

    ``result_q`` / ``scale`` / ``zero`` as produced by ``quantize_weight`` or ``GPTQ.quantize``. Returns
    ``weight_packed`` int32 ``[out, ceil(in/8)]``, ``weight_scale`` ``[out, G]`` in ``scale.dtype`` (keep it the
    model dtype: compressed-tensors dequantizes in the scale's dtype), ``weight_shape`` int64 ``[2]``, and for
    asymmetric weights ``weight_zero_point`` int32 ``[ceil(out/8), G]``.
    """
    if cfg.bits != 4:
        raise ValueError(f"pack-quantized export is implemented for 4-bit weights only, got bits={cfg.bits}")
    out_features, in_features = (int(d) for d in weight_shape)
    n_groups = 1 if cfg.group_size == -1 else in_features // cfg.group_size
    if cfg.group_size != -1 and in_features % cfg.group_size != 0:
        raise ValueError(f"group_size {cfg.group_size} does not divide in_features {in_features}")
    if tuple(result_q.shape) != (out_features, in_features):
        raise ValueError(f"codes of shape {tuple(result_q.shape)} do not match weight_shape {tuple(weight_shape)}")
    for name, t in (("scale", scale), ("zero", zero)):
        if tuple(t.shape) != (out_features, n_groups):
            raise ValueError(f"{name} of shape {tuple(t.shape)} expected [{out_features}, {n_groups}]")

    qmin, qmax = code_range(cfg.bits, cfg.symmetric)
    q = result_q.to(torch.int16)
    if q.numel() and (int(q.min()) < qmin or int(q.max()) > qmax):
        raise ValueError(f"codes outside [{qmin}, {qmax}] for bits={cfg.bits}, symmetric={cfg.symmetric}")
    offset = 0 if cfg.symmetric else 2 ** (cfg.bits - 1)  # unsigned → signed for asymmetric

    out: dict[str, Tensor] = {
        "weight_packed": pack_int4(q - offset),
        "weight_scale": scale.contiguous(),
        "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
    }
    if cfg.symmetric:
        if zero.numel() and bool((zero != 0).any()):
            raise ValueError("symmetric quantization must have zero == 0")
    else:
        zp = torch.round(zero.float()).to(torch.int16) - offset
        out["weight_zero_point"] = pack_zero_point(zp)
    return out


def compressed_tensors_weight_args(cfg: WeightQuantConfig) -> dict[str, Any]:
    """The ``weights`` entry of a compressed-tensors ``config_groups`` scheme (``QuantizationArgs`` fields)."""
    per_channel = cfg.group_size == -1
    return {
        "num_bits": cfg.bits,
        "type": "int",
        "symmetric": cfg.symmetric,
        "strategy": "channel" if per_channel else "group",
        "group_size": None if per_channel else cfg.group_size,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
    }


def compressed_tensors_input_args(bits: int) -> dict[str, Any]:
    """The ``input_activations`` entry of a scheme: dynamic, symmetric, per token, no clip. This is the only
    activation quantizer compressed-tensors (and vLLM's int8 kernels) express, so a run that exports it must
    compute with exactly it (``ActQuantConfig(bits, clip_ratio=1.0, symmetric=True)``): its grid
    ``scale = amax / ((2^b − 1) / 2)`` is ours (``quantizers.qparams_from_minmax``)."""
    return {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "token", "group_size": None,
            "dynamic": True, "actorder": None, "observer": None}


def to_int_quantized(result_q: Tensor, scale: Tensor, zero: Tensor, cfg: WeightQuantConfig) -> dict[str, Tensor]:
    """One Linear's tensors for compressed-tensors ``int-quantized`` (W8A8): ``weight`` int8 codes ``[out, in]``
    and ``weight_scale`` ``[out, G]`` in the scale's dtype (``[out, 1]`` per channel). Symmetric only: the
    format dequantizes ``q · scale`` when the scheme says symmetric (no zero point stored)."""
    if cfg.bits != 8 or not cfg.symmetric:
        raise ValueError(f"int-quantized export holds symmetric 8-bit weights, got bits={cfg.bits}, "
                         f"symmetric={cfg.symmetric}")
    if zero.numel() and bool((zero != 0).any()):
        raise ValueError("symmetric quantization must have zero == 0")
    qmin, qmax = code_range(cfg.bits, True)
    if result_q.numel() and (int(result_q.min()) < qmin or int(result_q.max()) > qmax):
        raise ValueError(f"codes outside [{qmin}, {qmax}] for 8-bit symmetric weights")
    return {"weight": result_q.to(torch.int8).contiguous(), "weight_scale": scale.contiguous()}


def from_int_quantized(tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`to_int_quantized`: codes, scale and (zero) zero ``[out, G]``."""
    scale = tensors["weight_scale"]
    return tensors["weight"].to(torch.int8), scale, torch.zeros_like(scale)


def to_transform_weight(matrix: Tensor) -> Tensor:
    """An orthonormal ``y = x @ matrix`` as compressed-tensors stores a (random-)hadamard transform weight.

    compressed-tensors' ``HadamardTransform`` computes ``(x @ W) / sqrt(n)`` in ``W``'s dtype, and vLLM divides the
    loaded ``W`` by ``sqrt(n)`` and multiplies the same way, so ``W = sqrt(n) · matrix``: the unnormalised ±1
    Hadamard (exact in fp32, and in the bf16 vLLM loads it in, whenever ``matrix`` is a true Hadamard). Returned in
    fp32, the scheme's ``precision``, computed in fp64 and rounded once.
    """
    n = matrix.shape[0]
    return (matrix.to(torch.float64) * math.sqrt(n)).to(torch.float32).contiguous()


def from_transform_weight(weight: Tensor) -> Tensor:
    """Inverse of :func:`to_transform_weight`: the matrix a loader applies (fp64)."""
    return weight.to(torch.float64) / math.sqrt(weight.shape[0])


def from_compressed_tensors(tensors: dict[str, Tensor], cfg: WeightQuantConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`to_compressed_tensors`: codes (our convention), scale and zero ``[out, G]``."""
    out_features, in_features = (int(d) for d in tensors["weight_shape"])
    offset = 0 if cfg.symmetric else 2 ** (cfg.bits - 1)
    q = unpack_int4(tensors["weight_packed"], in_features).to(torch.int16) + offset
    scale = tensors["weight_scale"]
    if cfg.symmetric:
        zero = torch.zeros_like(scale)
    else:
        zero = (unpack_zero_point(tensors["weight_zero_point"], out_features).to(torch.int16) + offset).to(scale.dtype)
    return q.to(torch.int8 if cfg.symmetric or cfg.bits < 8 else torch.int16), scale, zero
