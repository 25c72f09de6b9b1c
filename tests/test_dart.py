"""Tests for streamquant.rotate.dart: Whip loss, QR-Orth, rotation training (R1/R2) and the Cayley baseline."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from streamquant.rotate.dart import (
    RotationTrainConfig,
    cayley_sgd_step,
    qr_orth,
    train_r1,
    train_r2,
    train_rotation,
    whip_loss,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """LAPACK QR with 2 OpenMP threads on a loaded 2-core box runs ~30x slower than with one; keep the suite fast."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _eye(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64)


def _orth_err(q: torch.Tensor) -> float:
    q = q.double()
    return (q.T @ q - _eye(q.shape[1])).abs().max().item()


def llm_like(n_tokens: int, n: int, seed: int = 0, n_outliers: int = 4) -> torch.Tensor:
    """Synthetic post-RMSNorm activations: unit-variance Laplace rows plus a few "massive activation" channels
    (20-50x the scale, with a same-sign offset as in real LLMs), each row normalised to RMS 1 (σ-free RMSNorm).

    With zero-mean outliers a random Hadamard already spreads them perfectly and is (near) optimal for the Whip loss;
    the consistent sign of real massive activations is what a learned rotation can do better on.
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n_tokens, n, generator=g, dtype=torch.float64) - 0.5
    x = -torch.sign(u) * torch.log1p(-2 * u.abs()) / math.sqrt(2)  # Laplace, variance 1
    channels = torch.randperm(n, generator=g)[:n_outliers]
    scale = 20 + 30 * torch.rand(n_outliers, generator=g, dtype=torch.float64)
    x[:, channels] = x[:, channels] * scale + scale
    x = x / x.pow(2).mean(dim=-1, keepdim=True).sqrt()
    return x.float()


def excess_kurtosis(y: torch.Tensor) -> float:
    """Excess kurtosis of all entries of y pooled together (fp64): E[(y-μ)^4]/E[(y-μ)^2]^2 - 3."""
    y = y.double().flatten()
    y = y - y.mean()
    return (y.pow(4).mean() / y.pow(2).mean().pow(2) - 3.0).item()


# ---------------------------------------------------------------------------------------------------------------
# whip_loss / qr_orth
# ---------------------------------------------------------------------------------------------------------------


def test_whip_loss_matches_hand_formula():
    x = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    expected = 0.0
    for a in range(3):
        for b in range(5):
            expected += sum(math.exp(-abs(v)) for v in x[a, b].tolist())
    expected /= 3 * 5  # mean over tokens (all leading dims), sum over the last dim
    assert whip_loss(x).item() == pytest.approx(expected, rel=1e-12)
    assert whip_loss(x.float()).item() == pytest.approx(expected, rel=1e-5)
    assert whip_loss(x[0, 0]).item() == pytest.approx(sum(math.exp(-abs(v)) for v in x[0, 0].tolist()), rel=1e-12)


def test_qr_orth_orthonormal_and_sign_convention():
    g = torch.Generator().manual_seed(2)
    z64 = torch.randn(64, 64, generator=g, dtype=torch.float64)
    q32, q64 = qr_orth(z64.float()), qr_orth(z64)
    assert q32.dtype == torch.float32 and q64.dtype == torch.float64
    assert _orth_err(q32) < 1e-6
    assert _orth_err(q64) < 1e-12
    r = q64.T @ z64  # the triangular factor that goes with Q
    assert torch.allclose(r, torch.triu(r), atol=1e-10)
    assert (torch.diagonal(r) > 0).all()
    # batched input follows the same convention
    qb = qr_orth(torch.stack([z64, -z64]))
    assert torch.allclose(qb[0], q64, atol=1e-12) and torch.allclose(qb[1], -q64, atol=1e-12)


def test_qr_orth_fixes_orthogonal_matrices():
    from streamquant.kernels.hadamard import random_hadamard_matrix

    g = torch.Generator().manual_seed(3)
    haar = qr_orth(torch.randn(48, 48, generator=g, dtype=torch.float64))
    flipped = haar * torch.tensor([(-1.0) ** i for i in range(48)], dtype=torch.float64)  # some columns negated
    perm = _eye(16)[torch.randperm(16, generator=g)]
    for q in (random_hadamard_matrix(64, 5), random_hadamard_matrix(576, 0), flipped, -_eye(8), perm):
        assert torch.allclose(qr_orth(q), q, atol=1e-12, rtol=0)


def test_qr_orth_is_continuous():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(32, 32, generator=g, dtype=torch.float64)
    # a pivot crossing zero: Householder QR flips the sign of that column's reflection, qr_orth must not jump
    z_pos, z_neg = z.clone(), z.clone()
    z_pos[0, 0], z_neg[0, 0] = 1e-9, -1e-9
    assert (qr_orth(z_pos) - qr_orth(z_neg)).abs().max().item() < 1e-7
    for eps in (1e-4, 1e-6):
        dz = eps * torch.randn(32, 32, generator=g, dtype=torch.float64)
        change = (qr_orth(z + dz) - qr_orth(z)).norm().item()
        assert change < 50 * dz.norm().item()


def test_qr_orth_gradient_flows():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 6, generator=g, dtype=torch.float64)
    z = torch.randn(6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda zz: whip_loss(x @ qr_orth(zz)), (z,))
    whip_loss(x @ qr_orth(z)).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().max() > 0


# ---------------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------------

FAST = RotationTrainConfig(epochs=4, batch_size=256, lr=1e-3, momentum=0.9, sample_fraction=0.5, seed=0)


@pytest.fixture(scope="module")
def x576() -> torch.Tensor:
    return llm_like(8192, 576, seed=0)


@pytest.mark.parametrize("n", [576, 64])
def test_train_r1_reduces_whip_and_kurtosis(n, x576):
    from streamquant.kernels.hadamard import random_hadamard_matrix

    x = x576 if n == 576 else llm_like(8192, 64, seed=1)
    logs: list[str] = []
    res = train_r1(x, n, FAST, seed=7, log=logs.append)
    init = random_hadamard_matrix(n, 7)
    init_whip = whip_loss(x.double() @ init).item()
    final_whip = whip_loss(x.double() @ res.rotation).item()

    assert res.rotation.dtype == torch.float64 and res.rotation.shape == (n, n)
    assert _orth_err(res.rotation) < 1e-5
    assert res.init_loss == pytest.approx(init_whip, rel=1e-4)  # reported losses are the real ones
    assert res.final_loss == pytest.approx(final_whip, rel=1e-4)
    assert final_whip < init_whip * 0.99
    assert excess_kurtosis(x @ res.rotation.float()) < excess_kurtosis(x @ init.float()) - 0.05
    assert res.steps == 4 * 16 and len(res.loss_history) == 4 and len(logs) == 4
    assert res.seconds > 0


def test_train_rotation_deterministic_and_seeded(x576):
    from streamquant.kernels.hadamard import random_hadamard_matrix

    cfg = replace(FAST, epochs=1, max_steps=6)
    init = random_hadamard_matrix(576, 0)
    before = torch.random.get_rng_state()
    a = train_rotation(x576, init, cfg)
    assert torch.equal(torch.random.get_rng_state(), before)  # global RNG untouched
    b = train_rotation(x576, init, cfg)
    assert a.steps == 6 and torch.equal(a.rotation, b.rotation)
    c = train_rotation(x576, init, replace(cfg, seed=1))  # other minibatch order
    assert (a.rotation - c.rotation).abs().max() > 1e-4
    d = train_r1(x576, 576, cfg, seed=1)  # other Hadamard init
    assert (a.rotation - d.rotation).abs().max() > 1e-2


def test_train_rotation_adam_and_max_steps():
    x = llm_like(2048, 64, seed=2)
    init = qr_orth(torch.randn(64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    res = train_rotation(x, init, replace(FAST, optimizer="adam", max_steps=3))
    assert res.steps == 3 and len(res.loss_history) == 1
    assert res.final_loss < res.init_loss
    with pytest.raises(ValueError):
        train_rotation(x, init, replace(FAST, optimizer="lbfgs"))
    with pytest.raises(ValueError):
        train_rotation(x, init[:32, :32], FAST)


def test_fixed_step_count_with_scaled_lr_is_the_plain_config_it_names():
    """batches_per_epoch with scale_lr (R2's regime) takes ceil(rows per epoch / batches) rows a step at
    lr · batch / batch_size: bit for bit the run of that batch and lr written out; rows too few for the fixed count
    take steps of batch_size at the base lr, exactly the plain config's run."""
    x = llm_like(4096, 32, seed=4)
    init = qr_orth(torch.randn(32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    fixed = RotationTrainConfig(epochs=2, batch_size=64, lr=1e-3, sample_fraction=0.5, batches_per_epoch=8,
                                scale_lr=True, seed=2)
    plain = replace(fixed, batch_size=256, lr=4e-3, batches_per_epoch=None, scale_lr=False)   # 2048 rows / 8
    a, b = train_rotation(x, init, fixed), train_rotation(x, init, plain)
    assert a.steps == b.steps == 16 and torch.equal(a.rotation, b.rotation)
    few = train_rotation(x[:600], init, fixed)           # 300 rows an epoch: 38 a step would be below 64
    base = train_rotation(x[:600], init, replace(fixed, batches_per_epoch=None, scale_lr=False))
    assert few.steps == base.steps == 10 and torch.equal(few.rotation, base.rotation)


def test_train_r2_groups():
    from streamquant.kernels.hadamard import random_hadamard_matrix

    kv, hd, hpg = 2, 16, 3
    n_tok = 1024
    cfg = RotationTrainConfig(epochs=2, batch_size=128, sample_fraction=0.5, seed=3)
    x = torch.randn(n_tok, kv * hpg * hd, generator=torch.Generator().manual_seed(6))
    res = train_r2(x, kv, hd, hpg, cfg, seed=10)
    assert len(res) == kv
    for r in res:
        assert r.rotation.shape == (hd, hd) and _orth_err(r.rotation) < 1e-10 and r.steps > 0

    # group g is trained on the stacked vectors of query heads g*hpg .. g*hpg+hpg-1, from Hadamard(seed + g)
    for g in range(kv):
        rows = torch.stack([x[t, h * hd : (h + 1) * hd] for t in range(n_tok) for h in range(g * hpg, (g + 1) * hpg)])
        ref = train_rotation(rows, random_hadamard_matrix(hd, 10 + g), replace(cfg, seed=cfg.seed + g))
        assert torch.equal(ref.rotation, res[g].rotation)

    # scaling group 0's heads changes only group 0's rotation
    x2 = x.clone()
    x2[:, : hpg * hd] *= 4.0
    res2 = train_r2(x2, kv, hd, hpg, cfg, seed=10)
    assert torch.equal(res2[1].rotation, res[1].rotation)
    assert not torch.equal(res2[0].rotation, res[0].rotation)
    with pytest.raises(ValueError):
        train_r2(x[:, :-1], kv, hd, hpg, cfg, seed=10)


def test_qr_orth_and_cayley_both_reduce_loss():
    from streamquant.kernels.hadamard import random_hadamard_matrix

    n, steps, bs, lr = 64, 30, 256, 1e-3
    x = llm_like(4096, n, seed=4)
    init = random_hadamard_matrix(n, 0)
    g = torch.Generator().manual_seed(0)
    batches = [x[torch.randint(0, x.shape[0], (bs,), generator=g)] for _ in range(steps)]
    init_loss = whip_loss(x @ init.float()).item()

    z = init.float().clone().requires_grad_(True)
    opt = torch.optim.SGD([z], lr=lr, momentum=0.9)
    for b in batches:
        opt.zero_grad()
        whip_loss(b @ qr_orth(z)).backward()
        opt.step()
    qr_loss = whip_loss(x @ qr_orth(z.detach())).item()

    r, buf = init.float().clone(), None
    for b in batches:
        rg = r.clone().requires_grad_(True)
        whip_loss(b @ rg).backward()
        r, buf = cayley_sgd_step(r, rg.grad, buf, lr=lr)
    cayley_loss = whip_loss(x @ r).item()

    assert qr_loss < init_loss * 0.995
    assert cayley_loss < init_loss * 0.995
    assert _orth_err(r) < 1e-4  # the fixed-point Cayley step stays (nearly) on the manifold


def test_untrained_dart_is_quarot_bit_for_bit(tiny_models, eval_text, tmp_path):
    """R1 and R2 start from exactly QuaRot's random Hadamards: with no epochs, dart writes QuaRot's bytes (so an
    ablation of the training measures the training alone)."""
    from conftest import run_cli

    outs = {}
    for method, extra in (("quarot", []), ("dart", ["--r1-epochs", "0", "--r2-epochs", "0"])):
        outs[method] = tmp_path / method
        res = run_cli("run", str(tiny_models["llama"]), "--out", str(outs[method]), "--method", method, "--w-bits", "4",
                      "--a-bits", "4", "--weights", "gptq", "--samples", "4", "--seqlen", "48", "--calib",
                      str(eval_text), *extra)
        assert res.returncode == 0, res.stderr
    blocks = sorted(p.name for p in outs["quarot"].glob("*.safetensors"))
    assert blocks and blocks == sorted(p.name for p in outs["dart"].glob("*.safetensors"))
    for name in blocks:
        assert (outs["quarot"] / name).read_bytes() == (outs["dart"] / name).read_bytes(), name


def test_r1_lr_reaches_the_r1_fit(tiny_models, eval_text):
    """--r1-lr is the step of the R1 fit the run reports: same reservoir and init, so the same initial whip loss, and
    a step 100× larger travels further down it in the same steps. Without --r1-lr the w4a4 preset's step (1e-2) is
    the one taken: the same fit as naming it."""
    from conftest import last_json, run_cli

    r1 = {}
    for lr in ("1e-4", "1e-2", None):
        res = run_cli("run", str(tiny_models["llama"]), "--method", "dart", "--scheme", "w4a4", "--samples", "4",
                      "--seqlen", "48", "--calib", str(eval_text), "--r1-epochs", "3", "--r2-epochs", "0",
                      *(["--r1-lr", lr] if lr else []), "--no-write", "--quiet", "--json")
        assert res.returncode == 0, res.stderr
        r1[lr] = last_json(res.stdout)["r1"]
    assert r1["1e-4"]["init_loss"] == r1["1e-2"]["init_loss"]
    assert r1["1e-2"]["final_loss"] < r1["1e-4"]["final_loss"] < r1["1e-4"]["init_loss"]
    assert r1[None]["lr"] == 1e-2 and r1[None]["loss_per_epoch"] == r1["1e-2"]["loss_per_epoch"]
