"""Folding RMSNorm scales and the rotations R1, R2, R4 (and o_proj's online Hadamard) into weights (pure tensor
functions, computed in fp64).

Conventions: activations are row vectors and a Linear computes y = x Wᵀ + b with W [out, in].
- Input side of a rotation R (the layer now receives x R):  W <- W R.
- Output side (the layer must now emit y R):               W <- Rᵀ W, b <- b R.
- RMSNorm σ before a Linear:                                W <- W diag(σ), and the norm's σ becomes 1,
  which leaves a plain x / rms(x) that commutes with any orthogonal R1 (‖x R1‖ = ‖x‖).
Every function takes and returns a block's weight dict (names relative to `model.layers.{i}.`), touches only the
tensors present (so a caller can fuse one Linear at a time to bound memory) and computes in the dtype it is given:
`streamquant.rotate.model.rotate_block` hands it fp64 and casts back once, so rounding happens once.
"""
from __future__ import annotations

from typing import Callable

import torch

from streamquant.arch import ArchMap
from streamquant.device import rotation_dtype
from streamquant.spec import ModelSpec

Weights = dict[str, torch.Tensor]


def _dtype(w: Weights) -> torch.dtype:
    return next(iter(w.values())).dtype


def fuse_norms(weights: Weights, arch: ArchMap) -> Weights:
    """σ of each block norm into the linears that read it (Llama: q/k/v, gate/up); the norms become ones."""
    w = dict(weights)
    for nm in arch.norms:
        sigma = w[f"{nm.norm}.weight"]
        for name in nm.readers:
            if f"{name}.weight" in w:
                w[f"{name}.weight"] = w[f"{name}.weight"] * sigma[None, :]
        w[f"{nm.norm}.weight"] = torch.ones_like(sigma)
    return w


def fuse_r1(weights: Weights, r1: torch.Tensor, arch: ArchMap) -> Weights:
    """The residual stream is x R1: rotate the input side of its readers (q/k/v/gate/up) and the output side of its
    writers (o/down)."""
    w = dict(weights)
    r1 = r1.to(_dtype(w))
    for name in arch.residual_readers:
        if f"{name}.weight" in w:
            w[f"{name}.weight"] = w[f"{name}.weight"] @ r1
    for name in arch.residual_writers:
        if f"{name}.weight" in w:
            w[f"{name}.weight"] = r1.T @ w[f"{name}.weight"]
        if f"{name}.bias" in w:
            w[f"{name}.bias"] = w[f"{name}.bias"] @ r1
    return w


def fuse_r2(weights: Weights, r2: torch.Tensor, spec: ModelSpec) -> Weights:
    """R2[g] (head_dim × head_dim) on the output of v for KV head g and on o_proj's input columns of every query
    head in group g; it cancels inside attention because softmax weights mix value rows linearly. In a fused qkv
    linear only the value rows (after `arch.r2_value_rows`) turn; q and k rows stay as they are."""
    w = dict(weights)
    r2 = r2.to(_dtype(w))
    hd, kv, group = spec.head_dim, spec.num_kv_heads, spec.heads_per_group
    value, output = spec.arch.r2_value, spec.arch.r2_output
    start = sum(spec.dims()[d] for d in spec.arch.r2_value_rows)
    if f"{value}.weight" in w:
        v = _value_rows(w[f"{value}.weight"], start, kv * hd).view(kv, hd, -1)    # rows of head g: v_g = x V_gᵀ
        rotated = torch.einsum("gji,gjc->gic", r2, v).reshape(kv * hd, -1)        # V_g <- R2ᵀ V_g
        w[f"{value}.weight"] = _with_value_rows(w[f"{value}.weight"], start, rotated)
    if f"{value}.bias" in w:
        b = _value_rows(w[f"{value}.bias"], start, kv * hd).view(kv, hd)
        w[f"{value}.bias"] = _with_value_rows(w[f"{value}.bias"], start,
                                              torch.einsum("gj,gji->gi", b, r2).reshape(-1))
    if f"{output}.weight" in w:
        o = w[f"{output}.weight"]
        out = o.shape[0]
        o = o.view(out, kv, group, hd)                                       # input column blocks per query head
        w[f"{output}.weight"] = torch.einsum("okhj,kji->okhi", o, r2).reshape(out, -1)  # O_h <- O_h R2[g(h)]
    return w


def r2_gram(gram: torch.Tensor, r2: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Σ x xᵀ of o_proj's inputs x, turned into that of the inputs once R2 is fused (x B, B = R2[g(h)] per query
    head h): Bᵀ S B, as two applications of fuse_r2's o_proj column rotation (S B, then (S B)ᵀ B = Bᵀ S B for a
    symmetric S), computed in the device's rotation precision and returned in gram's dtype."""
    key, r2 = f"{spec.arch.r2_output}.weight", r2.to(gram.device)
    half = fuse_r2({key: gram.to(rotation_dtype(gram.device))}, r2, spec)[key]
    return fuse_r2({key: half.T.contiguous()}, r2, spec)[key].to(gram.dtype)


def _value_rows(t: torch.Tensor, start: int, count: int) -> torch.Tensor:
    return t if start == 0 and t.shape[0] == count else t[start: start + count]


def _with_value_rows(t: torch.Tensor, start: int, rows: torch.Tensor) -> torch.Tensor:
    """`t` with rows start.. replaced (the whole tensor when the value rows are all of it, as in Llama's v_proj)."""
    if start == 0 and t.shape[0] == rows.shape[0]:
        return rows
    return torch.cat([t[:start], rows, t[start + rows.shape[0]:]])


def fuse_online_input(weights: Weights, hadamard: Callable[[torch.Tensor], torch.Tensor],
                      names: tuple[str, ...]) -> Weights:
    """These linears receive x H online at run time, so their weights take W H (applied to rows by the same
    transform): R4 on down_proj (`arch.r4_names`: one, or every expert's), and o_proj's Hadamard across heads after
    R2 (QuaRot's out_proj transform: it mixes heads, which the per-head R2 cannot, so one head's outliers spread over
    all before the per-token quantizer)."""
    w = dict(weights)
    for name in names:
        if f"{name}.weight" in w:
            w[f"{name}.weight"] = hadamard(w[f"{name}.weight"])
    return w


ROWS_PER_CHUNK = 4096  # fp64 working set of a vocabulary-sized matrix: 4096 rows, not 32000+ (2 GB each at 70B)


def _rows_times(matrix: torch.Tensor, right: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """(matrix · diag(scale)) @ right in fp64, row chunk by row chunk, cast back to matrix's dtype."""
    out = torch.empty_like(matrix)
    right = right.double()
    for start in range(0, matrix.shape[0], ROWS_PER_CHUNK):
        rows = matrix[start: start + ROWS_PER_CHUNK].double()
        if scale is not None:
            rows = rows * scale.double()[None, :]
        out[start: start + ROWS_PER_CHUNK] = (rows @ right).to(matrix.dtype)
    return out


def fuse_embedding(table: torch.Tensor, r1: torch.Tensor) -> torch.Tensor:
    """Rows of the embedding are residual-stream vectors: E <- E R1."""
    return _rows_times(table, r1)


def fuse_head(norm_weight: torch.Tensor, head_weight: torch.Tensor, r1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Final σ and R1 into a fresh lm_head (never into a tied embedding table, which keeps E R1)."""
    return torch.ones_like(norm_weight), _rows_times(head_weight, r1, norm_weight)
