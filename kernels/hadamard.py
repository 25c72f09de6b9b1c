"""Hadamard transforms for streamquant: one definition of the matrix, a fast way to apply it.

Convention (everywhere in streamquant): activations are row vectors and a transform of size ``n`` acts on the
last dim as ``y = x @ H`` with ``H`` the n×n orthonormal matrix (``H @ H.T = I``).

Definition of ``H`` for ``n = K · 2^k`` (see :func:`hadamard_factor` for how ``K`` is chosen)::

    H_n = (H_K ⊗ S_{2^k}) / sqrt(n)          S = Sylvester ±1 matrix, natural order: S[i, j] = (-1)^popcount(i & j)

``H_K`` is a ±1 Hadamard matrix from a fixed recipe (Sylvester, Paley I for a prime q ≡ 3 mod 4, Paley II for a
prime q ≡ 1 mod 4, each possibly ⊗ a Sylvester factor). When no recipe covers ``K`` (e.g. 172, which Llama-2-7B's
11008 = 172·64 needs) the ±1 block ``H_K / sqrt(K)`` is replaced by the K×K discrete Hartley matrix
``cas(2π·ij/K)/sqrt(K)`` — exactly orthogonal, closed form (no RNG, no LAPACK, so identical on every machine), and
with entries bounded by sqrt(2/K), i.e. nearly as spread out as a true Hadamard block.

The matrix fused offline (R4 into down_proj), the online transform, GPTQ calibration and the export must all use
this one definition (DESIGN.md §5). That is why the CUDA kernel ``fast_hadamard_transform`` is only ever used for
the power-of-two Sylvester part — its 12N/20N/28N/40N variants carry different K×K matrices — and the K×K factor
is always a small dense matmul with our own block.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = [
    "OnlineHadamard",
    "cuda_kernel_available",
    "hadamard_factor",
    "hadamard_matrix",
    "hadamard_transform",
    "has_hadamard_construction",
    "random_hadamard_matrix",
    "random_signs",
    "select_backend",
]

# Limits of fast_hadamard_transform.hadamard_transform: dim ≤ 32768. Below 8 it zero-pads (still correct for the
# Sylvester order, but pointless), so tiny factors stay on the torch path.
_CUDA_MAX_POW2 = 32768
_CUDA_MIN_POW2 = 8
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BACKENDS = ("torch", "fast_hadamard_transform")


# ----------------------------------------------------------------------------------------------------------------
# Small number theory and the ±1 constructions
# ----------------------------------------------------------------------------------------------------------------


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    d = 3
    while d * d <= q:
        if q % d == 0:
            return False
        d += 2
    return True


@functools.lru_cache(maxsize=None)
def _recipe(K: int) -> tuple[str, int, int] | None:
    """How the ±1 Hadamard matrix of order K is built: (kind, q, 2^j) meaning ``base(q) ⊗ S_{2^j}``, or None.

    Fixed search order (it *is* the definition, do not reorder): Sylvester for powers of two; otherwise the smallest
    j such that K/2^j is a Paley I order (q = K/2^j - 1 prime, q ≡ 3 mod 4), else a Paley II order
    (q = K/2^(j+1) - 1 prime, q ≡ 1 mod 4).
    """
    if K < 1:
        return None
    if _is_pow2(K):
        return ("sylvester", K, 1)
    j = 1
    while K % j == 0 and K // j >= 4:
        base = K // j
        if base % 4 == 0:
            q1 = base - 1
            if _is_prime(q1) and q1 % 4 == 3:
                return ("paley1", q1, j)
            q2 = base // 2 - 1
            if _is_prime(q2) and q2 % 4 == 1:
                return ("paley2", q2, j)
        j *= 2
    return None


def has_hadamard_construction(K: int) -> bool:
    """True if a ±1 Hadamard matrix of order K is constructed here (False -> the orthogonal Hartley fallback)."""
    return _recipe(int(K)) is not None


def _sylvester(m: int) -> torch.Tensor:
    """±1 Sylvester matrix of order m (power of two), natural order, fp64."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < m:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j - i) over GF(q), q prime; χ the quadratic character (Legendre symbol), χ(0) = 0."""
    chi = torch.full((q,), -1.0, dtype=torch.float64)
    chi[0] = 0.0
    squares = sorted({(x * x) % q for x in range(1, q)})
    chi[squares] = 1.0
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley1(q: int) -> torch.Tensor:
    """Paley I, order q + 1 (q prime ≡ 3 mod 4): H = I + S, S = [[0, 1ᵀ], [-1, Q]] skew with S Sᵀ = q I."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = _jacobsthal(q)
    return s + torch.eye(q + 1, dtype=torch.float64)


def _paley2(q: int) -> torch.Tensor:
    """Paley II, order 2(q + 1) (q prime ≡ 1 mod 4): C ⊗ [[1,-1],[-1,-1]] + I ⊗ [[1,1],[1,-1]], C symmetric conference."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 0] = 1.0
    c[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def _hartley(K: int) -> torch.Tensor:
    """Orthonormal K×K discrete Hartley matrix cas(2π·ij/K)/sqrt(K): the fallback block, closed form, deterministic."""
    idx = torch.arange(K, dtype=torch.int64)
    angle = (2.0 * math.pi / K) * ((idx[:, None] * idx[None, :]) % K).to(torch.float64)  # reduce mod K: exact args
    return (torch.cos(angle) + torch.sin(angle)) / math.sqrt(K)


@functools.lru_cache(maxsize=None)
def _pm1_block(K: int) -> torch.Tensor | None:
    """The ±1 Hadamard matrix of order K (fp64, CPU, read-only), or None if there is no recipe."""
    r = _recipe(K)
    if r is None:
        return None
    kind, q, j = r
    if kind == "sylvester":
        return _sylvester(q)
    base = _paley1(q) if kind == "paley1" else _paley2(q)
    return torch.kron(base, _sylvester(j)) if j > 1 else base


@functools.lru_cache(maxsize=None)
def _orthonormal_block(K: int) -> torch.Tensor:
    """The orthonormal K×K factor of every H with this K (fp64, CPU, read-only)."""
    pm1 = _pm1_block(K)
    return pm1 / math.sqrt(K) if pm1 is not None else _hartley(K)


@functools.lru_cache(maxsize=64)
def _block_t_on(K: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Transposed orthonormal K-block, cast and moved once per (dtype, device) so online use does no H2D copies."""
    return _orthonormal_block(K).t().contiguous().to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# Factorisation and the dense matrix
# ----------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def hadamard_factor(n: int) -> tuple[int, int]:
    """Split n = K · 2^k for H = H_K ⊗ S_{2^k}, returning (K, 2^k).

    K is odd(n)·2^j for the smallest j ≤ 2 with a ±1 construction (a Hadamard order > 2 is a multiple of 4, so
    odd·4 is the smallest that can exist): 576 -> (36, 16), 1536 -> (12, 128), 28672 -> (28, 1024). Without one,
    K = odd·2^min(2, k) with the Hartley block (11008 -> (172, 64)), so the split does not move if a construction
    for that K is added later. Powers of two -> (1, n).
    """
    if n < 1:
        raise ValueError(f"Hadamard size must be positive, got {n}")
    odd, twos = n, 0
    while odd % 2 == 0:
        odd //= 2
        twos += 1
    if odd == 1:
        return (1, n)
    for j in range(min(2, twos) + 1):
        K = odd << j
        if has_hadamard_construction(K):
            return (K, n // K)
    K = odd << min(2, twos)
    return (K, n // K)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal n×n matrix H = (H_K ⊗ S_{2^k}) / sqrt(n) used everywhere in streamquant (a fresh tensor).

    H_K is a ±1 Hadamard matrix from Sylvester / Paley I / Paley II (e.g. 12, 20, 28, 36, 40, 44, 60, 108, 140,
    148); for K without a construction here (e.g. 172) the factor is the orthonormal K×K Hartley matrix instead, so H
    is still exactly orthogonal but sqrt(n)·H is not ±1. Built in fp64 and cast once; deterministic, no global RNG.
    Cost is O(n²) memory: use :func:`hadamard_transform` to apply it.
    """
    K, m = hadamard_factor(n)
    pm1 = _pm1_block(K)
    if pm1 is not None:
        h = torch.kron(pm1, _sylvester(m)).mul_(1.0 / math.sqrt(n))
    else:
        h = torch.kron(_orthonormal_block(K), _sylvester(m)).mul_(1.0 / math.sqrt(m))
    return h if dtype == torch.float64 else h.to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Fast application
# ----------------------------------------------------------------------------------------------------------------


# Largest dense Sylvester block of the blocked FWHT; 64 measured fastest on CPU (2 threads) for m = 64 … 16384.
_FWHT_BLOCK = 64


def _fwht_radices(m: int) -> list[int]:
    """Split m = 2^k into as few near-equal power-of-two factors ≤ _FWHT_BLOCK as possible (1024 -> [32, 32])."""
    k = m.bit_length() - 1
    if k == 0:
        return []
    r = _FWHT_BLOCK.bit_length() - 1
    t = -(-k // r)
    return [1 << (k // t + (1 if i < k % t else 0)) for i in range(t)]


@functools.lru_cache(maxsize=64)
def _sylvester_on(b: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _sylvester(b).to(device=device, dtype=dtype)


def _fwht_torch(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform along the last dim (power of two): x @ S_m, natural order.

    Blocked FWHT: S_m = S_b1 ⊗ S_b2 ⊗ … (Sylvester is closed under ⊗), each b ≤ 64 applied to its own axis as a
    small dense matmul. Still O(n log n) (≤ 64·log2(m)/6 flops per element) and, measured on CPU, ~10× faster
    than log2(m) memory-bound radix-2 butterfly passes.
    """
    m = x.shape[-1]
    lead = x.shape[:-1]
    pre, post = 1, m
    for b in _fwht_radices(m):
        post //= b
        s = _sylvester_on(b, x.dtype, x.device)  # symmetric: S_bᵀ = S_b
        if post == 1:
            x = x.reshape(*lead, pre, b) @ s
        else:
            x = torch.matmul(s, x.reshape(*lead, pre, b, post))
        pre *= b
    return x.reshape(*lead, m)


def _cuda_fwht(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The CUDA kernel's plain power-of-two transform (its Sylvester matrix equals ours): x @ S_m · scale."""
    import fast_hadamard_transform

    return fast_hadamard_transform.hadamard_transform(x, scale)


@functools.lru_cache(maxsize=None)
def cuda_kernel_available() -> bool:
    """Whether fast_hadamard_transform imports (cached). Absent or broken installs just mean the torch path."""
    try:
        import fast_hadamard_transform  # noqa: F401
    except Exception:
        return False
    return True


def select_backend(
    n: int,
    device: torch.device | str,
    cuda_kernel_available: bool,
    *,
    dtype: torch.dtype | None = None,
) -> str:
    """'fast_hadamard_transform' or 'torch' for a transform of size n on ``device``.

    The CUDA kernel is used only on CUDA devices, when it imports, for the power-of-two factor 2^k of n with
    8 ≤ 2^k ≤ 32768 (its supported range without zero padding), and (if ``dtype`` is given) for fp32/fp16/bf16 —
    it has no fp64. The K×K factor never goes to its 12N/20N/28N/40N variants (different matrices than ours).
    """
    if torch.device(device).type != "cuda" or not cuda_kernel_available:
        return "torch"
    if dtype is not None and dtype not in _CUDA_DTYPES:
        return "torch"
    _, m = hadamard_factor(n)
    if not (_CUDA_MIN_POW2 <= m <= _CUDA_MAX_POW2):
        return "torch"
    return "fast_hadamard_transform"


def hadamard_transform(x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """x @ hadamard_matrix(x.shape[-1]) in O(n log n): FWHT on the 2^k factor, dense K×K matmul on the K factor.

    Any leading dims and float dtype; output has x's dtype and device. fp16/bf16 are computed in fp32 and rounded
    once. ``backend`` None picks via :func:`select_backend`; 'torch' or 'fast_hadamard_transform' force one.
    """
    if not x.is_floating_point():
        raise TypeError(f"hadamard_transform needs a float tensor, got {x.dtype}")
    n = x.shape[-1]
    K, m = hadamard_factor(n)
    if backend is None:
        backend = select_backend(n, x.device, cuda_kernel_available(), dtype=x.dtype)
    if backend not in _BACKENDS:
        raise ValueError(f"unknown Hadamard backend {backend!r}; expected one of {_BACKENDS}")
    out_dtype = x.dtype
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    lead = x.shape[:-1]

    if backend == "fast_hadamard_transform":
        # K == 1: hand half inputs straight to the kernel (fp32 accumulation inside, one rounding). Otherwise keep
        # the intermediate in fp32 so the K matmul does not see a rounded-to-half FWHT.
        xin = x if K == 1 else x.to(compute)
        y = _cuda_fwht(xin.reshape(*lead, K, m), 1.0 / math.sqrt(m))
    else:
        y = _fwht_torch(x.to(compute).reshape(*lead, K, m))
        if m > 1:
            y = y * (1.0 / math.sqrt(m))
    if K > 1:
        y = torch.matmul(_block_t_on(K, y.dtype, y.device), y)  # Y = H_Kᵀ X on the K axis
    return y.reshape(*lead, n).to(out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# Random Hadamard (R3 / R4)
# ----------------------------------------------------------------------------------------------------------------


def random_signs(n: int, seed: int) -> torch.Tensor:
    """±1 fp64 vector from a CPU torch.Generator seeded with ``seed``: the same signs on every device and run."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randint(0, 2, (n,), generator=g, dtype=torch.int64).to(torch.float64).mul_(2.0).sub_(1.0)


def random_hadamard_matrix(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """diag(random_signs(n, seed)) @ hadamard_matrix(n): orthonormal, deterministic per seed."""
    h = hadamard_matrix(n).mul_(random_signs(n, seed)[:, None])
    return h if dtype == torch.float64 else h.to(dtype)


class OnlineHadamard:
    """A (random) Hadamard applied at run time (R3 on Q/K, R4 on the down_proj input): x -> x @ matrix().

    ``seed`` None gives the plain hadamard_matrix(n); otherwise diag(random_signs(n, seed)) @ hadamard_matrix(n),
    applied as a sign flip followed by :func:`hadamard_transform` (CUDA kernel where :func:`select_backend` allows).
    """

    def __init__(self, n: int, seed: int | None) -> None:
        self.n = int(n)
        self.seed = None if seed is None else int(seed)
        self.signs: torch.Tensor | None = None if seed is None else random_signs(self.n, self.seed)
        self._signs_on: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The exact matrix this transform applies (fp64 built, cast once)."""
        if self.seed is None:
            return hadamard_matrix(self.n, dtype)
        return random_hadamard_matrix(self.n, self.seed, dtype)

    def _signs_for(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.dtype, x.device)
        s = self._signs_on.get(key)
        if s is None:
            s = self._signs_on[key] = self.signs.to(device=x.device, dtype=x.dtype)  # ±1: exact in any float
        return s

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.n:
            raise ValueError(f"OnlineHadamard of size {self.n} got last dim {x.shape[-1]}")
        if self.signs is not None:
            x = x * self._signs_for(x)
        return hadamard_transform(x)

    def __repr__(self) -> str:
        K, m = hadamard_factor(self.n)
        return f"OnlineHadamard(n={self.n}, seed={self.seed}, K={K}, m={m})"
