"""Tests for streamquant.kernels.hadamard against independent dense fp64 references.

References used here do not go through the module's construction code where it matters: the Sylvester part comes
from the bit formula S[i, j] = (-1)^popcount(i & j), the Hadamard property is checked directly (±1 entries and
H Hᵀ = n I), and the sign patterns of the small orders are pinned so the one shared definition cannot drift.
"""

from __future__ import annotations

import functools
import hashlib
import math
import sys

import numpy as np
import pytest
import torch

from streamquant.kernels import hadamard as hm
from streamquant.kernels.hadamard import (
    OnlineHadamard,
    cuda_kernel_available,
    hadamard_factor,
    hadamard_matrix,
    hadamard_transform,
    has_hadamard_construction,
    random_hadamard_matrix,
    random_signs,
    select_backend,
)

F64 = torch.float64
CONSTRUCTED_ORDERS = [1, 2, 4, 8, 12, 20, 24, 28, 36, 40, 44, 60, 76, 108, 140, 148]
MODEL_SIZES = [64, 128, 576, 768, 1536, 2048, 4096, 5120, 8192, 11008, 13824, 14336, 18944, 28672]


def sylvester_ref(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """±1 Sylvester entries (-1)^popcount(r & c), computed bitwise (independent of the module's recursion)."""
    v = rows[:, None].to(torch.int64) & cols[None, :].to(torch.int64)
    parity = torch.zeros_like(v)
    while bool(v.any()):
        parity ^= v & 1
        v = v >> 1
    return (1 - 2 * parity).to(F64)


def columns_ref(n: int, cols: torch.Tensor) -> torch.Tensor:
    """Selected columns of H_n = H_K ⊗ S_m / sqrt(m) (H_K orthonormal), without forming the n×n matrix."""
    K, m = hadamard_factor(n)
    hk = hadamard_matrix(K)
    a, b = cols // m, cols % m
    s = sylvester_ref(torch.arange(m), b) / math.sqrt(m)  # [m, c]
    return (hk[:, a][:, None, :] * s[None, :, :]).reshape(n, len(cols))  # row index i = a·m + b


def assert_orthonormal(h: torch.Tensor, tol: float = 1e-10) -> None:
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    assert (h @ h.T - eye).abs().max().item() < tol


def assert_pm1_scaled(h: torch.Tensor) -> None:
    """sqrt(n)·H has entries ±1 (up to the rounding of 1/sqrt(n))."""
    assert (h.abs() * math.sqrt(h.shape[0]) - 1).abs().max().item() < 1e-12


@functools.lru_cache(maxsize=None)
def sylvester_kron(m: int) -> torch.Tensor:
    """±1 Sylvester by repeated ⊗ [[1, 1], [1, -1]] (a second independent reference, fast for big m)."""
    h = torch.ones(1, 1, dtype=F64)
    while h.shape[0] < m:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=F64), h)
    return h


# ------------------------------------------------------------------------------------------------ factorisation


@pytest.mark.parametrize(
    "n, expected",
    [
        (576, (36, 16)),
        (1536, (12, 128)),
        (28672, (28, 1024)),
        (11008, (172, 64)),
        (13824, (108, 128)),
        (18944, (148, 128)),
        (14336, (28, 512)),
        (5120, (20, 256)),
        (768, (12, 64)),
        (1, (1, 1)),
        (64, (1, 64)),
        (4096, (1, 4096)),
        (2**16, (1, 2**16)),
        (7, (7, 1)),
        (6, (6, 1)),
    ],
)
def test_hadamard_factor_values(n: int, expected: tuple[int, int]) -> None:
    assert hadamard_factor(n) == expected
    K, m = hadamard_factor(n)
    assert K * m == n and m & (m - 1) == 0


def test_hadamard_factor_rejects_nonpositive() -> None:
    with pytest.raises(ValueError):
        hadamard_factor(0)


def test_has_construction() -> None:
    for K in CONSTRUCTED_ORDERS:
        assert has_hadamard_construction(K), K
    for K in [3, 5, 6, 7, 9, 10, 43, 86, 172]:
        assert not has_hadamard_construction(K), K


# ------------------------------------------------------------------------------------------------ the matrix


@pytest.mark.parametrize("K", CONSTRUCTED_ORDERS)
def test_constructed_orders_are_hadamard(K: int) -> None:
    h = hadamard_matrix(K)
    assert h.dtype == F64 and h.shape == (K, K)
    assert_orthonormal(h, 1e-12)
    assert_pm1_scaled(h)
    s = (h * math.sqrt(K)).round()
    assert torch.equal(s @ s.T, K * torch.eye(K, dtype=F64))  # exact integer Hadamard property


@pytest.mark.parametrize("m", [1, 2, 4, 8, 16, 64, 256])
def test_power_of_two_is_natural_order_sylvester(m: int) -> None:
    idx = torch.arange(m)
    ref = sylvester_ref(idx, idx)
    assert torch.equal(ref, sylvester_kron(m))  # the two references agree with each other
    assert (hadamard_matrix(m) - ref / math.sqrt(m)).abs().max().item() < 1e-15


@pytest.mark.parametrize("n", [24, 96, 576, 688, 1536, 172 * 4 * 4])
def test_kronecker_layout(n: int) -> None:
    K, m = hadamard_factor(n)
    idx = torch.arange(m)
    ref = torch.kron(hadamard_matrix(K), sylvester_ref(idx, idx) / math.sqrt(m))
    assert (hadamard_matrix(n) - ref).abs().max().item() < 1e-15
    assert (hadamard_matrix(n) - torch.kron(hadamard_matrix(K), hadamard_matrix(m))).abs().max().item() < 1e-15


# The sign patterns are part of the on-disk format (R4 is fused offline and re-applied online): pin them.
PINNED_SIGNS = {
    12: "d1026a5e7abe32ab",
    20: "feb437edd08fcdff",
    28: "ab081cc8394e7b11",
    36: "ac39d4bbba41c383",
    44: "78927e1dd2def240",
    148: "42a784339e271335",
}


@pytest.mark.parametrize("K", sorted(PINNED_SIGNS))
def test_sign_patterns_pinned(K: int) -> None:
    bits = (hadamard_matrix(K) > 0).to(torch.uint8).numpy().tobytes()
    assert hashlib.sha256(bits).hexdigest()[:16] == PINNED_SIGNS[K]


@pytest.mark.parametrize("K", [3, 6, 7, 43, 172])
def test_fallback_block_is_hartley(K: int) -> None:
    h = hadamard_matrix(K)
    assert_orthonormal(h, 1e-12)
    i = np.arange(K)
    ang = 2 * np.pi * np.outer(i, i) / K
    ref = (np.cos(ang) + np.sin(ang)) / np.sqrt(K)
    assert np.abs(h.numpy() - ref).max() < 1e-12
    assert h.abs().max().item() <= math.sqrt(2 / K) + 1e-12


def test_fallback_size_is_orthogonal_not_pm1() -> None:
    n = 172 * 4
    h = hadamard_matrix(n)
    assert_orthonormal(h)
    s = h * math.sqrt(n)
    assert (s - s.round()).abs().max().item() > 1e-3


def test_no_global_rng_use() -> None:
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    hadamard_matrix(172 * 8)
    random_hadamard_matrix(96, seed=5)
    OnlineHadamard(576, seed=9)(torch.ones(2, 576))
    assert torch.equal(torch.get_rng_state(), state)


def test_dtype_argument() -> None:
    for dt in (torch.float32, torch.bfloat16):
        h = hadamard_matrix(576, dt)
        assert h.dtype == dt
        assert torch.equal(h, hadamard_matrix(576).to(dt))


def test_returned_matrix_is_a_fresh_copy() -> None:
    h = hadamard_matrix(12)
    h.zero_()
    assert hadamard_matrix(12).abs().sum().item() > 0


@pytest.mark.parametrize("n", MODEL_SIZES)
def test_model_sizes(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    K, m = hadamard_factor(n)
    hk = hadamard_matrix(K)
    assert_orthonormal(hk, 1e-12)
    if has_hadamard_construction(K):
        assert_pm1_scaled(hk)
    else:
        assert n == 11008  # the only size here without a ±1 K block (172)

    # Orthogonality through the fast transform: inner products and norms are preserved.
    x = torch.randn(16, n, generator=gen, dtype=F64)
    y = hadamard_transform(x)
    assert y.dtype == F64 and y.shape == x.shape
    assert (y @ y.T - x @ x.T).abs().max().item() < 1e-9 * n

    # Agreement with the dense definition on a sample of columns (no n×n matrix needed).
    cols = torch.cat([torch.tensor([0, n - 1]), torch.randint(0, n, (62,), generator=gen)])
    ref = x @ columns_ref(n, cols)
    assert (y[:, cols] - ref).abs().max().item() < 1e-10

    if n <= 2048:  # the full matrix is cheap enough here (≤ 32 MiB)
        h = hadamard_matrix(n)
        if has_hadamard_construction(K):
            assert_pm1_scaled(h)
        rows = torch.randint(0, n, (64,), generator=gen)
        assert (h[rows] @ h.T - torch.eye(n, dtype=F64)[rows]).abs().max().item() < 1e-10
        assert (y - x @ h).abs().max().item() < 1e-10


# ------------------------------------------------------------------------------------------------ fast transform

TRANSFORM_SIZES = [1, 2, 3, 4, 6, 7, 8, 12, 20, 24, 28, 36, 40, 44, 48, 60, 96, 108, 140, 148, 172, 192, 576, 688,
                   1536, 2048, 4096, 5 * 1024]


@pytest.mark.parametrize("n", TRANSFORM_SIZES)
def test_transform_matches_dense_fp64(n: int) -> None:
    x = torch.randn(2, 3, n, generator=torch.Generator().manual_seed(n), dtype=F64)
    y = hadamard_transform(x)
    assert y.shape == x.shape and y.dtype == F64
    assert (y - x @ hadamard_matrix(n)).abs().max().item() < 1e-10


@pytest.mark.parametrize("n", [64, 576, 1536, 688])
def test_transform_float32_and_half(n: int) -> None:
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(0), dtype=F64)
    ref = x @ hadamard_matrix(n)
    y32 = hadamard_transform(x.float())
    assert y32.dtype == torch.float32
    assert ((y32.double() - ref).norm() / ref.norm()).item() < 1e-5
    for dt, tol in ((torch.float16, 2e-3), (torch.bfloat16, 1e-2)):
        xh = x.to(dt)
        yh = hadamard_transform(xh)
        assert yh.dtype == dt
        ref_h = xh.double() @ hadamard_matrix(n)  # same rounded input: only output rounding remains
        assert ((yh.double() - ref_h).norm() / ref_h.norm()).item() < tol


def test_transform_noncontiguous_and_empty() -> None:
    n = 576
    x = torch.randn(n, 7, dtype=F64).T  # non-contiguous [7, n] view
    assert (hadamard_transform(x) - x @ hadamard_matrix(n)).abs().max().item() < 1e-10
    e = torch.empty(0, 4, n)
    assert hadamard_transform(e).shape == e.shape


def test_transform_rejects_bad_inputs() -> None:
    with pytest.raises(TypeError):
        hadamard_transform(torch.ones(4, 8, dtype=torch.int64))
    with pytest.raises(ValueError):
        hadamard_transform(torch.ones(4, 8), backend="nope")


# ------------------------------------------------------------------------------------------------ random Hadamard


def test_random_signs() -> None:
    s = random_signs(1000, seed=3)
    assert s.dtype == F64 and s.shape == (1000,)
    assert torch.all(s.abs() == 1)
    assert 300 < int((s > 0).sum()) < 700
    assert torch.equal(s, random_signs(1000, seed=3))
    assert not torch.equal(s, random_signs(1000, seed=4))


@pytest.mark.parametrize("n", [12, 64, 576, 688])
def test_random_hadamard_matrix(n: int) -> None:
    h = random_hadamard_matrix(n, seed=7)
    assert_orthonormal(h)
    assert torch.equal(h, random_hadamard_matrix(n, seed=7))
    assert not torch.equal(h, random_hadamard_matrix(n, seed=8))
    assert (h - torch.diag(random_signs(n, 7)) @ hadamard_matrix(n)).abs().max().item() < 1e-15
    assert random_hadamard_matrix(n, seed=7, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("n", [64, 576, 688, 1536])
@pytest.mark.parametrize("seed", [None, 0, 11])
def test_online_hadamard(n: int, seed: int | None) -> None:
    t = OnlineHadamard(n, seed)
    assert t.n == n and t.seed == seed
    if seed is None:
        assert t.signs is None
        assert torch.equal(t.matrix(), hadamard_matrix(n))
    else:
        assert torch.equal(t.signs, random_signs(n, seed))
        assert torch.equal(t.matrix(), random_hadamard_matrix(n, seed))
    x = torch.randn(3, 4, n, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert (t(x) - x @ t.matrix()).abs().max().item() < 1e-10
    y32 = t(x.float())
    assert y32.dtype == torch.float32
    assert ((y32.double() - x @ t.matrix()).norm() / x.norm()).item() < 1e-5
    with pytest.raises(ValueError):
        t(torch.ones(2, n + 1))


# ------------------------------------------------------------------------------------------------ backend choice


def test_select_backend_rule() -> None:
    fast, plain = "fast_hadamard_transform", "torch"
    assert select_backend(4096, "cuda", True) == fast
    assert select_backend(4096, torch.device("cuda:0"), True) == fast
    assert select_backend(576, "cuda", True) == fast  # 36 × 16: kernel for the 16, our dense 36×36 for K
    assert select_backend(28672, "cuda", True) == fast  # 28 × 1024
    assert select_backend(2**15, "cuda", True) == fast
    assert select_backend(2**16, "cuda", True) == plain  # beyond the kernel's 32768
    assert select_backend(12, "cuda", True) == plain  # power-of-two part 1: nothing for the kernel to do
    assert select_backend(4096, "cuda", False) == plain
    for dev in ("cpu", torch.device("cpu"), "meta"):
        for n in (4096, 576, 2**16):
            assert select_backend(n, dev, True) == plain
            assert select_backend(n, dev, False) == plain
    assert select_backend(4096, "cuda", True, dtype=torch.float64) == plain  # kernel has no fp64
    assert select_backend(4096, "cuda", True, dtype=torch.bfloat16) == fast


def test_cuda_kernel_available_without_package(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(cuda_kernel_available(), bool)
    monkeypatch.setitem(sys.modules, "fast_hadamard_transform", None)  # makes the import fail
    hm.cuda_kernel_available.cache_clear()
    try:
        assert cuda_kernel_available() is False
    finally:
        hm.cuda_kernel_available.cache_clear()


def _fake_kernel(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Stand-in for fast_hadamard_transform.hadamard_transform with its documented contract: x @ S_m · scale."""
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16)
    m = x.shape[-1]
    assert 8 <= m <= 32768
    return (x.double() @ sylvester_kron(m) * scale).to(x.dtype)


@pytest.mark.parametrize("n", [576, 1536, 4096, 172 * 64])
def test_kernel_dispatch_composition(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """The kernel path (reshape, scale, K×K matmul) gives the torch path's result; runs on CPU via a fake kernel."""
    monkeypatch.setattr(hm, "_cuda_fwht", _fake_kernel)
    x = torch.randn(2, 3, n, generator=torch.Generator().manual_seed(2))
    ref = hadamard_transform(x.double(), backend="torch")
    y = hadamard_transform(x, backend="fast_hadamard_transform")
    assert y.dtype == torch.float32
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5
    yh = hadamard_transform(x.half(), backend="fast_hadamard_transform")
    assert yh.dtype == torch.float16
    assert ((yh.double() - ref).norm() / ref.norm()).item() < 2e-3


@pytest.mark.skipif(
    not (torch.cuda.is_available() and cuda_kernel_available()),
    reason="needs a CUDA device and the fast_hadamard_transform package",
)
@pytest.mark.parametrize("n", [64, 576, 1536, 4096, 11008, 14336, 28672, 2**15])
def test_cuda_kernel_matches_torch_path(n: int) -> None:
    assert select_backend(n, "cuda", True) == "fast_hadamard_transform"
    x = torch.randn(8, n, generator=torch.Generator().manual_seed(n), dtype=F64)
    ref = hadamard_transform(x)  # CPU fp64
    xc = x.to("cuda")
    for dt, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)):
        y_kernel = hadamard_transform(xc.to(dt))  # auto -> kernel
        y_torch = hadamard_transform(xc.to(dt), backend="torch")
        assert y_kernel.dtype == dt and y_kernel.device == xc.device
        for y in (y_kernel, y_torch):
            assert ((y.double().cpu() - ref).norm() / ref.norm()).item() < tol
    t = OnlineHadamard(n, seed=3)
    y = t(xc.float()).double().cpu()
    assert ((y - x @ t.matrix()).norm() / x.norm()).item() < 1e-5
