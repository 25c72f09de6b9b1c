"""DartQuant rotation learning: Whip loss + QR-Orth (arXiv 2511.04063, DESIGN.md §1).

Convention: activations are row vectors and the rotated activation is ``x @ R`` with ``R`` orthonormal (n × n).

The learning problem is *rotational distribution calibration*: find an orthonormal ``R`` such that the rows of
``X @ R`` look uniform rather than Laplace-like (few outliers), which suits uniform INT4 quantization.

* :func:`whip_loss` — ``mean_tokens Σ_i exp(-|y_i|)``. Rotations preserve ‖y‖, so pushing small values away
  from zero (where the gradient of exp(-|y|) is largest) forces the outliers to shrink.
* :func:`qr_orth` — the parameterisation: an unconstrained latent ``Z`` is mapped to ``R = Q`` of ``QR(Z)``;
  plain SGD/Adam on ``Z`` then never leaves the orthogonal group and needs no manifold optimizer.
* :func:`cayley_sgd_step` — the baseline the paper compares against (Cayley SGD with momentum on the Stiefel
  manifold, as used by SpinQuant); only the benchmark and tests use it.
* :func:`train_rotation`, :func:`train_r1`, :func:`train_r2` — the training loops the pipeline calls.

Defaults and why (see :class:`RotationTrainConfig`, :data:`R1_CONFIG`, :data:`R2_CONFIG`): the reference code's
SGD, lr 1e-3, momentum 0.9, 10 epochs over a fresh random 10 % subset, R1 in 10 steps per epoch (R2: 5 epochs,
batch 128). The Whip loss is kept as the paper's sum over channels: dL/dR_ji = mean_t x_tj·(-sign(y_ti) e^-|y_ti|)
does not grow with n, while the entries of R shrink as 1/sqrt(n), so lr 1e-3 is a larger *relative* step at large
n — measured fine:
  * n=576, 65 536 synthetic post-norm rows (Laplace + 4 massive-activation channels), batch 64 (1030 steps):
    whip 285.6 -> 262.6 (most of it in epoch 1), pooled excess kurtosis -0.80 -> -0.98; batch 1024 (70 steps): 262.5;
  * n=64, R2_CONFIG (260 steps): 31.3 -> 28.5; n=4096, batch 256, 70 steps: 2143 -> 2063, still falling.
Caveats: (1) the reference counts a *batch* in whole 2048-token sequences (~131 k rows per step, ~130 steps in all);
here a sample is one token row, so ``batch_size`` counts rows and a run makes epochs·ceil(fraction·N/batch_size)
steps. Each step costs one n×n QR (~n³), which dominates at large n, so R1 fixes the step count instead
(``batches_per_epoch``): its batch grows with the reservoir (the n=576 numbers above show batch 1024 matches batch 64
with 15× fewer steps).
(2) When outliers are zero-mean, axis-aligned channels, a random Hadamard already spreads them perfectly and
training barely moves the loss; same-sign massive activations (as in real LLMs) and correlated channels are where a
learned rotation wins. (3) Whip is scale-dependent: it is meant for RMS≈1 rows (σ-free RMSNorm outputs); o_proj
inputs for R2 are used as they are, like the reference does.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "whip_loss",
    "qr_orth",
    "cayley_sgd_step",
    "RotationTrainConfig",
    "RotationTrainResult",
    "train_rotation",
    "train_rotations",
    "train_r1",
    "train_r2",
    "R1_CONFIG",
    "R2_CONFIG",
]


# ---------------------------------------------------------------------------------------------------------------
# Loss and parameterisation
# ---------------------------------------------------------------------------------------------------------------


def whip_loss(x: Tensor) -> Tensor:
    """Whip loss as the paper defines it: Σ_i exp(-|x_i|) over the last dim, averaged over all leading dims.

    Its value (and the gradient of a whole rotation) grows with the width n; callers compare losses at one n only.
    """
    return torch.exp(-x.abs()).sum(dim=-1).mean()


def qr_orth(z: Tensor) -> Tensor:
    """Orthonormal ``Q`` of ``QR(z)`` with column signs fixed so that ``diag(R_qr) > 0``.

    Householder QR leaves the sign of each column of Q arbitrary; flipping the columns whose triangular diagonal is
    negative makes the factorisation unique, so Q is a continuous function of z (small steps on the latent give
    small rotations) and ``qr_orth(Q) == Q`` for an orthogonal Q (a Hadamard init is reproduced exactly).
    sign(0) is taken as +1. Works on batched ``[..., n, n]`` input; autograd flows through ``torch.linalg.qr``.
    """
    q, r = torch.linalg.qr(z)
    d = torch.diagonal(r, dim1=-2, dim2=-1)
    sign = torch.where(d < 0, -torch.ones_like(d), torch.ones_like(d))
    return q * sign.unsqueeze(-2)


def cayley_sgd_step(
    x: Tensor,
    grad: Tensor,
    momentum_buf: Tensor | None,
    lr: float,
    momentum: float = 0.9,
    q: float = 0.5,
    iters: int = 2,
) -> tuple[Tensor, Tensor]:
    """One Cayley-SGD-with-momentum step on the Stiefel manifold (Li et al., ICLR 2020; SpinQuant's optimizer).

    ``x`` is [n, p] with orthonormal columns, ``grad`` the Euclidean gradient dL/dx. Returns (new x, new momentum).
    The Cayley transform is approximated by ``iters`` fixed-point iterations, as in the reference implementation,
    so x stays orthonormal only up to a small drift. Cost for square x: ~5 extra n×n matmuls per step (plus the
    skew-matrix products) versus one QR for QR-Orth — that is what the benchmark compares.
    """
    m = -grad if momentum_buf is None else momentum * momentum_buf - grad
    w_hat = m @ x.T - 0.5 * x @ ((x.T @ m) @ x.T)
    w = w_hat - w_hat.T  # skew-symmetric generator
    m = w @ x  # momentum projected on the tangent space
    alpha = min(lr, 2.0 * q / (torch.linalg.matrix_norm(w).item() + 1e-8))
    y = x + alpha * m
    for _ in range(iters):
        y = x + (alpha / 2.0) * (w @ (x + y))
    return y, m


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RotationTrainConfig:
    """Hyper-parameters of one rotation fit.

    ``batch_size`` counts token rows per optimizer step; ``sample_fraction`` is the random share of rows visited per
    epoch (fresh subset every epoch, as in the reference code); ``max_steps`` caps the total number of steps.
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    momentum: float = 0.9
    optimizer: str = "sgd"  # "sgd" | "adam"
    sample_fraction: float = 0.1
    seed: int = 0
    max_steps: int | None = None
    batches_per_epoch: int | None = None   # when set, batch_size = ceil(rows per epoch / this): a fixed step count
    # with batches_per_epoch: lr is the step for batch_size rows and grows with the batch actually taken (the linear
    # scaling rule), so fewer, larger steps travel about as far over the same epochs as many small ones; the batch
    # is then never below batch_size (rows too few for the fixed count take fewer steps of batch_size, as without it)
    scale_lr: bool = False
    eval_rows: int = 65536   # init/final loss over at most this many evenly strided rows per fit (they are reported)


@dataclass
class RotationTrainResult:
    """Outcome of one fit. ``init_loss``/``final_loss`` are the whip loss of the same evaluation rows (all rows, or
    an evenly strided subset of at most ``eval_rows`` of the config) under the init and the final rotation, so they
    compare."""

    rotation: Tensor  # float64, orthonormal, on CPU
    loss_history: list[float] = field(default_factory=list)  # mean training whip loss per epoch
    init_loss: float = math.nan
    final_loss: float = math.nan
    steps: int = 0
    seconds: float = 0.0


# R1 takes the reference's ~100 large steps: 10 per epoch (SmolLM2: 100 steps of ~1,160 rows). Each step is one
# n×n QR, so the 1,820 steps of 64 rows it took before cost SmolLM2 47–70 s, against ~11 s now. On the quality
# protocol (benchmarks/RESULTS.md) the large steps measured W4A4 GPTQ 43.91 PPL against 46.05 (QuaRot 48.97), W4A4
# RTN 144.5 (QuaRot 219.8), and W4A16 GPTQ within noise of the small steps (29.97 against 29.62, asymmetric).
# The reported init/final losses are estimates over 8,192 evenly strided reservoir rows (every layer and side):
# over 65,536 the two evaluations cost SmolLM2 ~0.9 s of its ~6 s R1 stage, for a number only report.json reads.
R1_CONFIG = RotationTrainConfig(epochs=10, batch_size=64, batches_per_epoch=10, eval_rows=8192)
# R2 likewise takes a fixed 8 steps per epoch, its lr 1e-3 scaled with the batch, so the same epochs travel about as
# far: SmolLM2 at 16 × 512 (8,192 token rows, 24,576 head rows per KV head) takes 40 steps of ~308 rows at lr 2.4e-3
# instead of 100 of 128 at 1e-3; on its o_proj inputs (every third layer) the whip loss falls to 0.986 of the
# Hadamard init's against 0.985, in 0.065 s per layer instead of 0.117 (benchmarks/r2_steps.py, RESULTS.md "R2 in
# fewer steps"). A calibration set too small for 8 batches of 128 rows takes fewer steps of 128, as before.
R2_CONFIG = RotationTrainConfig(epochs=5, batch_size=128, batches_per_epoch=8, scale_lr=True, eval_rows=8192)

_EVAL_CHUNK = 8192


@torch.no_grad()
def _eval_whip(samples: Tensor, rotation: Tensor, device: torch.device, max_rows: int) -> float:
    """Whip loss of ``samples @ rotation`` over at most max_rows evenly strided rows, computed in fp32 chunks."""
    n_rows = samples.shape[0]
    idx = torch.arange(n_rows) if n_rows <= max_rows else torch.linspace(0, n_rows - 1, max_rows).long()
    r = rotation.to(device=device, dtype=torch.float32)
    total = 0.0
    for start in range(0, idx.numel(), _EVAL_CHUNK):
        chunk = samples.index_select(0, idx[start : start + _EVAL_CHUNK]).to(device=device, dtype=torch.float32)
        total += torch.exp(-(chunk @ r).abs()).sum().item()
    return total / idx.numel()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_rotation(
    samples: Tensor,
    init: Tensor,
    cfg: RotationTrainConfig,
    device: torch.device | str | None = None,
    log: Callable[[str], None] | None = None,
) -> RotationTrainResult:
    """Fit an orthonormal R minimising ``whip_loss(samples @ R)`` with QR-Orth, starting from ``init``.

    ``samples`` [N, n] stays where it is (e.g. pinned host memory); each minibatch is gathered and moved to
    ``device`` (default: the samples' device) as fp32. The trainable latent Z starts at ``init`` (fp32); every step
    uses ``R = qr_orth(Z)``. Subset and minibatch order come from a private ``torch.Generator(cfg.seed)``, so a run
    on CPU is deterministic and leaves the global RNG alone. The returned rotation is ``qr_orth(Z.double())`` — the
    float64 QR re-orthonormalises, so R is orthonormal to ~1e-12 whatever fp32 drift Z had.
    """
    if samples.dim() != 2 or init.shape != (samples.shape[1], samples.shape[1]):
        raise ValueError(f"need samples [N, n] and init [n, n], got {tuple(samples.shape)} and {tuple(init.shape)}")
    return train_rotations(samples[None], init[None], cfg, [cfg.seed], device=device, log=log)[0]


def train_rotations(
    samples: Tensor,
    init: Tensor,
    cfg: RotationTrainConfig,
    seeds: list[int],
    device: torch.device | str | None = None,
    log: Callable[[str], None] | None = None,
) -> list[RotationTrainResult]:
    """G independent fits at once: ``samples`` [G, N, n], ``init`` [G, n, n], fit g drawing its rows with
    ``torch.Generator(seeds[g])``. Each optimizer step is one batched QR and one batched matmul for all G, and the
    loss is the sum of the G Whip losses, so fit g's gradient (and its SGD/Adam update, which are elementwise) is
    its own: the result is fit g alone, in G times fewer steps (R2 has one fit per KV head and layer).
    """
    if samples.dim() != 3 or init.shape != (samples.shape[0], samples.shape[2], samples.shape[2]):
        raise ValueError(f"need samples [G, N, n] and init [G, n, n], got {tuple(samples.shape)} and "
                         f"{tuple(init.shape)}")
    if cfg.batch_size < 1 or not 0.0 < cfg.sample_fraction <= 1.0 or len(seeds) != samples.shape[0]:
        raise ValueError(f"bad config {cfg} for {samples.shape[0]} fits with seeds {seeds}")
    dev = torch.device(device) if device is not None else samples.device
    t0 = time.perf_counter()

    fits, n_rows = samples.shape[0], samples.shape[1]
    per_epoch = min(n_rows, max(cfg.batch_size, round(n_rows * cfg.sample_fraction)))
    if cfg.batches_per_epoch:
        batch = -(-per_epoch // cfg.batches_per_epoch)
        if cfg.scale_lr:   # never a smaller batch (and step) than the base one: few rows take fewer steps instead
            batch = max(batch, cfg.batch_size)
            cfg = replace(cfg, lr=cfg.lr * batch / cfg.batch_size)
        cfg = replace(cfg, batch_size=max(1, batch))
    gens = [torch.Generator().manual_seed(seed) for seed in seeds]
    init_loss = [_eval_whip(samples[g], init[g], dev, cfg.eval_rows) for g in range(fits)]

    z = init.detach().to(device=dev, dtype=torch.float32).clone().requires_grad_(True)
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD([z], lr=cfg.lr, momentum=cfg.momentum)
    elif cfg.optimizer == "adam":
        opt = torch.optim.Adam([z], lr=cfg.lr)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r} (sgd | adam)")

    history: list[Tensor] = []   # per epoch: each fit's mean training loss [G]
    steps = 0
    for epoch in range(cfg.epochs):
        if cfg.max_steps is not None and steps >= cfg.max_steps:
            break
        subsets = torch.stack([torch.randperm(n_rows, generator=gen)[:per_epoch] for gen in gens])
        epoch_losses, steps = _epoch(samples, subsets, z, opt, cfg, dev, steps)
        if epoch_losses:
            history.append(torch.stack(epoch_losses).mean(0))
            if log is not None:
                n, whip = init.shape[-1], history[-1].sum().item()
                log(f"rotation n={n} epoch {epoch + 1}/{cfg.epochs}: whip {whip:.4f} ({steps} steps)")

    with torch.no_grad():
        rotations = qr_orth(z.detach().double()).cpu()
    results = [RotationTrainResult(rotation=rotations[g], loss_history=[float(h[g]) for h in history],
                                   init_loss=init_loss[g],
                                   final_loss=_eval_whip(samples[g], rotations[g], dev, cfg.eval_rows),
                                   steps=steps) for g in range(fits)]
    _sync(dev)
    for r in results:
        r.seconds = time.perf_counter() - t0
    return results


def _epoch(samples: Tensor, subsets: Tensor, z: Tensor, opt: torch.optim.Optimizer, cfg: RotationTrainConfig,
           dev: torch.device, steps: int) -> tuple[list[Tensor], int]:
    """One pass over this epoch's rows of every fit ([G, rows] in ``subsets``) in minibatches (stopping at
    cfg.max_steps); returns the batch losses [G] per step and the step count so far."""
    losses: list[Tensor] = []
    fit = torch.arange(samples.shape[0])[:, None]
    for start in range(0, subsets.shape[1], cfg.batch_size):
        if cfg.max_steps is not None and steps >= cfg.max_steps:
            break
        batch = samples[fit, subsets[:, start : start + cfg.batch_size]]
        batch = batch.to(device=dev, dtype=torch.float32, non_blocking=True)
        loss = torch.exp(-(batch @ qr_orth(z)).abs()).sum(dim=-1).mean(dim=-1)   # whip_loss of each fit: [G]
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        losses.append(loss.detach())
        steps += 1
    return losses, steps


def train_r1(
    samples: Tensor,
    n: int,
    cfg: RotationTrainConfig,
    seed: int,
    device: torch.device | str | None = None,
    log: Callable[[str], None] | None = None,
) -> RotationTrainResult:
    """Learn R1 (hidden × hidden) on normalised block inputs, starting from ``random_hadamard_matrix(n, seed)``."""
    from streamquant.kernels.hadamard import random_hadamard_matrix

    return train_rotation(samples, random_hadamard_matrix(n, seed), cfg, device=device, log=log)


def train_r2(
    samples: Tensor,
    num_kv_heads: int,
    head_dim: int,
    heads_per_group: int,
    cfg: RotationTrainConfig,
    seed: int,
    device: torch.device | str | None = None,
    log: Callable[[str], None] | None = None,
) -> list[RotationTrainResult]:
    """Learn one R2 (head_dim × head_dim) per KV head from o_proj inputs ``[N, num_heads * head_dim]``.

    Query head h belongs to KV head ``h // heads_per_group``; R2 of group g sits on the output of v-head g and is
    shared by its query heads, so it is fitted on their stacked head vectors ``[N * heads_per_group, head_dim]``.
    Group g starts from ``random_hadamard_matrix(head_dim, seed + g)`` and uses minibatch seed ``cfg.seed + g``;
    each group's fit sees only its own columns, so the groups are independent and train together
    (:func:`train_rotations`: one batched step for all KV heads).
    """
    from streamquant.kernels.hadamard import random_hadamard_matrix

    num_heads = num_kv_heads * heads_per_group
    if samples.dim() != 2 or samples.shape[1] != num_heads * head_dim:
        raise ValueError(f"need o_proj inputs [N, {num_heads * head_dim}], got {tuple(samples.shape)}")
    # [G, N * hpg, head_dim], token-major: the hpg heads of a token are adjacent rows of their group
    rows = samples.view(samples.shape[0], num_kv_heads, heads_per_group * head_dim).transpose(0, 1)
    rows = rows.reshape(num_kv_heads, -1, head_dim)
    init = torch.stack([random_hadamard_matrix(head_dim, seed + g) for g in range(num_kv_heads)])
    sub_log = None if log is None else (lambda msg: log(f"R2 ({num_kv_heads} kv-heads): {msg}"))
    return train_rotations(rows, init, cfg, [cfg.seed + g for g in range(num_kv_heads)], device=device, log=sub_log)
