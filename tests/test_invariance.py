"""A rotated-but-unquantized model gives the original logits (fp32): R1, R2, R3, R4 and o_proj's online Hadamard all
active."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY
from streamquant.data import eval_windows, load_tokenizer, tokenize
from streamquant.qblock import Runtime
from streamquant.rotate.model import RotatedSource, Rotations
from streamquant.shards import ShardIndex
from streamquant.spec import read_spec
from streamquant.stream import Engine, stream_logits


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def rotated_vs_reference(model_dir, text_path, seqlen=48, windows=3):
    from transformers import AutoModelForCausalLM

    spec = read_spec(model_dir)
    ids = eval_windows(tokenize(load_tokenizer(model_dir), text_path.read_text()), seqlen, windows)
    gen = torch.Generator().manual_seed(0)
    rot = Rotations(
        r1=random_orthogonal(spec.hidden_size, gen),  # a dense rotation, harder than a Hadamard
        r2=[torch.stack([random_orthogonal(spec.head_dim, gen) for _ in range(spec.num_kv_heads)])
            for _ in range(spec.num_layers)],
        runtime=Runtime(r3_seed=3, r4_seed=4, o_seed=6),
    )
    engine = Engine(spec, torch.device("cpu"), torch.float32, micro_batch=2)
    ours = stream_logits(RotatedSource(ShardIndex(model_dir, spec), rot), engine, ids)
    ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        ref = ref_model(ids).logits
    return ours, ref


@pytest.mark.parametrize("arch", list(TINY))
def test_rotated_logits_equal_original(tiny_models, eval_text, arch):
    ours, ref = rotated_vs_reference(tiny_models[arch], eval_text)
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    # and the rotation really changed the weights: an untouched pipeline would pass trivially
    assert not torch.equal(ours, ref)


@pytest.mark.slow
def test_rotated_smollm2_logits_equal_original(smollm2, eval_text):
    ours, ref = rotated_vs_reference(smollm2, eval_text, seqlen=128, windows=2)
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_online_hadamard_changes_down_proj(tiny_models):
    """R4 is really in the weights: the fused down_proj differs from the plain one by exactly W H."""
    from streamquant.kernels.hadamard import OnlineHadamard
    from streamquant.rotate.model import rotate_block

    model_dir = tiny_models["llama"]
    spec = read_spec(model_dir)
    w = ShardIndex(model_dir, spec).load_block(0)
    fused = rotate_block(w, spec, None, None, r4_seed=7)
    dense = w["mlp.down_proj.weight"].double() @ OnlineHadamard(spec.intermediate_size, 7).matrix()
    assert torch.allclose(fused["mlp.down_proj.weight"].double(), dense, atol=1e-6)
    assert not torch.allclose(fused["mlp.down_proj.weight"], w["mlp.down_proj.weight"], atol=1e-3)


def test_r3_is_applied_online(tiny_models, eval_text):
    """R3 cancels in QKᵀ, so only a KV quantizer can reveal it: 4-bit K after a Hadamard differs from without."""
    from streamquant.stream import stream_nll

    model_dir = tiny_models["llama"]
    spec = read_spec(model_dir)
    ids = eval_windows(tokenize(load_tokenizer(model_dir), eval_text.read_text()), 48, 2)
    engine = Engine(spec, torch.device("cpu"), torch.float32, micro_batch=2)

    def nll(runtime):
        rot = Rotations(None, None, runtime)
        return stream_nll(RotatedSource(ShardIndex(model_dir, spec), rot), engine, ids)

    plain = nll(Runtime())
    kv4 = nll(Runtime(kv_bits=4))
    kv4_r3 = nll(Runtime(kv_bits=4, r3_seed=1))
    assert not torch.equal(plain, kv4)
    assert not torch.equal(kv4, kv4_r3)


def _dense_rotated_block(w, spec, r1, r2, r4_seed, o_seed=None):
    """The fused weights as whole fp64 matrices: W diag(σ) R1 on the input side, R1ᵀ W on the output side, R2 as a
    block-diagonal matrix (one head_dim block per head), H4 and o_proj's H_o as explicit random Hadamards."""
    from streamquant.kernels.hadamard import OnlineHadamard

    d = {k: v.double() for k, v in w.items()}
    s_in, s_post = d["input_layernorm.weight"], d["post_attention_layernorm.weight"]
    r2_kv = torch.block_diag(*r2)                                                   # on v's output rows
    r2_q = torch.block_diag(*[r2[h // spec.heads_per_group] for h in range(spec.num_heads)])  # on o's input columns
    h4 = OnlineHadamard(spec.intermediate_size, r4_seed).matrix()
    n_o = spec.num_heads * spec.head_dim
    h_o = torch.eye(n_o, dtype=torch.float64) if o_seed is None else OnlineHadamard(n_o, o_seed).matrix()
    return {
        "self_attn.q_proj.weight": d["self_attn.q_proj.weight"] * s_in @ r1,
        "self_attn.q_proj.bias": d["self_attn.q_proj.bias"],
        "self_attn.v_proj.weight": r2_kv.T @ (d["self_attn.v_proj.weight"] * s_in) @ r1,
        "self_attn.v_proj.bias": d["self_attn.v_proj.bias"] @ r2_kv,
        "self_attn.o_proj.weight": r1.T @ d["self_attn.o_proj.weight"] @ r2_q @ h_o,
        "mlp.up_proj.weight": d["mlp.up_proj.weight"] * s_post @ r1,
        "mlp.down_proj.weight": r1.T @ d["mlp.down_proj.weight"] @ h4,
    }


def _rotation_case(model_dir):
    spec = read_spec(model_dir)
    gen = torch.Generator().manual_seed(3)
    r1 = random_orthogonal(spec.hidden_size, gen)
    r2 = torch.stack([random_orthogonal(spec.head_dim, gen) for _ in range(spec.num_kv_heads)])
    return spec, ShardIndex(model_dir, spec).load_block(1), r1, r2


@pytest.mark.parametrize("o_seed", [None, 6])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_rotate_block_matches_dense_fp64(tiny_models, dtype, tol, o_seed):
    """Both fusion precisions against whole-matrix fp64 products: fp64 (the CPU policy) to round-off, fp32 (the
    CUDA policy) to ~1e-6 relative, far below the bf16 rounding the fused weights then receive."""
    from streamquant.rotate.model import rotate_block

    spec, w, r1, r2 = _rotation_case(tiny_models["qwen2"])      # qwen2: biases on q/k/v, GQA, head_dim 20
    w = {k: v.double() for k, v in w.items()}                   # isolate the fusion's error from the storage dtype
    fused = rotate_block(w, spec, r1, r2, r4_seed=5, dtype=dtype, o_seed=o_seed)
    for name, ref in _dense_rotated_block(w, spec, r1, r2, 5, o_seed).items():
        err = (fused[name] - ref).abs().max() / ref.abs().max()
        assert err <= tol, (name, float(err))
    assert torch.equal(fused["input_layernorm.weight"], torch.ones_like(w["input_layernorm.weight"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rotate_block_on_cuda_matches_dense_fp64(tiny_models):
    """The GPU path: Linears copied ahead on a side stream, fused in fp32 with TF32 off, left on the device."""
    from streamquant.rotate.model import rotate_block

    spec, w, r1, r2 = _rotation_case(tiny_models["qwen2"])
    w = {k: v.pin_memory() for k, v in w.items()}
    torch.backends.cuda.matmul.allow_tf32 = True                  # a caller's global setting must not leak in
    try:
        fused = rotate_block(w, spec, r1, r2, r4_seed=5, device=torch.device("cuda"))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    assert all(t.device.type == "cuda" and t.dtype == w[k].dtype for k, t in fused.items())
    for name, ref in _dense_rotated_block(w, spec, r1, r2, 5).items():
        err = (fused[name].double().cpu() - ref).abs().max() / ref.abs().max()
        assert err <= 2e-6, (name, float(err))


def test_fused_qkv_r2_rotates_only_the_value_rows(tiny_models):
    """Phi-3's qkv_proj holds [q; k; v] rows: R2 (as a dense block-diagonal fp64 matrix) turns the v rows only, and
    o_proj's columns take the same per-group R2 as in Llama."""
    from streamquant.rotate.model import rotate_block

    spec, w, r1, r2 = _rotation_case(tiny_models["phi3"])
    w = {k: v.double() for k, v in w.items()}
    fused = rotate_block(w, spec, r1, r2, r4_seed=None)
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    qkv = w["self_attn.qkv_proj.weight"] * w["input_layernorm.weight"] @ r1
    ref = torch.cat([qkv[:q + kv], torch.block_diag(*r2).T @ qkv[q + kv:]])
    assert qkv.shape[0] == q + 2 * kv
    assert (fused["self_attn.qkv_proj.weight"] - ref).abs().max() <= 1e-12 * ref.abs().max()
    r2_q = torch.block_diag(*[r2[h // spec.heads_per_group] for h in range(spec.num_heads)])
    o_ref = r1.T @ w["self_attn.o_proj.weight"] @ r2_q
    assert (fused["self_attn.o_proj.weight"] - o_ref).abs().max() <= 1e-12 * o_ref.abs().max()


def test_rotating_some_linears_gives_exactly_their_part_of_the_whole_block(tiny_models):
    """dart fuses R2 by rewriting only the linears R2 sits on and keeping the probe's others: each rewritten linear
    must be bit for bit the one a whole-block rewrite gives, and no other linear may come back."""
    from streamquant.rotate.model import rotate_block

    model_dir = tiny_models["llama"]
    spec = read_spec(model_dir)
    w = ShardIndex(model_dir, spec).load_block(1)
    gen = torch.Generator().manual_seed(1)
    r1 = random_orthogonal(spec.hidden_size, gen)
    r2 = torch.stack([random_orthogonal(spec.head_dim, gen) for _ in range(spec.num_kv_heads)])
    whole = rotate_block(w, spec, r1, r2, r4_seed=4)
    some = rotate_block(w, spec, r1, r2, r4_seed=4, linears=("self_attn.v_proj", "self_attn.o_proj"))
    rewritten = {k for k in some if k.startswith(spec.arch.linear_names)}
    assert rewritten == {k for k in whole if k.startswith(("self_attn.v_proj.", "self_attn.o_proj."))}
    assert all(torch.equal(some[k], whole[k]) for k in some)
