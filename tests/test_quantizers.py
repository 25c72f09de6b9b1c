"""RTN weight, per-token activation and KV quantizers, checked against formulas written out here in fp64."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from streamquant.quant.quantizers import (
    MSE_CLIP_SHRINKS,
    ActQuantConfig,
    WeightQuantConfig,
    code_range,
    dequantize_weight,
    fake_quantize_activation,
    fake_quantize_kv,
    fake_quantize_weight,
    quantize_weight,
    weight_qparams,
)


def _expand(p: torch.Tensor, cols: int) -> torch.Tensor:
    return p.repeat_interleave(cols // p.shape[1], dim=1)


def _ref_token_quant(x: torch.Tensor, bits: int, clip: float, symmetric: bool) -> torch.Tensor:
    """QuaRot-style dynamic per-vector (last dim) quantize-dequantize, spelled out in fp64."""
    x = x.double()
    lo = torch.clamp(x.min(dim=-1, keepdim=True).values, max=0) * clip
    hi = torch.clamp(x.max(dim=-1, keepdim=True).values, min=0) * clip
    if symmetric:
        hi = torch.maximum(hi, -lo)
        lo = -hi
    both_zero = (lo == 0) & (hi == 0)
    lo = torch.where(both_zero, -1.0, lo)
    hi = torch.where(both_zero, 1.0, hi)
    levels = 2**bits - 1
    scale = (hi - lo) / levels
    if symmetric:
        q = torch.clamp(torch.round(x / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        return q * scale
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(x / scale) + zero, 0, levels)
    return (q - zero) * scale


# ---------------------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [-1, 16])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_rtn_error_at_most_half_a_step_and_codes_in_range(dtype, symmetric, group_size, bits):
    torch.manual_seed(0)
    w = (torch.randn(24, 64) * torch.logspace(-2, 1, 24).unsqueeze(1)).to(dtype)
    w[3] = 0.0  # an all-zero row must survive
    cfg = WeightQuantConfig(bits=bits, group_size=group_size, symmetric=symmetric)
    q, scale, zero = quantize_weight(w, cfg)

    n_groups = 1 if group_size == -1 else 64 // group_size
    assert q.dtype == (torch.int16 if (bits, symmetric) == (8, False) else torch.int8) and q.shape == w.shape
    assert scale.shape == zero.shape == (24, n_groups)
    assert scale.dtype == dtype  # stored scale dtype, as compressed-tensors keeps it
    qmin, qmax = code_range(bits, symmetric)
    assert (qmin, qmax) == ((-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1))
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    assert torch.equal(zero, torch.round(zero)) and bool((zero >= qmin).all() and (zero <= qmax).all())
    if symmetric:
        assert bool((zero == 0).all())
    assert bool((scale > 0).all())
    # The stored scale is the exact min/max scale rounded *up* to ``dtype`` (never shrinks the grid).
    g = w.double().reshape(24, n_groups, -1)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    exact = (torch.maximum(hi, -lo) * 2 if symmetric else hi - lo) / (2**bits - 1)
    exact = torch.where(exact == 0, 2 / (2**bits - 1), exact)
    assert bool((scale.double() >= exact * (1 - 2 * torch.finfo(torch.float32).eps)).all())  # fp32 math
    assert bool((scale.double() <= exact * (1 + 2 * torch.finfo(dtype).eps)).all())

    deq = dequantize_weight(q, scale, zero, group_size)
    err = (deq.double() - w.double()).abs()
    half_step = _expand(scale.double(), 64) / 2
    # The scale is rounded *up* to the storage dtype, so half a step bounds the error with only the final
    # rounding of ŵ to ``dtype`` on top.
    slack = deq.double().abs() * torch.finfo(dtype).eps
    assert bool((err <= half_step * (1 + 1e-6) + slack).all())
    assert bool((deq[3] == 0).all())
    assert torch.equal(fake_quantize_weight(w, cfg), deq.to(dtype))
    assert fake_quantize_weight(w, cfg).dtype == dtype


@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_matches_written_out_formula(symmetric):
    """Codes from the textbook formulas, per group of 32, in fp64."""
    torch.manual_seed(1)
    w = torch.randn(16, 128, dtype=torch.float64)
    cfg = WeightQuantConfig(bits=4, group_size=32, symmetric=symmetric, clip_ratio=0.9)
    q, scale, zero = quantize_weight(w, cfg)
    g = w.reshape(16, 4, 32)
    lo = torch.clamp(g.min(-1).values, max=0) * 0.9
    hi = torch.clamp(g.max(-1).values, min=0) * 0.9
    if symmetric:
        s = torch.maximum(hi, -lo) / 7.5
        q_ref = torch.clamp(torch.round(g / s.unsqueeze(-1)), -8, 7)
    else:
        s = (hi - lo) / 15
        z = torch.round(-lo / s)
        q_ref = torch.clamp(torch.round(g / s.unsqueeze(-1)) + z.unsqueeze(-1), 0, 15)
        assert torch.equal(zero, z)
    torch.testing.assert_close(scale, s, rtol=1e-12, atol=0)
    assert torch.equal(q.double(), q_ref.reshape(16, 128))


def test_clip_ratio_shrinks_scale():
    w = torch.randn(8, 64)
    s1, _ = weight_qparams(w, WeightQuantConfig())
    s2, _ = weight_qparams(w, WeightQuantConfig(clip_ratio=0.8))
    torch.testing.assert_close(s2, s1 * 0.8)


def test_group_size_not_dividing_raises_with_dims():
    w = torch.randn(64, 576)
    with pytest.raises(ValueError, match=r"128.*576|576.*128") as exc:
        quantize_weight(w, WeightQuantConfig(group_size=128))
    assert "[64, 576]" in str(exc.value)
    with pytest.raises(ValueError, match="576"):
        weight_qparams(w, WeightQuantConfig(group_size=100))


def test_config_validation():
    with pytest.raises(ValueError):
        WeightQuantConfig(bits=1)
    with pytest.raises(ValueError):
        WeightQuantConfig(group_size=0)
    with pytest.raises(ValueError):
        WeightQuantConfig(clip_ratio=1.5)
    with pytest.raises(ValueError):
        ActQuantConfig(bits=4, clip_ratio=0.0)


# ---------------------------------------------------------------------------------------------------- activations


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("clip", [1.0, 0.9])
@pytest.mark.parametrize("bits", [4, 8])
def test_activation_matches_fp64_reference(bits, clip, symmetric):
    torch.manual_seed(2)
    x = torch.randn(3, 17, 64, dtype=torch.float64) * torch.linspace(0.1, 5, 64, dtype=torch.float64)
    x[0, 0] = 0.0  # an all-zero token
    x[1, 2] = x[1, 2].abs()  # an all-positive token: range must still include 0
    cfg = ActQuantConfig(bits=bits, clip_ratio=clip, symmetric=symmetric)
    given = x.clone()
    out = fake_quantize_activation(x, cfg)
    assert torch.equal(x, given)   # computed in a buffer of its own, never in the caller's tensor
    assert out.dtype == x.dtype and out.shape == x.shape
    torch.testing.assert_close(out, _ref_token_quant(x, bits, clip, symmetric), rtol=0, atol=1e-12)
    assert bool((out[0, 0] == 0).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_activation_half_dtypes_match_reference(dtype):
    torch.manual_seed(3)
    x = (torch.randn(64, 128) * 3).to(dtype)
    out = fake_quantize_activation(x, ActQuantConfig(bits=4))
    assert out.dtype == dtype
    ref = _ref_token_quant(x, 4, 1.0, False).to(dtype)
    diff = (out.double() - ref.double()).abs()
    rounding = (out.double().abs() + ref.double().abs()) * torch.finfo(dtype).eps
    step = (x.double().amax(-1, keepdim=True).clamp(min=0) - x.double().amin(-1, keepdim=True).clamp(max=0)) / 15
    # Same code: only the final rounding to ``dtype`` may differ.
    same_code = diff <= rounding
    # fp32 vs fp64 arithmetic may flip a code (or a zero point) at an exact rounding tie — ties are common with
    # bf16 inputs; allow a handful out of 8192, each off by at most one step.
    assert (~same_code).sum().item() <= 4
    assert bool((diff <= step * (1 + 1e-6) + rounding).all())


def test_activation_4bit_has_at_most_16_levels_per_token():
    x = torch.randn(10, 256)
    out = fake_quantize_activation(x, ActQuantConfig(bits=4))
    for row in out:
        assert row.unique().numel() <= 16
    assert not torch.equal(out, x)


@pytest.mark.parametrize("bits", [16, 32])
def test_bits_16_is_identity(bits):
    x = torch.randn(4, 8, 32, dtype=torch.bfloat16)
    assert fake_quantize_activation(x, ActQuantConfig(bits=bits)) is x
    assert fake_quantize_kv(x.unsqueeze(0), bits) is not None
    assert torch.equal(fake_quantize_kv(x.unsqueeze(0), bits), x.unsqueeze(0))
    assert not ActQuantConfig().enabled


# ---------------------------------------------------------------------------------------------------- KV cache


def test_kv_per_head_per_token():
    torch.manual_seed(4)
    b, h, s, d = 2, 3, 5, 16
    x = torch.randn(b, h, s, d, dtype=torch.float64)
    out = fake_quantize_kv(x, 4, clip_ratio=0.95)
    assert out.shape == x.shape and out.dtype == x.dtype
    for i in range(b):
        for j in range(h):
            for t in range(s):
                ref = _ref_token_quant(x[i, j, t], 4, 0.95, False)
                torch.testing.assert_close(out[i, j, t], ref, rtol=0, atol=1e-12)
    # Independence: blowing up one head changes nothing in the others.
    x2 = x.clone()
    x2[:, 1] *= 100
    out2 = fake_quantize_kv(x2, 4, clip_ratio=0.95)
    assert torch.equal(out2[:, 0], out[:, 0]) and torch.equal(out2[:, 2], out[:, 2])


def test_kv_half_dtype_and_shape_errors():
    x = torch.randn(1, 2, 7, 8, dtype=torch.float16)
    out = fake_quantize_kv(x, 8)
    assert out.dtype == torch.float16 and out.shape == x.shape
    assert (out.float() - x.float()).abs().max() < 0.05
    with pytest.raises(ValueError, match="head_dim"):
        fake_quantize_kv(torch.randn(7, 8), 4)


# ---------------------------------------------------------------------------------------------------- MSE clip search

_SHRINKS = [1 - i / 100 for i in range(81)]  # 1.00 … 0.20, the candidate grid spelled out independently


def _ref_mse_clip(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force, one (row, group) at a time in fp64: the shrink p of the min/max range with the smallest
    Σ|Q(w) − w|^2.4, first (largest) p on ties. Returns scale, zero ``[out, G]``."""
    w = w.double()
    out_features, in_features = w.shape
    n_groups = 1 if group_size == -1 else in_features // group_size
    g = w.reshape(out_features, n_groups, -1)
    levels = 2**bits - 1
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, levels)
    scale = torch.zeros(out_features, n_groups, dtype=torch.float64)
    zero = torch.zeros_like(scale)
    for r in range(out_features):
        for j in range(n_groups):
            x = g[r, j]
            best = None
            for p in _SHRINKS:
                lo, hi = min(float(x.min()), 0.0) * p, max(float(x.max()), 0.0) * p
                if symmetric:
                    hi = max(hi, -lo)
                    lo = -hi
                if lo == 0 and hi == 0:
                    lo, hi = -1.0, 1.0
                s = (hi - lo) / levels
                z = 0.0 if symmetric else min(max(float(torch.round(torch.tensor(-lo / s, dtype=torch.float64))), 0), levels)
                q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
                e = float(((q - z) * s - x).abs().pow(2.4).sum())
                if best is None or e < best[0]:
                    best = (e, s, z)
            scale[r, j], zero[r, j] = best[1], best[2]
    return scale, zero


def _weights(kind: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        return torch.randn(rows, cols, generator=g, dtype=torch.float64)
    # heavy tails (Student-t, 2 dof) plus a planted outlier per row: where clipping pays most
    torch.manual_seed(seed)  # StudentT.sample takes no generator
    w = torch.distributions.StudentT(2.0).sample((rows, cols)).double()
    w[torch.arange(rows), torch.randint(0, cols, (rows,), generator=g)] *= 8
    return w


def _err24(w: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    """Σ |ŵ − w|^2.4 per row, fp64."""
    return (w_hat.double() - w.double()).abs().pow(2.4).sum(dim=1)


def test_mse_clip_candidates_are_quarots_grid():
    """81 shrinks, 1.00 down to 0.20 in steps of 0.01, largest first (the order decides ties)."""
    assert MSE_CLIP_SHRINKS == tuple(_SHRINKS) and len(_SHRINKS) == 81
    assert _SHRINKS[0] == 1.0 and abs(_SHRINKS[-1] - 0.2) < 1e-15


@pytest.mark.parametrize("kind", ["gauss", "heavy"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [-1, 16])
def test_mse_clip_matches_brute_force_fp64(kind, symmetric, group_size):
    torch.manual_seed(20)
    w = _weights(kind, 12, 64, seed=21)
    w[5] = 0.0  # all-zero row: every p ties, p = 1 kept
    w[7] = w[7].abs()  # all-positive row: the range still contains 0
    cfg = WeightQuantConfig(bits=4, group_size=group_size, symmetric=symmetric, mse_clip=True)
    scale, zero = weight_qparams(w, cfg)
    ref_scale, ref_zero = _ref_mse_clip(w, 4, group_size, symmetric)
    assert torch.equal(scale, ref_scale) and torch.equal(zero, ref_zero)
    # The search really moved away from min/max somewhere (else this test could not tell the two apart).
    plain, _ = weight_qparams(w, WeightQuantConfig(bits=4, group_size=group_size, symmetric=symmetric))
    assert bool((scale < plain).any())
    q, s2, z2 = quantize_weight(w, cfg)
    assert torch.equal(s2, scale) and torch.equal(z2, zero)
    qmin, qmax = code_range(4, symmetric)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_mse_clip_fp32_picks_the_fp64_candidate(symmetric, group_size):
    """fp32 weights are searched in fp32; the chosen candidate is the fp64 brute force's (adjacent candidates'
    scales differ by ≥ 1 %, so a 1e-5 relative match means the same p)."""
    w = _weights("heavy", 16, 128, seed=22).float()
    cfg = WeightQuantConfig(bits=3, group_size=group_size, symmetric=symmetric, mse_clip=True)
    scale, zero = weight_qparams(w, cfg)
    assert scale.dtype == torch.float32
    ref_scale, ref_zero = _ref_mse_clip(w, 3, group_size, symmetric)
    torch.testing.assert_close(scale.double(), ref_scale, rtol=1e-5, atol=0)
    assert torch.equal(zero.double(), ref_zero)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [-1, 16])
def test_mse_clip_never_worse_than_min_max(dtype, symmetric, group_size):
    w = torch.cat([_weights("gauss", 16, 64, seed=23), _weights("heavy", 16, 64, seed=24)]).to(dtype)
    base = WeightQuantConfig(bits=4, group_size=group_size, symmetric=symmetric)
    e_plain = _err24(w, fake_quantize_weight(w, base))
    e_mse = _err24(w, fake_quantize_weight(w, replace(base, mse_clip=True)))
    # p = 1 is a candidate, so per row (and per group) the search can only gain; fp32 search vs fp64 check and
    # the final rounding of ŵ to ``dtype`` leave a hair of slack.
    assert bool((e_mse <= e_plain * (1 + 1e-4)).all())
    assert float(e_mse.sum()) < 0.98 * float(e_plain.sum())  # and it does gain (observed 3–25 %)


def test_mse_clip_row_chunks_do_not_change_the_result(monkeypatch):
    """The search runs over row chunks to bound memory; chunking is invisible in the result."""
    import streamquant.quant.quantizers as qz

    w = _weights("heavy", 37, 96, seed=25).float()
    cfg = WeightQuantConfig(bits=4, group_size=32, symmetric=False, mse_clip=True)
    whole = weight_qparams(w, cfg)
    monkeypatch.setattr(qz, "_MSE_CHUNK_ELEMENTS", 5 * 96 * len(qz.MSE_CLIP_SHRINKS))  # 5 rows a chunk, the last short
    chunked = weight_qparams(w, cfg)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_mse_clip_composes_with_clip_ratio():
    """The search shrinks the already clipped range: p = 1 there is clip_ratio · max|w|, so no scale exceeds it."""
    w = _weights("gauss", 8, 64, seed=26)
    s_ratio, _ = weight_qparams(w, WeightQuantConfig(clip_ratio=0.9))
    s_both, _ = weight_qparams(w, WeightQuantConfig(clip_ratio=0.9, mse_clip=True))
    assert bool((s_both <= s_ratio).all())
    assert bool((s_both >= 0.2 * s_ratio * (1 - 1e-12)).all())
