"""GPTQ (Frantar et al., 2022): quantize a Linear's weight column by column, pushing each column's rounding error
onto the not-yet-quantized columns through the inverse Hessian of the layer's reconstruction loss.

Reads top to bottom like the IST-DASLab reference (``gptq.py``: ``add_batch`` then ``fasterquant``), with these
deliberate choices:

* The grid is the one of ``quantizers.py`` (``qparams_from_minmax`` / ``quantize_to_grid`` /
  ``dequantize_from_grid``), so GPTQ codes and RTN codes mean the same thing and export the same way. Scales are
  rounded up to the weight's dtype before any code is chosen, so the exported scale is the one GPTQ used.
* ``H = 2/N Σ x xᵀ`` where N counts token rows (the reference counts sequences; the scalar does not change the
  result because dampening is relative, only the reported loss). ``add_batch`` accumulates the plain sum
  ``Σ x xᵀ`` and ``quantize`` divides once, instead of the reference's running mean rescaled at every batch.
  Only the blocks on and above the diagonal are summed (``H`` is symmetric): ~0.6 of the multiply-adds of a full
  ``xᵀx``, which on a CPU cost about as much as the block's own forward; the lower triangle is mirrored once.
* Dead inputs (``H_ii = 0``): ``H_ii = 1`` and ``W[:, i] = 0`` *before* the per-channel grid is computed, so weights
  that never see an input do not stretch the grid.
* Dynamic groups (no act_order) take their scale/zero from the fully updated weights when the scan reaches the
  group's first column. To make "fully updated" true, ``block_size`` is rounded to a multiple of ``group_size`` so
  a group never straddles two lazy-update blocks (the reference reads the group from the not-yet-block-updated
  matrix when group and block boundaries disagree).
* ``act_order`` with a group size implies ``static_groups``: groups are the contiguous column ranges of the
  *original* order and their scale/zero come from the original weight up front, so the result uses the plain
  ``[out, in/g]`` scale layout that ``pack-quantized`` stores, and ``g_idx`` is None.
* Within a lazy-update block each column gathers the errors of the block's earlier columns when it is reached (a
  matrix-vector product) instead of every later column of the block being rewritten at every step.
* Targets (``GPTQ(n, targets=True)``, ``add_batch(x, t)``): the objective becomes ``‖W T − Ŵ X‖²``, the output the
  Linear would give on inputs ``t`` (its input before the activation quantizer) from the inputs ``x`` it gets: the
  objective of GPTAQ's asymmetric calibration (Li et al., 2025), reached another way. GPTAQ carries a second update
  matrix through the scan; here the scan starts from the least-squares optimum of that objective
  (``_toward_targets``), after which GPTQ's own updates keep the unquantized columns optimal for it: one solve up
  front, the scan unchanged (tested against a dense fp64 least-squares solve).
* Refitted scales (``refit_rounds``, not in the reference): the scan picks codes for scales fixed before it sees
  them (up front, or at a group's first column), but ``ŵ`` is linear in the scales, so after the scan each row's
  scales are refitted to its codes by least squares under the scan's own objective (a G×G system per row), and
  further rounds scan again on the refitted grid; a row takes a round's result only where its loss falls.
* Not in the reference: if the damped Hessian is not positive definite, dampening is raised (up to three times)
  before a ValueError; ``free_hessian=True`` lets the working copy reuse the Hessian's memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .quantizers import (
    WeightQuantConfig,
    code_dtype,
    dequantize_from_grid,
    dequantize_weight,
    quantize_to_grid,
    weight_qparams,
)

__all__ = ["GPTQ", "GPTQResult"]

log = logging.getLogger(__name__)

_DAMP_RETRIES = 3  # retries use max(damp, 1e-3) · 10, · 100, · 1000
# Width of the block rows of Σ x xᵀ that add_batch sums: narrower skips more of the lower triangle, wider keeps each
# matmul large. 192 measured fastest on the idle 2-core CPU for widths 576 and 1536 (8192 rows: 0.029 → 0.022 s and
# 0.208 → 0.132 s against one full addmm); a 70B-shaped scale-4 block's GPTQ stage went 43–46 → 40–41 s.
_GRAM_BLOCK = 192
# The most floats the scale refit's G×G systems, or its row-sized temporaries, take at once (``_fit_scales`` goes
# through the rows in chunks): 2²⁴ floats are 64 MB, where a 70B down_proj's 8192 rows of 224² would be 1.6 GB and
# its (q − z)(H + λI) 0.9 GB.
REFIT_CHUNK = 1 << 24


@dataclass
class GPTQResult:
    """Quantized weight in the original column order.

    ``q`` int8 codes ``[out, in]`` (signed for symmetric, unsigned for asymmetric — int16 for asymmetric
    8-bit; see ``quantizers.py``);
    ``scale`` / ``zero`` ``[out, G]`` in the weight's dtype; ``weight`` the dequantized weight
    ``(q − zero) · scale`` in the weight's dtype; ``g_idx`` the group of each input column when it differs
    from ``col // group_size`` (never, with the static groups used under act_order; kept for formats that
    store it); ``row_loss`` each row's GPTQ objective ``Σ (w − ŵ)² / d² / 2`` (``d`` the diagonal of the Cholesky
    factor of ``H⁻¹``), which equals ``(w − ŵ)ᵀ (H + λI) (w − ŵ) / 2`` — in the units of ``H = 2/N XᵀX``, i.e.
    ``‖X(w − ŵ)‖² / N`` plus the dampening term; ``loss`` their sum.
    """

    q: Tensor
    scale: Tensor
    zero: Tensor
    weight: Tensor
    g_idx: Tensor | None
    row_loss: Tensor

    @property
    def loss(self) -> float:
        return float(self.row_loss.sum())

    def split(self, rows: Sequence[int]) -> list[GPTQResult]:
        """The results of the linears whose weights were stacked (``rows`` each) into one scan.

        Linears that read the same input (q/k/v, gate/up) share H, so GPTQ can quantize their stacked rows in one
        scan: every step of the scan is per row except the lazy block update, a matmul whose per-entry result does
        not depend on how many rows are stacked (tested for exact equality), so the codes equal separate scans.
        """
        parts = [t.split(list(rows)) for t in (self.q, self.scale, self.zero, self.weight, self.row_loss)]
        return [GPTQResult(q, s, z, w, self.g_idx, loss) for q, s, z, w, loss in zip(*parts)]


class GPTQ:
    """Accumulates the Hessian of one Linear's inputs (on ``device``, default CPU), then quantizes its weight."""

    def __init__(self, in_features: int, device: torch.device | str | None = None, *, targets: bool = False) -> None:
        self.in_features = in_features
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # Plain sum S = Σ x xᵀ over every token row, valid on and above the diagonal blocks (the rest is mirrored
        # when H is formed); H = 2/N · S is formed once, in quantize(). A running mean
        # rescales all of H at every batch: one more rounding per entry per batch for nothing. Kept in fp32, not
        # fp64: measured on ~8000 rows (width 576, Gaussian and heavy-tailed, 256 batches of 1..64 rows) against a
        # dense fp64 2/N XᵀX, the fp32 sum is off by ≤ 7e-7 of max|H| (the running mean by up to 1.4e-6) and an
        # fp64 sum by 6e-8 — all far below the 1e-2 · mean(diag H) dampening GPTQ adds, while fp64 would double
        # the largest GPTQ buffer (a 28672² S is 3.3 GB in fp32) and run at 1/32–1/64 speed on consumer GPUs.
        self.S: Tensor | None = torch.zeros(in_features, in_features, dtype=torch.float32, device=self.device)
        # With ``targets``: D = Σ (t − x) xᵀ over (input, target) pairs, the cross term of the asymmetric objective
        # ‖W T − Ŵ X‖² (see ``quantize``). A second in×in matrix, so only when asked for.
        self.D: Tensor | None = torch.zeros_like(self.S) if targets else None
        self.n_samples = 0

    @property
    def H(self) -> Tensor | None:
        """The Hessian ``2/N Σ x xᵀ`` of the inputs so far (a new tensor), or None after ``free_hessian``."""
        return None if self.S is None else _mirror_upper_(self.S.clone()).mul_(2.0 / max(self.n_samples, 1))

    @torch.no_grad()
    def add_batch(self, x: Tensor, target: Tensor | None = None) -> None:
        """Add inputs ``x [..., in_features]`` — exactly what the runtime feeds the Linear (rotated, quantized) —
        and optionally what it should have been fed (``target``, same shape: e.g. the input before the activation
        quantizer), whose output the quantized Linear is then asked to reproduce."""
        if self.S is None:
            raise ValueError("GPTQ.add_batch called after free_hessian=True released the Hessian")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"GPTQ expects inputs with last dim {self.in_features}, got shape {tuple(x.shape)}")
        if (target is None) != (self.D is None):   # before any sum moves: a refused batch leaves no trace
            raise ValueError("GPTQ.add_batch: a target is required exactly when the GPTQ was made with targets=True")
        x = x.reshape(-1, self.in_features).to(device=self.device, dtype=torch.float32)
        if x.shape[0] == 0:
            return
        self.n_samples += x.shape[0]
        xt = x.t()
        for i in range(0, self.in_features, _GRAM_BLOCK):   # S's upper block rows: [i:i+b, i:] += x[:, i:i+b]ᵀ x[:, i:]
            self.S[i : i + _GRAM_BLOCK, i:].addmm_(xt[i : i + _GRAM_BLOCK], x[:, i:])
        if target is not None:
            t = target.reshape(-1, self.in_features).to(device=self.device, dtype=torch.float32)
            self.D.addmm_((t - x).t(), x)

    @torch.no_grad()
    def rotate_inputs(self, rotate_gram: Callable[[Tensor], Tensor]) -> None:
        """Make the statistics so far those of inputs ``x @ R`` for a rotation ``R`` chosen after they were gathered
        (dart's R2, learned from the same pass): ``rotate_gram`` maps the symmetric ``Σ x xᵀ`` to ``Rᵀ (Σ x xᵀ) R``."""
        if self.S is None:
            raise ValueError("GPTQ.rotate_inputs called after free_hessian=True released the Hessian")
        if self.D is not None:
            raise ValueError("GPTQ.rotate_inputs does not turn the target cross term")
        self.S = rotate_gram(_mirror_upper_(self.S)).to(device=self.device, dtype=torch.float32)

    @torch.no_grad()
    def quantize(
        self,
        weight: Tensor,
        cfg: WeightQuantConfig,
        *,
        block_size: int = 128,
        damp: float = 0.01,
        act_order: bool = False,
        static_groups: bool = False,
        free_hessian: bool = False,
        target_step: float = 1.0,
        refit_rounds: int = 0,
    ) -> GPTQResult:
        """Quantize ``weight [out, in]``; returns codes, qparams and the dequantized weight (original order).

        ``weight`` is not modified. The accumulated Hessian is kept, so ``quantize`` may be called again, unless
        ``free_hessian``: then its memory becomes the working copy (peak two in×in fp32 matrices instead of three —
        3.3 GB each for a 70B down_proj) and this object cannot quantize again.
        ``target_step`` (with targets): the fraction of the least-squares step toward the targets' output the scan
        starts from (GPTAQ's α; 0 ignores the targets).
        """
        self._check(weight, cfg, block_size, damp)
        if not 0 <= target_step <= 1:
            raise ValueError(f"target_step must be in [0, 1], got {target_step}")
        if refit_rounds < 0:
            raise ValueError(f"refit_rounds must be >= 0, got {refit_rounds}")
        out_features, columns = weight.shape
        group_size = cfg.group_size
        grouped = group_size != -1
        static_groups = static_groups or (act_order and grouped)
        if grouped:
            block_size = max(1, block_size // group_size) * group_size
        scale_dtype = weight.dtype

        W = weight.to(device=self.device, dtype=torch.float32, copy=True)
        if free_hessian:
            H, self.S = _mirror_upper_(self.S), None
            H *= 2.0 / self.n_samples  # H = 2/N · S, once, in S's own memory
        else:
            H = self.H

        # Inputs that are always zero: their weights never matter; make H invertible there.
        dead = torch.diag(H) == 0
        H[dead, dead] = 1.0
        if self.D is not None:
            W = self._toward_targets(W, H, damp, free_hessian, target_step)
        W[:, dead] = 0.0

        # Grids known up front: per channel, or static groups (contiguous groups of the original order).
        n_groups = 1 if not grouped else columns // group_size
        scales = torch.zeros(out_features, n_groups, dtype=torch.float32, device=self.device)
        zeros = torch.zeros_like(scales)
        if not grouped or static_groups:
            scale, zero = weight_qparams(W, cfg, scale_dtype=scale_dtype)
            scales.copy_(scale)
            zeros.copy_(zero)

        perm = None
        if act_order:
            perm = torch.argsort(torch.diag(H), descending=True, stable=True)
            W = W[:, perm]
            H = H.index_select(0, perm)
            H = H.index_select(1, perm)
        # Group of each column in scan order.
        col_group = perm if perm is not None else torch.arange(columns, device=self.device)
        col_group = (col_group // group_size if grouped else torch.zeros_like(col_group)).tolist()

        Hinv = self._inverse_factor(H, damp)            # damps H in place: H + λI, the refit's objective
        damped = H if refit_rounds else None
        del H
        start = W.clone() if refit_rounds else None   # the scan updates W in place
        codes, losses = self._scan(W, Hinv, scales, zeros, col_group, cfg, block_size, static_groups, scale_dtype)
        del W
        if refit_rounds:
            codes, losses = self._refit(start, codes, losses, Hinv, damped, scales, zeros, col_group, cfg,
                                        block_size, scale_dtype, refit_rounds)
        del Hinv, damped, start
        if perm is not None:
            codes = codes[:, torch.argsort(perm)]

        dev = weight.device
        codes = codes.to(device=dev, dtype=code_dtype(cfg.bits, cfg.symmetric))
        scales = scales.to(device=dev, dtype=scale_dtype)
        zeros = zeros.to(device=dev, dtype=scale_dtype)
        return GPTQResult(
            q=codes,
            scale=scales,
            zero=zeros,
            # The same fp32 arithmetic as the scan's ŵ (same codes, same grid), rounded once to the weight dtype.
            weight=dequantize_weight(codes, scales, zeros, group_size).to(weight.dtype),
            g_idx=None,
            row_loss=losses,
        )

    def _check(self, weight: Tensor, cfg: WeightQuantConfig, block_size: int, damp: float) -> None:
        if self.S is None:
            raise ValueError("GPTQ.quantize called after free_hessian=True released the Hessian")
        if self.n_samples == 0:
            raise ValueError("GPTQ.quantize called before add_batch: no calibration inputs")
        if weight.ndim != 2 or weight.shape[1] != self.in_features:
            raise ValueError(
                f"weight of shape {tuple(weight.shape)} does not match in_features {self.in_features}"
            )
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if not damp >= 0:
            raise ValueError(f"damp must be >= 0, got {damp}")
        out_features, columns = weight.shape
        if cfg.group_size != -1 and columns % cfg.group_size != 0:
            raise ValueError(
                f"group_size {cfg.group_size} does not divide in_features {columns} of a weight of shape "
                f"[{out_features}, {columns}]"
            )

    def _toward_targets(self, W: Tensor, H: Tensor, damp: float, free: bool, step: float) -> Tensor:
        """The weights the scan starts from under targets: the least-squares optimum of ``‖W T − V X‖² + λ‖V − W‖²``
        (the same dampening as the scan's), ``V = W + W D (H + λI)⁻¹`` with ``D = 2/N Σ (t − x) xᵀ``. GPTQ's column
        updates keep the not-yet-quantized columns optimal for the objective the current weights are optimal for,
        so starting from V they pursue the targets' output instead of the inputs'. ``step`` < 1 starts from
        ``W + step · (V − W)`` instead: a shorter step generalises better where T − X is large and partly noise (a
        full-precision stream's upstream error). ``free``: D's memory is used and released (as ``free_hessian`` does
        with H)."""
        if free:
            D, self.D = self.D.mul_(2.0 / self.n_samples), None
        else:
            D = self.D * (2.0 / self.n_samples)
        L = self._damped_cholesky(H.clone(), damp)
        shift = torch.cholesky_solve((W @ D).t().contiguous(), L).t()
        del D, L
        return W.add_(shift, alpha=step)

    def _refit(self, start: Tensor, codes: Tensor, losses: Tensor, Hinv: Tensor, damped: Tensor, scales: Tensor,
               zeros: Tensor, col_group: list[int], cfg: WeightQuantConfig, block_size: int,
               scale_dtype: torch.dtype, rounds: int) -> tuple[Tensor, Tensor]:
        """Refit the scales the scan used to the codes it chose (``_fit_scales``), then, ``rounds − 1`` times, scan
        again from ``start`` on the refitted grid and refit again, each row keeping its best round: the codes were
        chosen for the old grid, and the grid's least-squares fit to the codes moves it. Every step minimises the
        scan's own objective ``(v − ŵ)ᵀ (H + λI) (v − ŵ)`` over codes or scales, so no row's loss rises; it settles
        within a few rounds. Scan order throughout (``damped``: H + λI, ``Hinv``: its inverse's upper factor);
        updates ``scales`` in place and returns codes and row losses."""
        groups = torch.tensor(col_group, device=self.device)
        losses = self._fit_scales(start, codes, losses, damped, groups, scales, zeros, scale_dtype)
        for _ in range(rounds - 1):
            grid = scales.clone()
            again, loss = self._scan(start.clone(), Hinv, grid, zeros.clone(), col_group, cfg, block_size, True,
                                     scale_dtype)
            loss = self._fit_scales(start, again, loss, damped, groups, grid, zeros, scale_dtype)
            better = loss < losses
            if not bool(better.any()):
                break
            codes[better], scales[better], losses[better] = again[better], grid[better], loss[better]
        return codes, losses

    @staticmethod
    def _fit_scales(start: Tensor, codes: Tensor, losses: Tensor, damped: Tensor, groups: Tensor, scales: Tensor,
                    zeros: Tensor, scale_dtype: torch.dtype) -> Tensor:
        """Each row's group scales fitted by least squares to fixed codes (and zero points): ``ŵ = Σ_g s_g (q − z)_g``
        is linear in the scales, so ``(v − ŵ)ᵀ (H + λI) (v − ŵ)`` has its minimum at the solution of a G×G system per
        row. A row takes the fitted scales, rounded to the scale dtype, only where they lower that objective.
        ``start`` (v) and ``codes`` in scan order, ``groups`` each column's group, ``losses`` the rows' objective / 2
        with the present scales (the scan's); updates ``scales`` in place and returns the new ``losses``. Rows go in
        chunks whose systems and products take at most ``REFIT_CHUNK`` floats each."""
        out_features, n_groups = scales.shape
        columns = start.shape[1]
        size = columns // n_groups
        # The sums run over columns gathered group by group (the original order's groups), so each group's share
        # is a reshape and a sum; without act-order (or per channel) that is the scan order itself.
        order = torch.argsort(groups, stable=True)
        permuted = not bool(torch.equal(order, torch.arange(columns, device=order.device)))
        losses = losses.clone()
        step = max(1, REFIT_CHUNK // max(n_groups * n_groups, columns))
        for r1 in range(0, out_features, step):
            rows = slice(r1, min(r1 + step, out_features))
            s, base = scales[rows], codes[rows] - zeros[rows][:, groups]   # q − z: ŵ = base · s, column by column
            pulled = start[rows] @ damped                                   # (H + λI) v
            if permuted:
                base, pulled = base.index_select(1, order), pulled.index_select(1, order)
            b = pulled.mul_(base).view(-1, n_groups, size).sum(2)            # (q − z)_g (H + λI) v
            del pulled
            A = torch.empty(base.shape[0], n_groups, n_groups, device=base.device)
            for h in range(n_groups):   # A[r, g, h] = (q − z)_g (H + λI)_gh (q − z)_h; symmetric: g ≥ h only
                own, later = slice(h * size, (h + 1) * size), slice(h * size, columns)
                block = (damped.index_select(0, order[own]).index_select(1, order[later]) if permuted
                         else damped[own, later])
                part = base[:, own] @ block
                A[:, h:, h] = part.mul_(base[:, later]).view(-1, n_groups - h, size).sum(2)
                A[:, h, h + 1:] = A[:, h + 1:, h]
            del part, block, base
            empty = A.diagonal(dim1=1, dim2=2) == 0   # a group whose codes are all zero: its scale does not matter
            system = A.clone()
            system.diagonal(dim1=1, dim2=2)[empty] = 1.0
            fitted = torch.linalg.solve_ex(system, torch.where(empty, s, b))[0].to(scale_dtype).float()
            del system
            # the objective's change, δᵀAδ + 2 δᵀ(A s − b) for δ = fitted − s: small terms, where the objective
            # itself (sᵀAs − 2 bᵀs + vᵀ(H + λI)v) would lose its digits to cancellation
            change = fitted - s
            gradient = (A @ s.unsqueeze(2)).squeeze(2) - b
            rise = (change.unsqueeze(1) @ A @ change.unsqueeze(2)).view(-1) + 2 * (change * gradient).sum(1)
            better = (rise < 0) & torch.isfinite(fitted).all(1) & ((fitted > 0) | empty).all(1)
            s[better] = fitted[better]
            losses[rows] = torch.where(better, losses[rows] + rise / 2, losses[rows]).clamp_min(0)
        return losses

    def _inverse_factor(self, H: Tensor, damp: float) -> Tensor:
        """Upper Cholesky factor of (H + λI)⁻¹: its rows carry each column's error onto the columns after it."""
        L = self._damped_cholesky(H, damp)  # damps H in place
        Hinv = torch.cholesky_inverse(L)
        del L
        Hinv, info = torch.linalg.cholesky_ex(Hinv, upper=True)
        if info.item() != 0:
            raise ValueError(f"GPTQ: inverse Hessian lost positive definiteness in fp32; retry with damp > {damp}")
        return Hinv

    def _scan(self, W: Tensor, Hinv: Tensor, scales: Tensor, zeros: Tensor, col_group: list[int],
              cfg: WeightQuantConfig, block_size: int, static_groups: bool, scale_dtype: torch.dtype
              ) -> tuple[Tensor, Tensor]:
        """The column scan with lazy block updates (the reference's ``fasterquant`` loop): quantize column by
        column, each rounding error pushed onto the later columns; dynamic groups take their grid from the updated
        weights at their first column. Within a block a column takes its earlier columns' errors when the scan
        reaches it (the reference rewrites every later column of the block at every step: the same sums, in
        another order, at ~1.3-2× the time on a CPU). Fills ``scales``/``zeros``; returns the codes and each row's
        loss."""
        out_features, columns = W.shape
        group_size = cfg.group_size
        grouped = group_size != -1
        # Codes, errors and the grid are held a row per column (transposed), so every per-column step works on
        # contiguous memory: a column of a row-major [out, in] matrix is a strided view, and each elementwise op on
        # it takes TensorIterator's slow path (per block ~15 % of a small layer's solve).
        codes_t = torch.empty(columns, out_features, device=self.device)
        scales_t, zeros_t = scales.t().contiguous(), zeros.t().contiguous()
        losses = torch.zeros(out_features, device=self.device)

        for i1 in range(0, columns, block_size):
            i2 = min(i1 + block_size, columns)
            count = i2 - i1
            W1t = W[:, i1:i2].t().contiguous()   # not updated within the block: each column takes its updates when reached
            C1t = codes_t[i1:i2]
            ErrT = torch.zeros(count, out_features, device=self.device)   # the block's errors, a row per column
            Hinv1 = Hinv[i1:i2, i1:i2]

            for i in range(count):
                col = i1 + i
                # column i with the errors of the block's earlier columns pushed on: one vector-matrix product
                # reads i error rows, where updating every later column at every step rewrote the block
                w = W1t[i] - Hinv1[:i, i] @ ErrT[:i] if i else W1t[i]
                d = Hinv1[i, i]

                if grouped and not static_groups and col % group_size == 0:
                    g = col // group_size
                    group = W[:, col : col + group_size] - ErrT[:i].t() @ Hinv1[:i, i : i + group_size]
                    s, z = weight_qparams(group, _per_channel(cfg), scale_dtype=scale_dtype)
                    scales_t[g] = s[:, 0].float()
                    zeros_t[g] = z[:, 0].float()

                g = col_group[col]
                s, z = scales_t[g], zeros_t[g]
                c = quantize_to_grid(w, s, z, cfg.bits, cfg.symmetric, out=C1t[i])
                # (w − ŵ) / d straight into the error row: the loop runs once per column, and its dispatches are
                # most of a small layer's solve
                torch.sub(w, dequantize_from_grid(c, s, z), out=ErrT[i]).div_(d)

            Err1 = ErrT.t().contiguous()            # a column per scanned column, once per block
            losses += Err1.square().sum(1) / 2      # Σ ((w − ŵ)/d)² / 2 over the block's columns
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        scales.copy_(scales_t.t())   # the dynamic groups' grids, in the caller's [out, G] layout
        zeros.copy_(zeros_t.t())
        return codes_t.t().contiguous(), losses

    @staticmethod
    def _damped_cholesky(H: Tensor, damp: float) -> Tensor:
        """Lower Cholesky factor of ``H + λI`` with ``λ = damp · mean(diag H)``, adding λ to ``H`` in place.

        Retries with more dampening when the factorisation fails (H from too few or degenerate samples), then
        raises ValueError.
        """
        mean_diag = torch.mean(torch.diag(H))
        diag = H.diagonal()
        tried: list[float] = []
        applied = 0.0
        for attempt in range(_DAMP_RETRIES + 1):
            # Retries start from at least 1e-3 so that damp=0 can still be rescued.
            d = damp if attempt == 0 else max(damp, 1e-3) * 10**attempt
            tried.append(d)
            diag += (d - applied) * mean_diag
            applied = d
            L, info = torch.linalg.cholesky_ex(H)
            # A non-finite entry of L reaches the diagonal of its row (L_kk = sqrt(H_kk - Σ L_kj²)), so checking the
            # diagonal is enough, and costs n floats where isfinite(L) transiently held 1.75 n×n (3.3 GB at 70B).
            if info.item() == 0 and torch.isfinite(L.diagonal()).all():
                if attempt:
                    log.warning("GPTQ: Hessian needed damp=%g (asked %g) to be positive definite", d, damp)
                return L
            del L
        raise ValueError(
            f"GPTQ: Hessian of size {H.shape[0]} is not positive definite even with damp in {tried} "
            "(calibration inputs degenerate or non-finite?)"
        )


def _mirror_upper_(S: Tensor) -> Tensor:
    """``S`` made exactly symmetric from its upper triangle, in place (one block of columns at a time, so no
    ``n × n`` temporary: the point of ``free_hessian``). Returns ``S``."""
    n = S.shape[0]
    for i in range(0, n, _GRAM_BLOCK):
        j = min(i + _GRAM_BLOCK, n)
        diag = S[i:j, i:j]
        diag.copy_(diag.triu() + diag.triu(1).t())
        S[j:, i:j] = S[i:j, j:].t()
    return S


def _per_channel(cfg: WeightQuantConfig) -> WeightQuantConfig:
    """The same grid (bits, symmetry, clip ratio, MSE clip) per row, for one group's qparams from its own columns."""
    return replace(cfg, group_size=-1)
