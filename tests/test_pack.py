"""INT4 packing, checked bit for bit against the installed compressed-tensors (the loader vLLM/transformers use)."""
from __future__ import annotations

import pytest
import torch

from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.utils.helpers import calculate_qparams

from streamquant.quant.gptq import GPTQ
from streamquant.quant.pack import (
    compressed_tensors_weight_args,
    pack_int4,
    pack_zero_point,
    to_compressed_tensors,
    unpack_int4,
    unpack_zero_point,
)
from streamquant.quant.quantizers import WeightQuantConfig, dequantize_weight, quantize_weight

COLS = [1, 7, 8, 9, 31, 37, 128, 576]


def _scheme(cfg: WeightQuantConfig) -> QuantizationScheme:
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**compressed_tensors_weight_args(cfg)))


@pytest.mark.parametrize("cols", COLS)
def test_roundtrip_and_bit_exact_with_compressed_tensors(cols):
    torch.manual_seed(cols)
    q = torch.randint(-8, 8, (5, cols), dtype=torch.int8)
    q[0, 0], q[-1, -1] = -8, 7  # both extremes, incl. the sign bit of the top nibble
    p = pack_int4(q)
    assert p.dtype == torch.int32 and p.shape == (5, -(-cols // 8))
    assert torch.equal(unpack_int4(p, cols), q)
    assert torch.equal(p, pack_to_int32(q, 4))
    assert torch.equal(unpack_from_int32(p, 4, torch.Size([5, cols])), q)


def test_known_layout():
    """Value v is stored as nibble v + 8, least-significant nibble first; words are two's-complement int32."""
    q = torch.tensor([[-8, -7, 0, 7, 1, 2, 3, -1, -7, 0, 0, 0, 0, 0, 0, 7, 5]], dtype=torch.int8)
    p = pack_int4(q)
    assert p.shape == (1, 3)
    word0 = sum(n << (4 * i) for i, n in enumerate([0, 1, 8, 15, 9, 10, 11, 7]))  # top nibble 7: positive
    word1 = sum(n << (4 * i) for i, n in enumerate([1, 8, 8, 8, 8, 8, 8, 15]))  # top nibble 15: sign bit set
    assert p[0, 0].item() == word0
    assert p[0, 1].item() == word1 - 2**32
    assert p[0, 2].item() == 13  # 5 + 8, padding nibbles are 0


@pytest.mark.parametrize("rows", [1, 5, 8, 11, 64])
def test_zero_point_packing_matches_compressed_tensors(rows):
    torch.manual_seed(rows)
    z = torch.randint(-8, 8, (rows, 3), dtype=torch.int8)
    p = pack_zero_point(z)
    assert p.shape == (-(-rows // 8), 3)
    assert torch.equal(p, pack_to_int32(z, 4, packed_dim=0))
    assert torch.equal(unpack_zero_point(p, rows), z)
    assert torch.equal(unpack_from_int32(p, 4, torch.Size([rows, 3]), packed_dim=0), z)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([[8]], dtype=torch.int8))
    with pytest.raises(ValueError):
        pack_int4(torch.zeros(2, 3))
    with pytest.raises(ValueError):
        unpack_int4(torch.zeros(2, 3, dtype=torch.int32), 40)


def test_symmetric_grid_is_compressed_tensors_grid():
    """Our per-channel symmetric scale is the one compressed-tensors' own min-max qparams produce."""
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    _, scale, _ = quantize_weight(w, WeightQuantConfig())
    args = _scheme(WeightQuantConfig()).weights
    ct_scale, ct_zp = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), args)
    torch.testing.assert_close(scale, ct_scale, rtol=1e-6, atol=0)
    assert bool((ct_zp == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_linear_through_compressed_tensors(dtype, symmetric, group_size):
    """Our tensors → compressed-tensors' own decompressor → exactly our dequantized weight; and compressed-tensors'
    own compressor, fed our dequantized weight and qparams, produces exactly our tensors."""
    torch.manual_seed(1)
    out_f, in_f = 20, 96  # 20 rows: the packed zero point has a partial word
    w = torch.randn(out_f, in_f).to(dtype)
    cfg = WeightQuantConfig(bits=4, group_size=group_size, symmetric=symmetric)
    q, scale, zero = quantize_weight(w, cfg)
    ours = dequantize_weight(q, scale, zero, group_size)

    sd = to_compressed_tensors(q, scale, zero, cfg, w.shape)
    n_groups = 1 if group_size == -1 else in_f // group_size
    assert sd["weight_packed"].dtype == torch.int32 and sd["weight_packed"].shape == (out_f, in_f // 8)
    assert sd["weight_scale"].dtype == dtype and sd["weight_scale"].shape == (out_f, n_groups)
    assert sd["weight_shape"].dtype == torch.int64 and sd["weight_shape"].tolist() == [out_f, in_f]
    assert ("weight_zero_point" in sd) == (not symmetric)
    if not symmetric:
        assert sd["weight_zero_point"].dtype == torch.int32 and sd["weight_zero_point"].shape == (3, n_groups)
    scheme = _scheme(cfg)
    assert set(sd) == set(PackedQuantizationCompressor.compression_param_names(scheme))

    dec = PackedQuantizationCompressor.decompress(dict(sd), scheme)
    assert dec["weight"].dtype == dtype
    assert torch.equal(dec["weight"], ours)

    ct_in = {"weight": ours, "weight_scale": scale}
    if not symmetric:
        ct_in["weight_zero_point"] = (zero.float() - 8).to(torch.int8)  # compressed-tensors' signed zero point
    comp = PackedQuantizationCompressor.compress(ct_in, scheme)
    assert set(comp) == set(sd)
    for k in sd:
        assert torch.equal(comp[k], sd[k]), k


def test_gptq_result_exports():
    torch.manual_seed(2)
    x = torch.randn(256, 64) @ torch.randn(64, 64)
    w = torch.randn(16, 64).to(torch.bfloat16)
    cfg = WeightQuantConfig(bits=4, group_size=16, symmetric=False)
    g = GPTQ(64)
    g.add_batch(x)
    res = g.quantize(w, cfg, act_order=True)
    sd = to_compressed_tensors(res.q, res.scale, res.zero, cfg, w.shape)
    dec = PackedQuantizationCompressor.decompress(sd, _scheme(cfg))
    assert torch.equal(dec["weight"], res.weight)


def test_to_compressed_tensors_validation():
    w = torch.randn(8, 32)
    cfg = WeightQuantConfig()
    q, scale, zero = quantize_weight(w, cfg)
    with pytest.raises(ValueError, match="4-bit"):
        to_compressed_tensors(q, scale, zero, WeightQuantConfig(bits=3), w.shape)
    with pytest.raises(ValueError, match="weight_shape"):
        to_compressed_tensors(q, scale, zero, cfg, (8, 64))
    with pytest.raises(ValueError, match="outside"):
        to_compressed_tensors(q + 8, scale, zero, cfg, w.shape)
