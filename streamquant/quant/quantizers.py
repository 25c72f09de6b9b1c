"""Uniform integer quantizers: weights (RTN, per channel or per group), activations (per token) and KV cache.

One grid definition serves every quantizer here and GPTQ (``gptq.py`` calls :func:`qparams_from_minmax`,
:func:`quantize_to_grid` and :func:`dequantize_from_grid`), so a GPTQ code and an RTN code mean the same thing.

Conventions (``b`` = bits, ``w ≈ (q − zero) · scale`` in every case):

* **symmetric**: ``scale = max|w| / ((2^b − 1) / 2)``, ``zero = 0``, signed codes
  ``q ∈ [−2^(b−1), 2^(b−1) − 1]``. This is the grid of the IST-DASLab GPTQ reference *and* of compressed-tensors
  (``scale = amax / (bit_range / 2)``), so symmetric codes are stored in ``pack-quantized`` unchanged with no
  zero point.
* **asymmetric**: ``scale = (max − min) / (2^b − 1)`` with ``min ≤ 0 ≤ max``, ``zero = round(−min / scale)``,
  unsigned codes ``q ∈ [0, 2^b − 1]`` and ``zero ∈ [0, 2^b − 1]`` (the GPTQ reference convention).
  compressed-tensors uses signed codes and zero points; ``pack.to_compressed_tensors`` subtracts ``2^(b−1)`` from
  both, which leaves ``q − zero`` unchanged.

``zero`` is an integer-valued float tensor, returned (like ``scale``) in the weight's dtype. Weight scales are rounded *up* to the weight's dtype (the
dtype compressed-tensors stores ``weight_scale`` in), so the exported scale is exactly the one the codes were chosen
with, and ``|w − ŵ| ≤ scale / 2`` holds for every unclipped element.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "WeightQuantConfig",
    "ActQuantConfig",
    "code_range",
    "code_dtype",
    "qparams_from_minmax",
    "quantize_to_grid",
    "dequantize_from_grid",
    "dequantize_from_grid_",
    "weight_qparams",
    "mse_clip_qparams",
    "MSE_CLIP_SHRINKS",
    "quantize_weight",
    "dequantize_weight",
    "fake_quantize_weight",
    "fake_quantize_activation",
    "fake_quantize_kv",
]


@dataclass(frozen=True)
class WeightQuantConfig:
    """Weight quantization: ``group_size = -1`` means one scale per output channel.

    ``mse_clip`` (QuaRot's ``w_clip``): instead of the plain min/max range, each (row, group) takes the shrink of its
    range that minimises ``Σ |Q(w) − w|^2.4`` (see :func:`mse_clip_qparams`). Off by default, so outputs made
    without it stay byte-identical.
    """

    bits: int = 4
    group_size: int = -1
    symmetric: bool = True
    clip_ratio: float = 1.0
    mse_clip: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"weight bits must be in [2, 8], got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be -1 (per channel) or positive, got {self.group_size}")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ValueError(f"clip_ratio must be in (0, 1], got {self.clip_ratio}")


@dataclass(frozen=True)
class ActQuantConfig:
    """Per-token activation quantization; ``bits >= 16`` switches it off."""

    bits: int = 16
    clip_ratio: float = 1.0
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits < 2:
            raise ValueError(f"activation bits must be >= 2 (or >= 16 for off), got {self.bits}")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ValueError(f"clip_ratio must be in (0, 1], got {self.clip_ratio}")

    @property
    def enabled(self) -> bool:
        return self.bits < 16


# --------------------------------------------------------------------------------------------------------------
# The grid (shared by RTN, GPTQ, activations and KV)
# --------------------------------------------------------------------------------------------------------------


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Smallest and largest integer code."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def code_dtype(bits: int, symmetric: bool) -> torch.dtype:
    """int8, except asymmetric 8-bit codes (``[0, 255]``), which need int16."""
    qmin, qmax = code_range(bits, symmetric)
    return torch.int8 if qmax <= 127 else torch.int16


def _round_up_to_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast positive ``x`` to ``dtype`` rounding towards +inf, so a stored scale never shrinks the grid."""
    y = x.to(dtype)
    if dtype == x.dtype:
        return y
    too_small = y.to(x.dtype) < x
    return torch.where(too_small, torch.nextafter(y, torch.full_like(y, float("inf"))), y)


def qparams_from_minmax(
    xmin: Tensor,
    xmax: Tensor,
    bits: int,
    symmetric: bool,
    scale_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Scale and zero for ranges ``[xmin, xmax]`` (any shape; clipping is the caller's job).

    The range is widened to contain 0 (so 0 is exactly representable, as in the GPTQ reference and
    compressed-tensors). An all-zero range gets ``[-1, 1]`` so the scale stays finite; its values still
    quantize to exactly 0. With ``scale_dtype`` the scale is rounded up to that dtype and returned in it; the
    zero point is then computed from the rounded scale. ``zero`` has the dtype of the scale.
    """
    work = torch.promote_types(xmin.dtype, torch.float32)
    xmin = torch.clamp(xmin.to(work), max=0.0)
    xmax = torch.clamp(xmax.to(work), min=0.0)
    if symmetric:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)

    scale = (xmax - xmin) / (2**bits - 1)
    if scale_dtype is not None:
        scale = _round_up_to_dtype(scale, scale_dtype).to(work)
        # Underflow (weights ~1e-30 in half precision): any positive scale reconstructs them as ~0.
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if symmetric:
        zero = torch.zeros_like(scale)
    else:
        qmin, qmax = code_range(bits, symmetric)
        zero = torch.clamp(torch.round(-xmin / scale), qmin, qmax)
    out_dtype = scale_dtype if scale_dtype is not None else work
    return scale.to(out_dtype), zero.to(out_dtype)


def quantize_to_grid(x: Tensor, scale: Tensor, zero: Tensor, bits: int, symmetric: bool, *,
                     out: Tensor | None = None) -> Tensor:
    """Integer codes (as float in the compute dtype) ``clamp(round(x / scale) + zero)``; broadcasts.

    The steps after the division run in its buffer (``out`` when given, e.g. a row of GPTQ's code block): this runs
    on every linear input of every block pass (fake-quant activations, a 70B down_proj micro-batch is ~120 MB) and
    once per GPTQ column, and a fresh tensor per step is a fresh page-faulted mapping for large ones, one more
    dispatch for small ones. ``zero`` has ``scale``'s dtype (as every qparams function returns them), so
    ``x / scale`` already holds the promoted result. A symmetric grid's zero is 0 and is not added."""
    qmin, qmax = code_range(bits, symmetric)
    q = torch.div(x, scale, out=out).round_()
    return (q if symmetric else q.add_(zero)).clamp_(qmin, qmax)


def dequantize_from_grid(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """``(q − zero) · scale``; broadcasts. Computed in the dtype of ``scale`` promoted to at least fp32."""
    work = torch.promote_types(scale.dtype, torch.float32)
    return (q.to(work) - zero.to(work)) * scale.to(work)


def dequantize_from_grid_(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """`dequantize_from_grid` in ``q``'s own memory, for codes a caller no longer needs that are already in the
    dtype of ``scale`` and ``zero`` (fp32 or wider): the same arithmetic, no new tensor."""
    return q.sub_(zero).mul_(scale)


# --------------------------------------------------------------------------------------------------------------
# Weights (RTN)
# --------------------------------------------------------------------------------------------------------------


def _n_groups(in_features: int, out_features: int, group_size: int) -> int:
    if group_size == -1:
        return 1
    if in_features % group_size != 0:
        raise ValueError(
            f"group_size {group_size} does not divide in_features {in_features} of a weight of shape "
            f"[{out_features}, {in_features}]; pick a group size that divides it or use -1 (per channel)"
        )
    return in_features // group_size


def _check_weight(w: Tensor) -> None:
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight [out_features, in_features], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"expected a floating-point weight, got {w.dtype}")


def _grouped(w: Tensor, cfg: WeightQuantConfig) -> Tensor:
    """View ``[out, in]`` as ``[out, G, g]`` (``G = 1`` per channel)."""
    out_features, in_features = w.shape
    n_groups = _n_groups(in_features, out_features, cfg.group_size)
    return w.reshape(out_features, n_groups, in_features // n_groups)


def weight_qparams(
    w: Tensor, cfg: WeightQuantConfig, *, scale_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """Scale and zero per (row, group), both shaped ``[out, n_groups]``: from min/max (times ``clip_ratio``), or
    with ``cfg.mse_clip`` from the error-minimising shrink of that range (:func:`mse_clip_qparams`).

    ``scale_dtype`` defaults to ``w.dtype``: the scale is rounded up to it (see module docstring) and both
    tensors are returned in it. Raises ValueError if ``group_size`` does not divide ``in_features``.
    """
    _check_weight(w)
    groups = _grouped(w, cfg)
    if cfg.mse_clip:
        return mse_clip_qparams(groups, cfg, scale_dtype or w.dtype)
    xmin = groups.amin(dim=-1) * cfg.clip_ratio
    xmax = groups.amax(dim=-1) * cfg.clip_ratio
    return qparams_from_minmax(xmin, xmax, cfg.bits, cfg.symmetric, scale_dtype or w.dtype)


# Shrink factors tried by the MSE clip search, largest first: 1.00, 0.99, …, 0.20 (QuaRot's grid of 100 steps with
# maxshrink 0.8, end point included). Written as ``1 - i / 100`` so a reference can rebuild the same floats.
MSE_CLIP_SHRINKS: tuple[float, ...] = tuple(1 - i / 100 for i in range(81))
MSE_CLIP_NORM = 2.4  # the error norm of QuaRot / the GPTQ reference's ``mse`` option
# Elements of one chunk of the search's [candidates, rows, groups, g] temporaries: on a CPU 4 MiB in fp32, small
# enough to stay in cache (the search is elementwise work, ~70 % of it the |·|^2.4); on a GPU 64 MiB, so a 70B
# weight takes hundreds of chunks, not thousands of kernel-launch-bound ones. Bounded whatever the weight's size.
_MSE_CHUNK_ELEMENTS = 1 << 20
_MSE_CHUNK_ELEMENTS_GPU = 1 << 24


def mse_clip_qparams(groups: Tensor, cfg: WeightQuantConfig, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """QuaRot's ``w_clip``: per (row, group) of ``groups [out, G, g]``, the scale and zero of the range
    ``[p·min, p·max]`` (``min``/``max`` already times ``clip_ratio``) for the shrink ``p`` in
    :data:`MSE_CLIP_SHRINKS` minimising ``Σ |Q(w) − w|^2.4`` over the group, on exactly the grid RTN and GPTQ use
    (scale rounded up to ``scale_dtype``, ``Q(w)`` rounded to it as :func:`dequantize_weight` returns it).
    Outlier-dominated ranges waste most levels; shrinking trades a few clipped values for a finer step everywhere
    else.

    All candidates of a chunk of rows at once (one op each over ``[81, rows, G, g]``, chunks sized to stay in
    cache: 1.5× faster than a loop over candidates). Ties keep the first (largest) ``p`` (``argmin`` returns the
    first minimum), so the plain range wins whenever clipping does not help and the result is deterministic.
    Returns ``[out, G]`` tensors in ``scale_dtype``.
    """
    work = torch.promote_types(groups.dtype, torch.float32)
    shrinks = torch.tensor(MSE_CLIP_SHRINKS, dtype=work, device=groups.device).view(-1, 1, 1)
    out_features = groups.shape[0]
    budget = _MSE_CHUNK_ELEMENTS if groups.device.type == "cpu" else _MSE_CHUNK_ELEMENTS_GPU
    chunk = max(1, budget // max(1, groups[0].numel() * shrinks.shape[0]))
    scales, zeros = [], []
    for r0 in range(0, out_features, chunk):
        x = groups[r0 : r0 + chunk].to(work)
        xmin = x.amin(dim=-1) * cfg.clip_ratio
        xmax = x.amax(dim=-1) * cfg.clip_ratio
        scale, zero = qparams_from_minmax(shrinks * xmin, shrinks * xmax, cfg.bits, cfg.symmetric, scale_dtype)
        s, z = scale.to(work).unsqueeze(-1), zero.to(work).unsqueeze(-1)             # [81, rows, G, 1]
        q = quantize_to_grid(x, s, z, cfg.bits, cfg.symmetric)
        # ŵ as it is stored and used: rounded to the weight dtype (a no-op for fp32; matters for bf16).
        w_hat = dequantize_from_grid(q, s, z).to(scale_dtype).to(work)
        err = w_hat.sub_(x).abs_().pow_(MSE_CLIP_NORM).sum(dim=-1)                    # [81, rows, G]
        best = err.argmin(dim=0, keepdim=True)
        scales.append(scale.gather(0, best)[0])
        zeros.append(zero.gather(0, best)[0])
    return torch.cat(scales), torch.cat(zeros)


def _expand(p: Tensor, group_size: int, in_features: int) -> Tensor:
    """Repeat a per-(row, group) tensor ``[out, G]`` along the input dimension to ``[out, in]``."""
    return p.repeat_interleave(in_features // p.shape[1], dim=1) if p.shape[1] > 1 else p


def quantize_weight(w: Tensor, cfg: WeightQuantConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest: codes ``[out, in]`` (int8; int16 for asymmetric 8-bit) and scale, zero ``[out, G]``
    (in ``w.dtype``)."""
    scale, zero = weight_qparams(w, cfg)
    in_features = w.shape[1]
    work = torch.promote_types(w.dtype, torch.float32)
    s = _expand(scale, cfg.group_size, in_features).to(work)
    z = _expand(zero, cfg.group_size, in_features).to(work)
    q = quantize_to_grid(w.to(work), s, z, cfg.bits, cfg.symmetric)
    return q.to(code_dtype(cfg.bits, cfg.symmetric)), scale, zero


def dequantize_weight(q: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """``(q − zero) · scale`` per group, returned in ``scale.dtype``.

    Bit-identical to compressed-tensors' ``dequantize`` for scales in fp16/bf16/fp32: the product of a small
    integer and a scale is exact in fp32, so both round once, to the scale's dtype.
    """
    out_features, in_features = q.shape
    n_groups = _n_groups(in_features, out_features, group_size)
    if scale.shape != (out_features, n_groups) or zero.shape != (out_features, n_groups):
        raise ValueError(
            f"scale {tuple(scale.shape)} / zero {tuple(zero.shape)} do not match codes {tuple(q.shape)} "
            f"with group_size {group_size} (expected [{out_features}, {n_groups}])"
        )
    s = _expand(scale, group_size, in_features)
    z = _expand(zero, group_size, in_features)
    return dequantize_from_grid(q, s, z).to(scale.dtype)


def fake_quantize_weight(w: Tensor, cfg: WeightQuantConfig) -> Tensor:
    """``dequantize(quantize(w))`` in ``w.dtype``."""
    q, scale, zero = quantize_weight(w, cfg)
    return dequantize_weight(q, scale, zero, cfg.group_size).to(w.dtype)


# --------------------------------------------------------------------------------------------------------------
# Activations and KV cache (dynamic, per token)
# --------------------------------------------------------------------------------------------------------------


def _fake_quantize_last_dim(x: Tensor, bits: int, symmetric: bool, clip_ratio: float) -> Tensor:
    """Dynamic min/max quantization of every vector along the last dim; fp32 math for half dtypes. One buffer for
    the whole round trip (measured 2.3× faster than a tensor per step on a [4, 1024, 7168] input)."""
    work = torch.promote_types(x.dtype, torch.float32)
    xw = x.to(work)
    xmin, xmax = torch.aminmax(xw, dim=-1, keepdim=True)
    scale, zero = qparams_from_minmax(xmin * clip_ratio, xmax * clip_ratio, bits, symmetric)
    return dequantize_from_grid_(quantize_to_grid(xw, scale, zero, bits, symmetric), scale, zero).to(x.dtype)


def fake_quantize_activation(x: Tensor, cfg: ActQuantConfig) -> Tensor:
    """Per-token (last dim) min/max quantize-dequantize with clip ratio; identity when ``bits >= 16``.

    Default is asymmetric (DartQuant/QuaRot W4A4). Returns ``x.dtype``.
    """
    if not cfg.enabled or x.numel() == 0:
        return x
    return _fake_quantize_last_dim(x, cfg.bits, cfg.symmetric, cfg.clip_ratio)


def fake_quantize_kv(x: Tensor, bits: int, clip_ratio: float = 1.0) -> Tensor:
    """KV-cache quantizer: ``x [..., heads, seq, head_dim]``, asymmetric per (head, token) over ``head_dim``.

    Identity when ``bits >= 16``. Each (head, token) vector gets its own scale and zero.
    """
    if bits >= 16 or x.numel() == 0:
        return x
    if x.ndim < 3:
        raise ValueError(f"expected KV of shape [..., heads, seq, head_dim], got shape {tuple(x.shape)}")
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
    return _fake_quantize_last_dim(x, bits, False, clip_ratio)
